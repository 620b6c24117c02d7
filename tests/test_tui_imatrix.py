"""The imatrix loop in the TUI, driven by key presses: `i` collects an importance matrix as a
job, the quantize dialog finds it beside the model and hands it to the job, the type picker
lists every ftype and marks (and refuses without an imatrix) those that need one. The
oracles: the files on disk (read back with `gguflab.imatrix.load` and gguf-py), the same
collection run in this process, the dry-run plan, llama.cpp's per-tensor rule."""

from __future__ import annotations

import asyncio
import os
import time

import gguf as ggufpy
import numpy as np
from textual.widgets import Checkbox, Input, OptionList, SelectionList, Static

from gguflab.catalog import default_eval_text
from gguflab.errors import UserError
from gguflab.gguf import GGMLType, GGUFReader
from gguflab.imatrix import Entry, Imatrix, load, save
from gguflab.imatrix.collect import collect_imatrix
from gguflab.quant import REGISTRY
from gguflab.quant.mixes import ALL_MIXES
from gguflab.quant.pipeline import QuantizeOptions, plan_model
from gguflab.synth import SynthConfig, write_synthetic_llama
from gguflab.tui.app import GgufLabApp
from gguflab.tui.widgets.browser import ModelBrowser
from gguflab.tui.widgets.dialogs import (
    ImatrixDialog,
    QuantizeDialog,
    SweepDialog,
    find_imatrix,
    quant_mixes,
)

N_CTX, CHUNKS = 64, 2
TINY = SynthConfig(n_layer=1, n_embd=256, n_ff=512, n_head=4, n_head_kv=2, n_vocab=512)


async def until(pilot, cond, timeout: float = 60.0, what: str = "the app") -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        await pilot.pause(0.05)


def error_line(dialog) -> str:
    return str(dialog.query_one("#error", Static).content)


