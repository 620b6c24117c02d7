"""llama-quantize's whole command line against the reference tool: every ftype's per-tensor
plan (`llama-quantize --dry-run`) on SmolLM2 and synthetic dense and MoE models, with and
without an importance matrix; byte-identical files for --imatrix (with per-expert rows and
name filters), --tensor-type, --override-kv and --prune-layers; and its refusals."""

from __future__ import annotations

import filecmp
import re
import subprocess
import sys

import numpy as np
import pytest
from ggml_oracle import llama_quantize
from llama_tools import llama_tool, run_tool

from gguflab.errors import UserError
from gguflab.gguf import GGMLType, GGUFReader, ValueType
from gguflab.imatrix import Entry, Imatrix, save
from gguflab.quant.mixes import ALL_MIXES, parse_mix, parse_tensor_type
from gguflab.quant.pipeline import (
    QuantizeOptions,
    parse_kv_override,
    plan_model,
    prune_names,
    quantize_model,
)
from gguflab.synth import SynthConfig, write_synthetic_llama

FTYPES = [m.name for m in ALL_MIXES if m.alias_of is None]

# dense llama widths divisible by 256 with GQA 4 and without GQA, several layer counts (the
# i_layer/n_layer rules), a tied one, and MoE models with 8 and 4 experts
SYNTH = {
    "llama8": SynthConfig(n_layer=8, n_embd=256, n_ff=512, n_head=4, n_head_kv=1, n_vocab=256),
    "llama16": SynthConfig(n_layer=16, n_embd=256, n_ff=512, n_head=2, n_head_kv=2,
                           n_vocab=256, tied=True),
    "llama5": SynthConfig(n_layer=5, n_embd=256, n_ff=768, n_head=8, n_head_kv=2, n_vocab=256),
    "llama2": SynthConfig(n_layer=2, n_embd=256, n_ff=256, n_head=4, n_head_kv=1, n_vocab=256),
    "moe8": SynthConfig(n_layer=4, n_embd=256, n_ff=256, n_head=4, n_head_kv=2, n_vocab=256,
                        n_expert=8),
    "moe4": SynthConfig(n_layer=9, n_embd=256, n_ff=256, n_head=4, n_head_kv=4, n_vocab=256,
                        n_expert=4, arch="qwen3moe"),
}


@pytest.fixture(scope="module")
def models(module_tmp, smollm2):
    d = module_tmp("mixes")
    out = {"smollm2": smollm2}
    for name, c in SYNTH.items():
        out[name] = write_synthetic_llama(d / f"{name}.gguf", c)
    return out


def fake_imatrix(src: str, path, skip: tuple[str, ...] = (), seed: int = 0) -> str:
    """An imatrix file as llama-imatrix writes one for `src`'s matrices (but the token
    embeddings): positive sums, counts per expert (one expert saw no tokens)."""
    rng = np.random.default_rng(seed)
    entries = {}
    for t in GGUFReader(src).tensors:
        if len(t.shape) < 2 or t.name == "token_embd.weight" or "norm" in t.name \
                or "gate_inp" in t.name or any(s in t.name for s in skip):
            continue
        n_mat = t.shape[0] if len(t.shape) == 3 else 1
        sums = (rng.gamma(0.5, 4.0, (n_mat, t.shape[-1])) * 64).astype(np.float32)
        counts = np.full(n_mat, 64 * 2, np.float32)
        if n_mat > 1:
            counts[1] = 0
        entries[t.name] = Entry(sums, counts)
    save(Imatrix(entries, ["synthetic.txt"], 2, 64), path)
    return str(path)


@pytest.fixture(scope="module")
def imatrices(models, module_tmp):
    d = module_tmp("imatrix")
    return {k: fake_imatrix(v, d / f"{k}.imatrix.gguf") for k, v in models.items()}


_LINE = re.compile(r"\[\s*\d+/\s*\d+\]\s+(\S+)\s+- \[[^\]]*\], type =\s+(\S+), size =\s+[\d.]+ "
                   r"MiB(?: ->\s+[\d.]+ MiB \((\S+)\))?")


def reference_plan(src: str, ftype: str, *flags: str) -> list[tuple[str, str]]:
    """(tensor, type) in the order llama-quantize --dry-run prints them."""
    out = run_tool("llama-quantize", "--dry-run", *flags, src, ftype)
    plan = [(m.group(1), (m.group(3) or m.group(2)).lower()) for m in _LINE.finditer(out)]
    assert plan, out[-2000:]
    return plan


def our_plan(src: str, ftype: str, **kw) -> list[tuple[str, str]]:
    p = plan_model(GGUFReader(src), parse_mix(ftype), QuantizeOptions(dry_run=True, **kw))
    return [(t.name, t.dst_type.name.lower()) for t in p.tensors]


