"""`gguflab sweep` on a tiny synthetic model with SmolLM2's vocab: every JSON field for every
row, figures equal to what `gguflab perplexity` prints for the same files, sizes equal to the
files' own, the cache (a second run measures nothing, a new type measures only itself), clean
errors and cancel."""

from __future__ import annotations

import ctypes
import json
import os
import re
import shutil

import pytest

from gguflab import cli
from gguflab.catalog import default_eval_text
from gguflab.errors import UserError
from gguflab.events import Finished, Log, Measured, Progress, Started
from gguflab.plot import Point, scatter
from gguflab.quant.mixes import parse_mix
from gguflab.sweep import (
    ROW_FIELDS,
    parse_size,
    parse_types,
    plot_rows,
    quant_path,
    sweep_model,
)
from gguflab.synth import SynthConfig, write_synthetic_llama

N_CTX, CHUNKS = 64, 2
TYPES = ["Q8_0", "Q4_K_M"]
CONFIG = dict(n_layer=2, n_embd=256, n_ff=512, n_head=4, n_head_kv=2, tied=True)


def run(model, types, **kw):
    """All events of a sweep, and its Finished event."""
    kw = {"n_ctx": N_CTX, "chunks": CHUNKS} | kw
    events = list(sweep_model(str(model), types, kw.pop("text_file", None), **kw))
    assert isinstance(events[0], Started) and isinstance(events[-1], Finished)
    return events, events[-1]


def mtimes(folder):
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


@pytest.fixture(scope="module")
def first(module_tmp, smollm2):
    folder = module_tmp("sweep")
    model = folder / "tiny.gguf"
    write_synthetic_llama(model, SynthConfig(tokenizer_from=smollm2, **CONFIG))
    events, fin = run(model, TYPES)
    return model, events, fin, mtimes(folder)


def test_json_and_markdown_have_every_field_for_every_row(first):
    model, events, fin, _ = first
    with open(fin.path) as f:
        doc = json.load(f)
    assert fin.path == str(model.with_suffix(".sweep.json"))
    rows = doc["rows"]
    assert [r["type"] for r in rows] == ["F16", *TYPES]
    for e in events:  # jobs send events between processes as JSON
        assert json.loads(json.dumps(e.to_dict())) == e.to_dict()
    measured = [e for e in events if isinstance(e, Measured)]
    assert [(e.name, e.values) for e in measured] == [(r["type"], r) for r in rows]
    for r in rows:
        assert set(ROW_FIELDS) <= set(r), r["type"]
        for k in ROW_FIELDS:
            if k != "fits":
                assert r[k] is not None, (r["type"], k)
        assert r["fits"] is None and r["cached"] is False  # no --vram; first run
        assert r["ppl"] > 1 and r["pp_tps"] > 0 and r["tg_tps"] > 0
        assert 0 <= r["same_top_p"] <= 1 and r["mean_kld"] >= 0
    assert rows[0]["is_base"] and rows[0]["mean_kld"] == 0 and rows[0]["delta_ppl"] == 0
    md = open(fin.stats["markdown"]).read()
    assert all(f"| {t} |" in md for t in TYPES) and "| F16 (base) |" in md
    assert doc["n_ctx"] == N_CTX and doc["chunks"] == CHUNKS


def test_sizes_and_bpw_are_the_files_own(first):
    llama_cpp = pytest.importorskip("llama_cpp")
    _, _, fin, _ = first
    for r in fin.stats["rows"]:
        assert r["size_bytes"] == os.path.getsize(r["file"])
        ll = llama_cpp.Llama(r["file"], n_ctx=N_CTX, verbose=False, n_threads=2)
        n_bytes = llama_cpp.llama_model_size(ll.model)  # llama.cpp's own model size
        n = llama_cpp.llama_model_n_params(ll.model)
        assert r["bpw"] == pytest.approx(8 * n_bytes / n)
        if not r["is_base"]:
            buf = ctypes.create_string_buffer(32)
            llama_cpp.llama_model_meta_val_str(ll.model, b"general.file_type", buf, 32)
            assert int(buf.value) == int(parse_mix(r["type"]).ftype)
        ll.close()