def test_imatrix_key_collects_then_quantize_uses_it(tmp_path, smollm2):
    """The walk: `i` on a model, a small context, the job writes <stem>.imatrix.gguf (the
    same file the core writes); `k` then offers it, and the quantized file records it."""
    model = write_synthetic_llama(
        tmp_path / "tiny.gguf",
        SynthConfig(n_layer=1, n_embd=64, n_ff=128, n_head=4, n_head_kv=2,
                    tokenizer_from=smollm2))
    imat = str(tmp_path / "tiny.imatrix.gguf")
    out = str(tmp_path / "tiny-Q4_K_M.gguf")

    async def run() -> None:
        app = GgufLabApp([str(tmp_path)])
        async with app.run_test(size=(120, 40)) as pilot:
            browser = app.query_one(ModelBrowser)
            await until(pilot, lambda: browser.table.row_count == 1)
            assert "imatrix" in {b.binding.action for b in app.screen.active_bindings.values()}
            await pilot.press("i")
            await until(pilot, lambda: isinstance(app.screen, ImatrixDialog))
            dialog = app.screen
            assert dialog.query_one("#text", Input).value == default_eval_text()
            assert dialog.query_one("#ctx", Input).value == "512"
            assert dialog.query_one("#output", Input).value == imat
            dialog.query_one("#ctx", Input).value = str(N_CTX)
            dialog.query_one("#chunks", Input).value = str(CHUNKS)
            await pilot.press("ctrl+s")
            await until(pilot, lambda: len(app.manager.jobs) == 1)
            job = app.manager.jobs[0]
            assert job.spec.kind == "imatrix"
            await until(pilot, lambda: job.done, 120, "the imatrix job")
            assert job.state == "finished", job.error
            assert job.result.path == imat and job.result.stats["chunks"] == CHUNKS
            # the Jobs pane showed its progress and log like any job's
            await pilot.pause(0.3)
            log = "".join(line.text for line in app.query_one("#job-log").lines)
            assert "started imatrix" in log and f"finished: {imat}" in log
            assert "Final estimate: PPL" in log
            # the browser lists the imatrix as such; the cursor stays on the model
            await pilot.press("1")
            await until(pilot, lambda: browser.table.row_count == 2)
            kinds = {os.path.basename(e.path): e.kind for e in browser.entries}
            assert kinds == {"tiny.gguf": "gguf", "tiny.imatrix.gguf": "imatrix"}
            assert app.selected.path == model
            browser.select_path(imat)
            await until(pilot, lambda: app.selected.path == imat)
            assert app.check_action("quantize", ()) is None  # not a model: dimmed
            browser.select_path(model)
            await until(pilot, lambda: app.selected.path == model)

            # quantize: the imatrix is found and on; the job gets it and says so
            await pilot.press("k")
            await until(pilot, lambda: isinstance(app.screen, QuantizeDialog))
            dialog = app.screen
            await pilot.pause()
            assert dialog.query_one("#imatrix", Input).value == imat
            assert dialog.query_one("#use-imatrix", Checkbox).value
            assert dialog.mix.name == "Q4_K_M"
            await pilot.press("ctrl+s")
            await until(pilot, lambda: len(app.manager.jobs) == 2)
            qjob = app.manager.jobs[1]
            assert qjob.spec.params["options"]["imatrix"] == imat
            assert "+imatrix tiny.imatrix.gguf" in qjob.spec.title
            await until(pilot, lambda: qjob.done, 120, "the quantize job")
            assert qjob.state == "finished", qjob.error
            await pilot.pause(0.3)
            log = "".join(line.text for line in app.query_one("#job-log").lines)
            assert f"importance matrix entries from {imat}" in log
            await pilot.press("1", "q")

    asyncio.run(run())
    # the job's imatrix loads, and equals what the core collects with the same settings
    ours = load(imat)
    ref_path = str(tmp_path / "ref.imatrix.gguf")
    list(collect_imatrix(model, default_eval_text(), ref_path, N_CTX, CHUNKS))
    ref = load(ref_path)
    assert ours.chunk_count == ref.chunk_count == CHUNKS and ours.chunk_size == N_CTX
    assert sorted(ours.entries) == sorted(ref.entries) and "blk.0.attn_q.weight" in ours.entries
    for name, e in ref.entries.items():
        np.testing.assert_array_equal(ours.entries[name].in_sum2, e.in_sum2)
        np.testing.assert_array_equal(ours.entries[name].counts, e.counts)
    # the quantized file records the imatrix, as llama-quantize --imatrix does
    r = ggufpy.GGUFReader(out)
    assert r.fields["quantize.imatrix.file"].contents() == imat
    assert r.fields["quantize.imatrix.entries_count"].contents() == len(ours.entries)
    assert r.fields["quantize.imatrix.chunks_count"].contents() == CHUNKS


def fake_imatrix(model: str, path: str, fmt: str = "gguf") -> None:
    """An importance matrix of ones for every weight of `model` (what matters here is that
    it exists and covers every tensor)."""
    r = GGUFReader(model)
    entries = {t.name: Entry(np.ones((1, t.ne[0]), np.float32), np.ones(1, np.float32))
               for t in r.tensors if t.name.startswith("blk.") and len(t.shape) == 2}
    save(Imatrix(entries, ["test"], 1, N_CTX), path, fmt)


def recording_app(folder: str) -> GgufLabApp:
    """The app, with the dialogs' specs recorded in `app.specs` instead of run."""
    app = GgufLabApp([folder])
    app.specs = []
    app.submit = app.specs.append
    return app