@pytest.mark.parametrize("model", ["smollm2", *SYNTH])
@pytest.mark.parametrize("ftype", FTYPES)
def test_plan_matches_dry_run(models, model, ftype):
    assert our_plan(models[model], ftype) == reference_plan(models[model], ftype)


# the rules that change with an importance matrix (IQ3_XXS attn_v/ffn_down, IQ4 ffn_down,
# Q4_0/Q5_0 ffn_down) and the low-bit ones that need it
@pytest.mark.parametrize("model", ["smollm2", "llama8", "llama16", "moe8"])
@pytest.mark.parametrize("ftype", ["IQ3_XXS", "IQ4_NL", "IQ4_XS", "Q4_0", "Q5_0", "IQ2_XXS",
                                   "IQ2_M", "IQ1_S", "Q2_K_S"])
def test_plan_with_imatrix_matches_dry_run(models, imatrices, model, ftype):
    im = imatrices[model]
    assert our_plan(models[model], ftype, imatrix=im) == \
        reference_plan(models[model], ftype, "--imatrix", im)


@pytest.mark.parametrize("flags, kw", [
    (["--tensor-type", "ATTN_V=q8_0", "--tensor-type", "blk\\.[0-3]\\.ffn=iq4_nl"],
     dict(tensor_types=[("attn_v", GGMLType.Q8_0), ("blk\\.[0-3]\\.ffn", GGMLType.IQ4_NL)])),
    (["--pure", "--tensor-type", "ffn_down=q2_k"],
     dict(pure=True, tensor_types=[("ffn_down", GGMLType.Q2_K)])),
    (["--token-embedding-type", "q8_0", "--tensor-type", "token_embd=q4_0"],
     dict(token_embedding_type=GGMLType.Q8_0, tensor_types=[("token_embd", GGMLType.Q4_0)])),
    (["--prune-layers", "0,3"], dict(prune_layers=[0, 3])),
])
@pytest.mark.parametrize("model", ["smollm2", "llama8", "moe8"])
def test_plan_options_match_dry_run(models, model, flags, kw):
    for ftype in ("Q3_K_M", "IQ2_XS", "Q4_K_M"):
        assert our_plan(models[model], ftype, **kw) == \
            reference_plan(models[model], ftype, *flags), ftype


# -- byte-identical files ------------------------------------------------------------------

def assert_same_file(ref, ours):
    if filecmp.cmp(ref, ours, shallow=False):
        return
    a, b = GGUFReader(ref), GGUFReader(ours)
    assert list(a.metadata) == list(b.metadata)
    for k in a.metadata:
        assert a.metadata[k].type == b.metadata[k].type, k
        assert a.metadata[k].to_python() == b.metadata[k].to_python(), k
    assert [(t.name, t.type.name, t.ne) for t in a] == [(t.name, t.type.name, t.ne) for t in b]
    bad = [t.name for t, u in zip(a, b) if bytes(t.raw) != bytes(u.raw)]
    raise AssertionError(f"{len(bad)} tensors differ, first: {bad[:5]}")


def gguflab(*args):
    return subprocess.run([sys.executable, "-m", "gguflab", *map(str, args)],
                          capture_output=True, text=True)


def both(src, tmp_path, ftype, *flags):
    """The same command line through llama-quantize and `gguflab quantize`."""
    ref, ours = tmp_path / "ref.gguf", tmp_path / "ours.gguf"
    run_tool("llama-quantize", *flags, src, ref, ftype, "2")
    r = gguflab("quantize", *flags, "--no-stats", src, ours, ftype, "2")
    assert r.returncode == 0, r.stderr
    assert_same_file(ref, ours)
    return GGUFReader(ours)


def test_tensor_type_overrides_are_byte_identical(models, tmp_path):
    # the first matching pattern wins; manual tensors do not advance the attn_v counter (the
    # next attn_v tensors get Q3_K_M's first-two Q5_K); a pattern's type falls back as any
    f = tmp_path / "types.txt"
    f.write_text("blk\\.0\\.attn_v=q8_0\n  ffn_up=q5_0 blk\\.1\\..*=q6_k\n")
    r = both(models["llama8"], tmp_path, "Q3_K_M", "--tensor-type", "blk\\.2\\.ffn_down=Q4_K",
             "--tensor-type", "ffn_down=q8_0", "--tensor-type-file", f)
    types = {t.name: t.type for t in r}
    assert types["blk.0.attn_v.weight"] == GGMLType.Q8_0
    assert types["blk.1.attn_v.weight"] == GGMLType.Q6_K  # blk\.1\. before the mix
    assert types["blk.2.attn_v.weight"] == GGMLType.Q5_K
    assert types["blk.2.ffn_down.weight"] == GGMLType.Q4_K
    assert types["blk.3.ffn_down.weight"] == GGMLType.Q8_0