def _perplexity_cli(capsys, path, *extra):
    capsys.readouterr()
    assert cli.main(["perplexity", "-m", str(path), "-f", default_eval_text(), "-c", str(N_CTX),
                     "--chunks", str(CHUNKS), *extra]) == 0
    return capsys.readouterr().out


def test_figures_equal_the_perplexity_command(first, capsys, tmp_path):
    _, _, fin, _ = first
    rows = fin.stats["rows"]
    base_kld = str(tmp_path / "base.kld")
    out = _perplexity_cli(capsys, rows[0]["file"], "--kl-divergence-base", base_kld)
    assert re.search(r"PPL = ([\d.]+) \+/- ([\d.]+)", out).groups() == (
        f"{rows[0]['ppl']:.4f}", f"{rows[0]['ppl_err']:.5f}")
    for r in rows[1:]:
        out = _perplexity_cli(capsys, r["file"], "--kl-divergence-base", base_kld,
                              "--kl-divergence")
        # llama-perplexity's closing statistics
        assert re.search(r"Mean PPL\(Q\) +: +([\d.]+)", out)[1] == f"{r['ppl']:.6f}"
        assert re.search(r"Mean +KLD: +([\d.]+)", out)[1] == f"{r['mean_kld']:.6f}"
        assert re.search(r"99\.0% +KLD: +([\d.]+)", out)[1] == f"{r['kld_99']:.6f}"
        assert re.search(r"RMS Δp +: +([\d.]+)", out)[1] == f"{100 * r['rms_dp']:.3f}"
        assert re.search(r"Same top p: +([\d.]+)", out)[1] == f"{100 * r['same_top_p']:.3f}"
        assert (re.search(r"Mean PPL\(Q\)-PPL\(base\) +: +(\S+)", out)[1]
                == f"{r['delta_ppl']:.6f}")


def test_flash_attn_setting_is_measured_apart_and_as_the_perplexity_command(first, capsys,
                                                                          tmp_path):
    """-fa off: the figures `gguflab perplexity -fa off` gives; the setting is part of the
    cache key (the same setting again measures nothing, another measures again)."""
    model = tmp_path / "tiny.gguf"
    shutil.copyfile(first[0], model)
    rows = run(model, TYPES[:1], flash_attn="off")[1].stats["rows"]
    out = _perplexity_cli(capsys, rows[1]["file"], "-fa", "off")
    assert re.search(r"PPL = ([\d.]+)", out)[1] == f"{rows[1]['ppl']:.4f}"
    assert [r["cached"] for r in run(model, TYPES[:1], flash_attn="off")[1].stats["rows"]] == [
        True, True]
    assert [r["cached"] for r in run(model, TYPES[:1], flash_attn="on")[1].stats["rows"]] == [
        False, False]
    with pytest.raises(UserError, match="flash-attn"):
        run(model, TYPES[:1], flash_attn="maybe")


def test_second_run_measures_and_quantizes_nothing(first):
    model, _, fin, before = first
    events, fin2 = run(model, TYPES)
    rows2 = fin2.stats["rows"]
    assert all(r["cached"] for r in rows2)
    strip = [{k: v for k, v in r.items() if k != "cached"} for r in rows2]
    assert strip == [{k: v for k, v in r.items() if k != "cached"} for r in fin.stats["rows"]]
    assert not [e for e in events if isinstance(e, Log) and "quantizing" in e.text]
    after = mtimes(model.parent)
    for name in ("tiny-Q8_0.gguf", "tiny-Q4_K_M.gguf", "tiny.sweep-base.kld", "tiny.gguf"):
        assert after[name] == before[name], name