def test_picker_marks_imatrix_types_and_refuses_them_without_one(tmp_path, monkeypatch):
    model = write_synthetic_llama(tmp_path / "tiny.gguf", TINY)
    dst = str(tmp_path / "tiny-IQ2_XXS.gguf")
    # a type whose module has not landed: greyed, never offered
    monkeypatch.delitem(REGISTRY, GGMLType.TQ1_0)
    names = [m.name for m in quant_mixes()]
    assert names == [m.name for m in ALL_MIXES if m.alias_of is None]
    for n in ("IQ2_XXS", "IQ1_S", "IQ4_XS", "TQ2_0", "MXFP4_MOE", "Q4_K_M"):
        assert n in names

    async def picked(pilot, dialog, name: str) -> None:
        dialog.query_one("#types", OptionList).highlighted = names.index(name)
        await pilot.pause()
        assert dialog.mix.name == name

    async def run() -> None:
        app = recording_app(str(tmp_path))
        async with app.run_test(size=(120, 40)) as pilot:
            browser = app.query_one(ModelBrowser)
            await until(pilot, lambda: browser.table.row_count == 1)
            await pilot.press("k")
            await until(pilot, lambda: isinstance(app.screen, QuantizeDialog))
            dialog = app.screen
            types = dialog.query_one("#types", OptionList)
            await until(pilot, lambda: len(dialog.estimates) == len(names) - 1, 60,
                        "every estimate")
            assert not dialog.query_one("#use-imatrix", Checkbox).value  # none beside it
            # marks: exactly the types the pipeline itself refuses to make without an imatrix
            r = GGUFReader(model)
            for m in quant_mixes():
                if m.name == "TQ1_0":
                    continue
                try:
                    plan_model(r, m, QuantizeOptions())
                    need = False
                except UserError as e:
                    need = "requires an imatrix" in str(e)
                    if not need:  # impossible for this model: the estimate says so
                        assert dialog.estimates[m.name].startswith("not possible"), m.name
                        continue
                assert dialog.needs_imatrix[m.name] == need, m.name
                prompt = str(types.get_option(m.name).prompt)
                assert (" needed " in prompt) == need, prompt
            assert dialog.needs_imatrix["IQ2_XXS"] and not dialog.needs_imatrix["Q4_K_M"]
            assert types.get_option("TQ1_0").disabled
            assert "not in gguflab yet" in str(types.get_option("TQ1_0").prompt)
            await picked(pilot, dialog, "TQ1_0")
            await pilot.press("ctrl+s")
            assert "cannot quantize to TQ1_0 yet" in error_line(dialog)
            # refused without an imatrix, with one line saying why
            await picked(pilot, dialog, "IQ2_XXS")
            await pilot.press("ctrl+s")
            assert app.screen is dialog and not app.specs
            assert error_line(dialog) == (
                "IQ2_XXS needs an importance matrix; none found beside the model: press i "
                "on the model to make one")
            # a type that does not need one goes through without it
            await picked(pilot, dialog, "Q8_0")
            await pilot.press("ctrl+s")
            assert app.specs[-1].params["mix"] == "Q8_0"
            assert "imatrix" not in app.specs[-1].params["options"]

            # with an imatrix beside the model: found, on by default, passed; turned off,
            # the type is refused again
            fake_imatrix(model, str(tmp_path / "imatrix.dat"), "dat")  # llama-imatrix's old name
            fake_imatrix(model, str(tmp_path / "tiny.imatrix.gguf"))
            assert find_imatrix(model) == str(tmp_path / "tiny.imatrix.gguf")
            await until(pilot, lambda: len(app.screen_stack) == 1)
            await pilot.press("k")
            await until(pilot, lambda: isinstance(app.screen, QuantizeDialog))
            dialog = app.screen
            await pilot.pause()
            use = dialog.query_one("#use-imatrix", Checkbox)
            assert use.value
            await picked(pilot, dialog, "IQ2_XXS")
            use.value = False
            await pilot.press("ctrl+s")
            assert error_line(dialog) == "IQ2_XXS needs an importance matrix; it is turned off"
            use.value = True
            await pilot.press("ctrl+s")
            spec = app.specs[-1]
            assert spec.params["mix"] == "IQ2_XXS" and spec.params["dst"] == dst
            assert spec.params["options"]["imatrix"] == str(tmp_path / "tiny.imatrix.gguf")
            await pilot.press("q")

    asyncio.run(run())