def test_override_kv_is_byte_identical(models, tmp_path):
    r = both(models["llama8"], tmp_path, "Q8_0", "--override-kv", "general.name=str:renamed",
             "--override-kv", "llama.context_length=int:4096", "--override-kv",
             "test.ratio=float:0.25", "--override-kv", "test.flag=bool:true",
             "--override-kv", "test.neg=int:-7")
    assert r.get("general.name") == "renamed"
    assert r.metadata["llama.context_length"].type == ValueType.UINT32
    assert r.get("llama.context_length") == 4096
    assert r.get("test.neg") == 7  # llama-quantize writes an int as the uint32 of |value|
    assert list(r.metadata)[-5:] == ["general.name", "llama.context_length", "test.ratio",
                                     "test.flag", "test.neg"]


def test_prune_layers_is_byte_identical(models, tmp_path):
    r = both(models["llama5"], tmp_path, "Q4_K_M", "--prune-layers", "3,1,1")
    assert r.get("llama.block_count") == 3
    assert {t.name.split(".")[1] for t in r if t.name.startswith("blk.")} == {"0", "1", "2"}


@pytest.mark.parametrize("model, ftype, flags", [
    ("llama8", "Q4_K_M", []),
    ("llama2", "Q2_K", []),
    ("llama2", "Q2_K_S", []),  # refuses without an imatrix
    ("moe8", "Q4_K_M", []),  # one row of importance per expert, one with no tokens
    ("llama5", "Q5_0", ["--prune-layers", "0"]),  # renamed tensors look up their old names
    ("llama8", "Q4_K_M", ["--exclude-weights", "attn_v", "--exclude-weights", "ffn_up"]),
    ("llama8", "Q6_K", ["--include-weights", "blk.1."]),
])
def test_imatrix_is_byte_identical(models, imatrices, tmp_path, model, ftype, flags):
    r = both(models[model], tmp_path, ftype, "--imatrix", imatrices[model], *flags)
    assert r.get("quantize.imatrix.file") == imatrices[model]
    assert r.get("quantize.imatrix.dataset") == "synthetic.txt"
    assert r.get("quantize.imatrix.chunks_count") == 2


# a mix of each family that covers its types (the types' own tests cover every type; the
# plans of all the mixes are checked above)
IQ_MIXES = ["IQ2_XS", "IQ2_M", "IQ3_XS", "IQ3_M", "IQ4_XS", "TQ1_0"]


@pytest.mark.parametrize("ftype", IQ_MIXES)
def test_iquant_mixes_are_byte_identical(models, imatrices, tmp_path, ftype):
    """The i-quant and ternary mixes end to end, with an imatrix (and, where llama.cpp does
    not need one, without: IQ4's ffn_down then chooses another type)."""
    both(models["llama2"], tmp_path, ftype, "--imatrix", imatrices["llama2"])
    if ftype in ("IQ4_XS", "TQ1_0"):
        d = tmp_path / "plain"
        d.mkdir()
        both(models["llama2"], d, ftype)


def test_mxfp4_moe_is_byte_identical(models, tmp_path):
    r = both(models["moe8"], tmp_path, "MXFP4_MOE")
    assert {t.type for t in r if t.name.endswith("_exps.weight")} == {GGMLType.MXFP4}


def test_smollm2_imatrix_from_llama_imatrix(smollm2, tmp_path):
    """A real imatrix (llama-imatrix on SmolLM2, 2 chunks of 128): Q4_K_M and Q2_K files
    byte-identical to llama-quantize's."""
    f16 = tmp_path / "smol-f16.gguf"
    llama_quantize(smollm2, str(f16), int(parse_mix("F16").ftype), allow_requantize=True)
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"The {i}th line of a small text about llamas, quantization and "
                             "importance." for i in range(200)))
    im = tmp_path / "imatrix.gguf"
    run_tool("llama-imatrix", "-m", f16, "-f", text, "-o", im, "-c", "128", "--chunks", "2",
             "-t", "2")
    for ftype in ("Q4_K_M", "Q2_K"):
        d = tmp_path / ftype
        d.mkdir()
        both(str(f16), d, ftype, "--imatrix", im)


# -- refusals ------------------------------------------------------------------------------

def _one_line_error(r, *needles):
    assert r.returncode == 1, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gguflab: error:"), r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def _reference_fails(*args) -> str:
    p = subprocess.run([str(llama_tool("llama-quantize")), *map(str, args)],
                       capture_output=True, text=True)
    assert p.returncode != 0
    return p.stdout + p.stderr