def test_adding_a_type_measures_only_that_type(first):
    model, _, _, before = first
    events, fin = run(model, [*TYPES, "Q6_K"])
    assert [(r["type"], r["cached"]) for r in fin.stats["rows"]] == [
        ("F16", True), ("Q8_0", True), ("Q4_K_M", True), ("Q6_K", False)]
    quantized = [e.text for e in events if isinstance(e, Log) and "quantizing" in e.text]
    assert len(quantized) == 1 and quantized[0].startswith("Q6_K")
    after = mtimes(model.parent)
    assert after["tiny-Q8_0.gguf"] == before["tiny-Q8_0.gguf"]
    assert os.path.exists(quant_path(str(model), parse_mix("Q6_K"), None))


def test_vram_marks_the_types_that_fit(first):
    model, _, fin, _ = first
    rows = fin.stats["rows"]
    c = SynthConfig(**CONFIG)
    kv = 2 * 2 * c.n_layer * N_CTX * c.n_head_kv * (c.n_embd // c.n_head)  # F16 K and V
    vram = (rows[1]["size_bytes"] + rows[2]["size_bytes"]) // 2 + kv  # Q4_K_M fits, Q8_0 not
    _, fin2 = run(model, TYPES, vram_bytes=vram)
    fits = {r["type"]: r["fits"] for r in fin2.stats["rows"]}
    assert fits == {"F16": False, "Q8_0": False, "Q4_K_M": True}
    plot = plot_rows(fin2.stats["rows"], "kld")
    assert "* Q4_K_M" in plot and "o Q8_0" in plot.replace("Q8_0 o", "o Q8_0")


def test_cli_prints_help_lines_table_and_plot(first, capsys):
    model, _, _, _ = first
    assert cli.main(["sweep", "-m", str(model), "--types", ",".join(TYPES), "-c", str(N_CTX),
                     "--chunks", str(CHUNKS), "--vram", "1G", "--plot", "ppl"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^Q4_K_M  : +[\d.]+M, [+-][\d.]+ ppl, KLD [\d.]+ \(cached\)$", out, re.M)
    assert "Δppl vs base" in out and "* fits the GPU memory given" in out
    assert "wrote " + str(model.with_suffix(".sweep.json")) in out


def test_bad_input_is_one_clear_error(first, capsys, tmp_path):
    model, _, _, _ = first
    with pytest.raises(UserError, match="unknown quantization type 'Q4_K_X'"):
        run(model, ["Q8_0", "Q4_K_X"])
    with pytest.raises(UserError, match="no such model file"):
        run(tmp_path / "nope.gguf", TYPES)
    short = tmp_path / "short.txt"
    short.write_text("Too short a text.")
    with pytest.raises(UserError, match="you need at least 128 tokens"):
        run(model, TYPES, text_file=str(short), out_dir=str(tmp_path))
    assert not list(tmp_path.glob("*.gguf"))
    assert cli.main(["sweep", "-m", str(model), "--types", "Q9_K"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [err[0]] and err[0].startswith("gguflab: error: unknown quantization type")


@pytest.mark.parametrize("stop_after", ["perplexity", "quantize"])
def test_cancel_leaves_no_partial_files(first, tmp_path, stop_after):
    model, _, _, _ = first
    gen = sweep_model(str(model), TYPES, None, n_ctx=N_CTX, chunks=CHUNKS,
                      out_dir=str(tmp_path))
    quantizing = False
    for ev in gen:
        quantizing |= isinstance(ev, Log) and "quantizing" in ev.text
        if isinstance(ev, Progress) and (stop_after == "perplexity" or quantizing):
            break
    gen.close()
    left = sorted(p.name for p in tmp_path.iterdir())
    assert not [n for n in left if n.endswith(".partial")], left
    assert not [n for n in left if n.endswith(".gguf") or n.endswith(".sweep.json")], left
    if stop_after == "perplexity":
        assert left == []  # the base's log-probs are written only when complete


def test_requantizing_a_quantized_base_warns(first, tmp_path):
    model, _, _, _ = first
    q8 = quant_path(str(model), parse_mix("Q8_0"), None)
    events, fin = run(q8, ["Q4_K_M"], out_dir=str(tmp_path), chunks=1)
    warnings = [e.text for e in events if isinstance(e, Log) and e.level == "warning"]
    assert any("already quantized (Q8_0)" in w for w in warnings)
    assert [r["type"] for r in fin.stats["rows"]] == ["Q8_0", "Q4_K_M"]


def test_parse_types_and_sizes():
    assert [m.name for m in parse_types("q4_k, Q4_K_M,Q8_0")] == ["Q4_K_M", "Q8_0"]
    assert parse_size("8G") == 8 << 30 and parse_size("512M") == 512 << 20
    assert parse_size("1.5GiB") == 3 << 29 and parse_size("4096") == 4096
    for bad in ("lots", "-1G", "0"):
        with pytest.raises(UserError):
            parse_size(bad)


def test_scatter_places_marks_by_value():
    text = scatter([Point(1.0, 0.5, "big", True), Point(3.0, 0.01, "small", False)],
                   "size", "KLD", width=40, height=10, log_y=True)
    lines = text.splitlines()
    big = next(i for i, line in enumerate(lines) if "* big" in line)
    small = next(i for i, line in enumerate(lines) if "small o" in line)
    assert big < small  # larger y is higher up
    assert lines[big].index("*") < lines[small].index("o")  # smaller x is further left


def test_a_quantized_file_it_did_not_write_is_reused_only_when_it_matches(first, tmp_path):
    import shutil

    model, _, fin, _ = first
    files = {r["type"]: r["file"] for r in fin.stats["rows"]}
    target = quant_path(str(model), parse_mix("Q8_0"), str(tmp_path))
    shutil.copy(files["Q8_0"], target)  # e.g. from an earlier `gguflab quantize`
    mtime = os.stat(target).st_mtime_ns
    events, fin2 = run(model, ["Q8_0"], out_dir=str(tmp_path))
    assert any("reusing" in e.text for e in events if isinstance(e, Log))
    assert os.stat(target).st_mtime_ns == mtime
    assert fin2.stats["rows"][1]["ppl"] == fin.stats["rows"][1]["ppl"]
    shutil.copy(files["Q4_K_M"], target)  # a file that is not what its name says: left alone
    with pytest.raises(UserError, match="is not Q8_0 of this model"):
        run(model, ["Q8_0"], out_dir=str(tmp_path))
    assert open(target, "rb").read() == open(files["Q4_K_M"], "rb").read()


def test_gpu_layers_give_the_cpu_figures(first, tmp_path, monkeypatch):
    """-ngl through the emulated GPU (the device kernels compiled for the CPU): the rows are
    measured again (the settings differ) and agree with the CPU's."""
    model, _, fin, _ = first
    monkeypatch.setenv("GGUFLAB_GPU", "host")
    events, gpu = run(model, ["Q8_0"], n_gpu_layers=999, out_dir=str(tmp_path))
    assert any("offload: 2/2 layers + output" in e.text for e in events if isinstance(e, Log))
    cpu = {r["type"]: r for r in fin.stats["rows"]}
    for r in gpu.stats["rows"]:
        assert not r["cached"]
        assert r["ppl"] == pytest.approx(cpu[r["type"]]["ppl"], rel=1e-3)
        assert r["mean_kld"] == pytest.approx(cpu[r["type"]]["mean_kld"], abs=1e-3)


@pytest.fixture(scope="module")
def imatrices(first, module_tmp):
    """Two importance matrices of the sweep's model, collected over 2 and 1 chunks."""
    from gguflab.imatrix.collect import collect_imatrix

    model = first[0]
    folder = module_tmp("imatrix")
    out = []
    for chunks in (2, 1):
        path = folder / f"tiny-{chunks}.imatrix.gguf"
        list(collect_imatrix(str(model), default_eval_text(), str(path), N_CTX, chunks))
        out.append(str(path))
    return out


def test_imatrix_measures_each_type_with_and_without_side_by_side(first, imatrices, capsys):
    import gguf as ggufpy

    from gguflab.quant.pipeline import QuantizeOptions, quantize_model

    model, _, fin, _ = first
    imat, other = imatrices
    assert cli.main(["sweep", "-m", str(model), "--types", ",".join(TYPES), "-c", str(N_CTX),
                     "--chunks", str(CHUNKS), "--imatrix", imat]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^Q4_K_M\+imat: +[\d.]+M, [+-][\d.]+ ppl, KLD [\d.]+$", out, re.M)
    with open(model.with_suffix(".sweep.json")) as f:
        doc = json.load(f)
    rows = doc["rows"]
    assert [r["type"] for r in rows] == ["F16", "Q8_0", "Q8_0+imat", "Q4_K_M", "Q4_K_M+imat"]
    assert doc["imatrix"] == os.path.abspath(imat)
    # the rows without the imatrix are the first run's, from the cache: the keys do not collide
    plain = {r["type"]: r for r in fin.stats["rows"]}
    for r in rows:
        if r["type"] in plain:
            assert r["cached"] and r["ppl"] == plain[r["type"]]["ppl"], r["type"]
            assert r["file"] == plain[r["type"]]["file"]
        else:
            assert not r["cached"] and r["file"].endswith("-imat.gguf"), r["type"]
    # the +imat file is what `quantize --imatrix` writes (the imatrix recorded in it), and
    # the imatrix changed its Q4_K tensors
    ours = quant_path(str(model), parse_mix("Q4_K_M"), None, imatrix=True)
    ref = str(model.parent / "ref-Q4_K_M.gguf")
    list(quantize_model(str(model), ref, parse_mix("Q4_K_M"), QuantizeOptions(imatrix=imat)))
    assert open(ours, "rb").read() == open(ref, "rb").read()
    os.remove(ref)
    r = ggufpy.GGUFReader(ours)
    assert r.fields["quantize.imatrix.file"].contents() == imat
    plain_r = ggufpy.GGUFReader(plain["Q4_K_M"]["file"])
    q4k = [(a, b) for a, b in zip(r.tensors, plain_r.tensors)
           if a.tensor_type == ggufpy.GGMLQuantizationType.Q4_K]
    assert q4k and any(bytes(a.data) != bytes(b.data) for a, b in q4k)

    # again: nothing new; another imatrix: only the +imat row is made and measured again
    _, fin2 = run(model, TYPES, imatrix=imat)
    assert all(r["cached"] for r in fin2.stats["rows"])
    events, fin3 = run(model, ["Q8_0"], imatrix=other)
    assert [(r["type"], r["cached"]) for r in fin3.stats["rows"]] == [
        ("F16", True), ("Q8_0", True), ("Q8_0+imat", False)]
    quantized = [e.text for e in events if isinstance(e, Log) and "quantizing" in e.text]
    assert [q.split(":")[0] for q in quantized] == ["Q8_0+imat"]
    assert ggufpy.GGUFReader(fin3.stats["rows"][2]["file"]).fields[
        "quantize.imatrix.file"].contents() == other


def test_a_type_that_needs_an_imatrix_gets_only_its_imat_row_or_an_error(first, imatrices):
    from gguflab.quant.mixes import requires_imatrix

    model, _, _, _ = first
    mix = parse_mix("IQ2_XXS")
    assert requires_imatrix("blk.0.ffn_down.weight", mix.default_type, mix)
    with pytest.raises(UserError, match="requires an imatrix"):
        run(model, ["IQ2_XXS"])
    with pytest.raises(UserError, match="no such imatrix file"):
        run(model, ["Q8_0"], imatrix=str(model.parent / "missing.imatrix.gguf"))
    # planned, not measured: the Started event lists the rows the sweep will make
    gen = sweep_model(str(model), ["Q8_0", "IQ2_XXS"], None, n_ctx=N_CTX, chunks=CHUNKS,
                      imatrix=imatrices[0])
    started = next(gen)
    gen.close()
    assert started.info["types"] == ["Q8_0", "Q8_0+imat", "IQ2_XXS+imat"]