def test_imatrix_dialog_validates(tmp_path):
    model = write_synthetic_llama(tmp_path / "tiny.gguf", TINY)
    existing = tmp_path / "tiny.imatrix.gguf"
    existing.write_bytes(b"old")

    async def run() -> None:
        app = recording_app(str(tmp_path))
        async with app.run_test(size=(80, 24)) as pilot:
            browser = app.query_one(ModelBrowser)
            await until(pilot, lambda: browser.table.row_count == 2)
            browser.select_path(model)
            await until(pilot, lambda: app.selected is not None and app.selected.path == model)
            await pilot.press("i")
            await until(pilot, lambda: isinstance(app.screen, ImatrixDialog))
            dialog = app.screen
            await pilot.press("ctrl+s")
            assert "exists: tick overwrite" in error_line(dialog)
            dialog.query_one("#force", Checkbox).value = True
            dialog.query_one("#chunks", Input).value = "0"
            await pilot.press("ctrl+s")
            assert "0 collects nothing" in error_line(dialog)
            dialog.query_one("#chunks", Input).value = "3"
            dialog.query_one("#output", Input).value = str(tmp_path / "x.dat")
            await pilot.press("enter")
            spec = app.specs[-1]
            assert spec.kind == "imatrix" and spec.params == {
                "model": model, "text_file": default_eval_text(),
                "output": str(tmp_path / "x.dat"), "n_ctx": 512, "chunks": 3,
                "output_format": "dat"}

            # the sweep dialog takes the imatrix found beside the model too, and refuses a
            # type that needs one without it
            await until(pilot, lambda: len(app.screen_stack) == 1)
            await pilot.press("s")
            await until(pilot, lambda: isinstance(app.screen, SweepDialog))
            dialog = app.screen
            assert dialog.query_one("#imatrix", Input).value == str(existing)
            await pilot.press("ctrl+s")
            assert app.specs[-1].kind == "sweep"
            assert app.specs[-1].params["imatrix"] == str(existing)
            await until(pilot, lambda: len(app.screen_stack) == 1)
            await pilot.press("s")
            await until(pilot, lambda: isinstance(app.screen, SweepDialog))
            dialog = app.screen
            dialog.query_one("#types", SelectionList).select("IQ2_XXS")
            dialog.query_one("#imatrix", Input).value = ""
            await pilot.press("ctrl+s")
            assert error_line(dialog) == ("IQ2_XXS needs an importance matrix: give one, or "
                                          "untick it")
            assert len(app.specs) == 2
            await pilot.press("q")

    asyncio.run(run())


def test_cancelled_imatrix_job_leaves_no_partial_and_a_loadable_file(tmp_path, smollm2):
    """`x` in the Jobs pane cancels through the manager: the job keeps its whole chunks (as
    llama-imatrix on Ctrl-C), no .partial is left."""
    from gguflab.events import Progress
    from gguflab.jobs import JobManager, JobSpec

    model = write_synthetic_llama(
        tmp_path / "tiny.gguf",
        SynthConfig(n_layer=1, n_embd=64, n_ff=128, n_head=4, n_head_kv=2,
                    tokenizer_from=smollm2))
    out = str(tmp_path / "tiny.imatrix.gguf")
    manager = JobManager()
    job = manager.submit(JobSpec("imatrix", {"model": model, "text_file": default_eval_text(),
                                             "output": out, "n_ctx": N_CTX, "chunks": -1}))
    end = time.monotonic() + 120
    while not any(isinstance(e, Progress) for e in job.events):
        assert not job.done and time.monotonic() < end, job.error
        manager.poll()
        time.sleep(0.02)
    manager.cancel(job)
    manager.wait(job, 60)
    assert job.state == "cancelled"
    assert not os.path.exists(out + ".partial")
    done = max(e.done for e in job.events if isinstance(e, Progress))
    assert done < job.started.total
    im = load(out)
    assert 1 <= im.chunk_count <= done + 1 and "blk.0.attn_q.weight" in im.entries