@pytest.mark.parametrize("ftype", ["IQ2_XXS", "IQ1_M", "Q2_K_S"])
def test_low_bit_without_imatrix_is_refused(models, tmp_path, ftype):
    src = models["llama8"]
    ref = _reference_fails(src, tmp_path / "ref.gguf", ftype)
    m = re.search(r"offending tensor: (\S+)\s+- target type: (\S+)", ref)
    assert "this quantization requires an imatrix!" in ref
    _one_line_error(gguflab("quantize", src, tmp_path / "o.gguf", ftype),
                    "this quantization requires an imatrix!", f"offending tensor: {m.group(1)}",
                    f"target type: {m.group(2)}")
    assert not (tmp_path / "o.gguf").exists()


def test_imatrix_missing_a_needed_tensor(models, tmp_path):
    src = models["llama8"]
    im = fake_imatrix(src, tmp_path / "partial.gguf", skip=("blk.2.ffn_up",))
    ref = _reference_fails("--imatrix", im, src, tmp_path / "ref.gguf", "Q2_K_S")
    msg = "Missing importance matrix for tensor blk.2.ffn_up.weight in a very low-bit quantization"
    assert msg in ref
    _one_line_error(gguflab("quantize", "--imatrix", im, src, tmp_path / "o.gguf", "Q2_K_S"), msg)
    assert not (tmp_path / "o.gguf").exists()


def test_imatrix_of_another_model(models, imatrices, tmp_path):
    src = models["llama5"]  # n_ff 768: the imatrix of llama8 (n_ff 512) does not fit ffn_down
    ref = _reference_fails("--imatrix", imatrices["llama8"], src, tmp_path / "r.gguf", "Q4_K_M")
    msg = "imatrix size 512 is different from tensor size 768 for blk.0.ffn_down.weight"
    assert msg in ref
    _one_line_error(gguflab("quantize", "--imatrix", imatrices["llama8"], src,
                            tmp_path / "o.gguf", "Q4_K_M"), msg)


@pytest.mark.parametrize("flags, needle", [
    (["--tensor-type", "attn_(=q8_0"], "bad regular expression"),
    (["--tensor-type", "attn_q=q9_9"], "invalid quantization type 'q9_9'"),
    (["--tensor-type", "attn_q"], "malformed tensor type"),
    (["--tensor-type", "=q8_0"], "missing tensor name"),
    (["--tensor-type-file", "/nonexistent/types.txt"], "failed to open"),
    (["--override-kv", "general.name=text:x"], "invalid type for KV override"),
    (["--override-kv", "general.name"], "malformed KV override"),
    (["--override-kv", "test.flag=bool:yes"], "invalid boolean value"),
    (["--override-kv", "test.n=int:many"], "is not a number"),
    (["--prune-layers", "1,x"], "invalid layer id 'x'"),
    (["--imatrix", "x.gguf", "--include-weights", "a", "--exclude-weights", "b"],
     "cannot be used together"),
])
def test_bad_options_one_line(models, tmp_path, flags, needle):
    _one_line_error(gguflab("quantize", *flags, models["llama8"], tmp_path / "o.gguf", "Q4_K_M"),
                    needle)
    assert not (tmp_path / "o.gguf").exists()


def test_parsers():
    assert parse_tensor_type("ATTN_Q=Q4_k") == ("attn_q", GGMLType.Q4_K)
    key, v = parse_kv_override("a.b=int:-5")
    assert key == "a.b" and v.type == ValueType.UINT32 and v.value == 5
    with pytest.raises(UserError, match="127"):
        parse_kv_override("a.b=str:" + "x" * 128)
    names = [f"blk.{i}.attn_q.weight" for i in range(5)] + ["output.weight"]
    renamed, n = prune_names(names, [1, 3])
    assert n == 3
    assert [renamed[x] for x in names] == ["blk.0.attn_q.weight", None, "blk.1.attn_q.weight",
                                           None, "blk.2.attn_q.weight", "output.weight"]


def test_imatrix_events_and_dry_run_warning(models, imatrices, tmp_path):
    """A dry run of a low-bit mix without an imatrix says it will need one; with one, every
    converted tensor gets its importance rows."""
    dry = list(quantize_model(models["llama8"], None, parse_mix("IQ2_XXS"),
                              QuantizeOptions(dry_run=True)))
    assert any("will require an imatrix" in getattr(e, "text", "") for e in dry)
    plan = plan_model(GGUFReader(models["moe8"]), parse_mix("Q4_K_M"),
                      QuantizeOptions(imatrix=imatrices["moe8"]))
    exps = next(p for p in plan.tensors if p.name == "blk.0.ffn_down_exps.weight")
    assert exps.importance.shape == (8, 256)
    assert np.all(exps.importance[1] == 1)  # the expert that saw no tokens
