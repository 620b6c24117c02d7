"""The Jobs pane and the job dialogs driven by key presses, with a real JobManager running
real quantize jobs in worker processes on tiny synthetic models. The oracles: the files on
disk (read back with GGUFReader), the dry-run plan of the same model, the job's own events."""

from __future__ import annotations

import asyncio
import os
import time

import pytest
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.widgets import DataTable, Footer, RichLog, Static

from gguflab.catalog import embedded_model
from gguflab.convert.pipeline import default_outfile
from gguflab.events import Event, Finished, TensorDone
from gguflab.fmt import size
from gguflab.gguf import GGUFReader
from gguflab.jobs import JobManager
from gguflab.quant.mixes import parse_mix
from gguflab.quant.pipeline import QuantizeOptions, plan_model
from gguflab.synth import SynthConfig, write_synthetic_llama
from gguflab.tui.widgets.dialogs import (
    ConvertDialog,
    PerplexityDialog,
    QuantizeDialog,
    SweepDialog,
    default_quant_output,
    quant_mixes,
)
from gguflab.tui.widgets.jobs import BarChart, JobsPane
from gguflab.tui.widgets.plots import BLOCKS, progress_bar, vbars, worst

TINY = SynthConfig(n_layer=1, n_embd=256, n_ff=512, n_head=4, n_head_kv=2, n_vocab=512)


class JobsApp(App):
    """The smallest app around the pane: `k` opens the quantize dialog on one model."""

    BINDINGS = [Binding("k", "quantize", "Quantize"), Binding("p", "perplexity", "PPL"),
                Binding("w", "sweep", "Sweep"), Binding("v", "convert", "Convert")]

    def __init__(self, manager: JobManager, model: str, submit: bool = True) -> None:
        super().__init__()
        self.manager = manager
        self.model = model
        self.submit = submit  # False: only record the dialogs' specs
        self.seen: list[Event] = []  # every JobEvent message the pane posted
        self.specs: list = []

    def compose(self) -> ComposeResult:
        yield JobsPane(self.manager)
        yield Footer()

    def _submit(self, spec) -> None:
        self.specs.append(spec)
        if spec is not None and spec.kind == "quantize" and self.submit:
            self.manager.submit(spec)

    def action_quantize(self) -> None:
        self.push_screen(QuantizeDialog(self.model), self._submit)

    def action_perplexity(self) -> None:
        self.push_screen(PerplexityDialog(self.model), self._submit)

    def action_sweep(self) -> None:
        self.push_screen(SweepDialog(self.model), self._submit)

    def action_convert(self) -> None:
        self.push_screen(ConvertDialog(os.path.dirname(self.model)), self._submit)

    def on_jobs_pane_job_event(self, message: JobsPane.JobEvent) -> None:
        self.seen.append(message.event)


async def wait_for(pilot, condition, timeout: float = 60.0, what: str = "") -> None:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await pilot.pause(0.05)


async def choose_mix(pilot, dialog: QuantizeDialog, name: str) -> None:
    """Move the type list's highlight to `name` with arrow keys."""
    target = [m.name for m in quant_mixes()].index(name)
    types = dialog.query_one("#types")
    key = "down" if target > types.highlighted else "up"
    for _ in range(abs(target - types.highlighted)):
        await pilot.press(key)
    assert dialog.mix.name == name


def squash(text: str) -> str:
    return "".join(text.split())


def log_text(app: App) -> str:
    """The log as one string without whitespace (compare with `squash`): a line wrapped at a
    space loses that space, and where the wraps fall depends on the paths logged."""
    return squash("".join(line.text for line in app.query_one("#job-log", RichLog).lines))


def test_quantize_through_dialog(tmp_path):
    src = write_synthetic_llama(tmp_path / "tiny.gguf", TINY)
    dst = default_quant_output(src, "Q8_0")
    plan = plan_model(GGUFReader(src), parse_mix("Q8_0"), QuantizeOptions(dry_run=True))
    manager = JobManager()

    async def run() -> None:
        app = JobsApp(manager, src)
        async with app.run_test(size=(120, 40)) as pilot:
            await pilot.press("k")
            dialog = app.screen
            assert isinstance(dialog, QuantizeDialog)
            await choose_mix(pilot, dialog, "Q8_0")
            await wait_for(pilot, lambda: "Q8_0" in dialog.estimates, 20, "the estimate")
            await pilot.pause()
            # the dialog shows this model's dry-run size, and the default output name
            assert size(plan.dst_bytes) in str(dialog.query_one("#estimate", Static).content)
            assert dialog.query_one("#output").value == dst
            await pilot.press("enter")
            assert not isinstance(app.screen, QuantizeDialog)
            assert len(manager.jobs) == 1
            job = manager.jobs[0]
            await wait_for(pilot, lambda: job.done, 60, "the job")
            await pilot.pause(0.3)  # a tick or two for the pane to catch up

            assert job.state == "finished", job.error
            table = app.query_one("#jobs-table", DataTable)
            assert "100%" in str(table.get_cell("1", "progress"))
            assert str(table.get_cell("1", "state")) == "finished"
            # every event reached the log's source, in order, as JobEvent messages
            assert app.seen == job.events
            text = log_text(app)
            assert squash("started quantize") in text and squash(f"finished: {dst}") in text
            tensors = [e for e in job.events if isinstance(e, TensorDone)]
            assert all(f"]{t.name.removesuffix('.weight')}" in text for t in tensors)
            # the histogram is the last quantized tensor's, the RMSE chart has every tensor
            last = [t for t in tensors if t.hist][-1]
            assert app.query_one("#hist", BarChart).values == [float(v) for v in last.hist]
            assert app.query_one("#weights", BarChart).values == [
                float(v) for v in last.weights["counts"]]
            rmse = [t.rmse for t in tensors if t.rmse is not None]
            assert app.query_one("#rmse", BarChart).values == rmse
            top = worst([(t.name, t.rmse) for t in tensors if t.rmse is not None], 1)[0]
            assert top[0].removesuffix(".weight") in str(app.query_one("#worst").content)
            assert any(ch in "".join(vbars(last.hist, 30, 5)) for ch in BLOCKS[1:])
            status = str(app.query_one("#job-status", Static).content)
            assert "finished" in status and dst in status

    asyncio.run(run())
    # the file: a valid GGUF with the planned types, as big as the dialog said
    out = GGUFReader(dst)
    planned = {p.name: p.dst_type for p in plan.tensors}
    assert {t.name: t.type for t in out.tensors} == planned
    assert sum(t.nbytes for t in out.tensors) == plan.dst_bytes
    assert not os.path.exists(dst + ".partial")
    assert isinstance(manager.jobs[0].events[-1], Finished)


def test_cancel_running_job(tmp_path):
    # big enough (Q2_K on one thread) that it is still running when `x` is pressed
    src = write_synthetic_llama(tmp_path / "big.gguf",
                                SynthConfig(n_layer=8, n_embd=512, n_ff=1536, n_vocab=4096))
    from gguflab.jobs import JobSpec

    dst = str(tmp_path / "big-Q2_K.gguf")
    manager = JobManager()

    async def run() -> None:
        app = JobsApp(manager, src)
        async with app.run_test(size=(80, 24)) as pilot:
            job = manager.submit(JobSpec("quantize", {"src": src, "dst": dst, "mix": "Q2_K",
                                                      "options": {"threads": 1}}))
            await wait_for(pilot, lambda: job.last_tensor is not None, 60, "the first tensor")
            assert os.path.exists(dst + ".partial")  # there is something to clean up
            app.query_one("#jobs-table").focus()
            await pilot.press("x")
            await wait_for(pilot, lambda: job.done, 30, "the cancel")
            await pilot.pause(0.3)
            assert job.state == "cancelled"
            table = app.query_one("#jobs-table", DataTable)
            assert str(table.get_cell("1", "state")) == "cancelled"
            assert job.last_tensor.index < job.last_tensor.total

    asyncio.run(run())
    assert sorted(os.listdir(tmp_path)) == ["big.gguf"]  # no target, no .partial


def test_failed_job_shows_error_and_ui_goes_on(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + bytes(range(256)) * 4)  # a header that lies
    with pytest.raises(Exception) as info:
        GGUFReader(bad)
    expected = str(info.value)
    manager = JobManager()

    async def run() -> None:
        app = JobsApp(manager, str(bad))
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.press("k")
            dialog = app.screen
            assert isinstance(dialog, QuantizeDialog)
            estimate = dialog.query_one("#estimate", Static)
            await wait_for(pilot, lambda: "cannot read" in str(estimate.content), 20, "error")
            assert expected in str(estimate.content)
            await pilot.press("enter")  # start it anyway: the job must fail cleanly
            job = manager.jobs[0]
            await wait_for(pilot, lambda: job.done, 60, "the job")
            await pilot.pause(0.3)
            assert job.state == "failed" and job.error == expected
            status = str(app.query_one("#job-status", Static).content)
            assert status == f"#1 failed: {expected}"
            assert squash(f"failed: {expected}") in log_text(app)
            # the UI still works: a dialog opens and Escape closes it without a job
            await pilot.press("k")
            assert isinstance(app.screen, QuantizeDialog)
            await pilot.press("escape")
            assert not isinstance(app.screen, QuantizeDialog)
            assert app.specs[-1] is None and len(manager.jobs) == 1
            await pilot.press("x")  # nothing running: a notice, no crash
            await pilot.pause()

    asyncio.run(run())
    assert sorted(os.listdir(tmp_path)) == ["bad.gguf"]


def test_dialogs_validate_and_build_specs(tmp_path):
    src = write_synthetic_llama(tmp_path / "tiny.gguf", TINY)
    existing = default_quant_output(src, "Q4_K_M")
    open(existing, "wb").close()
    manager = JobManager()

    async def run() -> None:
        app = JobsApp(manager, src, submit=False)
        async with app.run_test(size=(80, 24)) as pilot:
            # an existing output needs --force: one error line, the dialog stays
            await pilot.press("k")
            dialog = app.screen
            await pilot.press("ctrl+s")
            assert dialog is app.screen
            assert "exists" in str(dialog.query_one("#error", Static).content)
            dialog.query_one("#force").value = True
            await pilot.press("ctrl+s")
            spec = app.specs[-1]
            assert spec.params["dst"] == existing and spec.params["mix"] == "Q4_K_M"
            assert spec.params["options"]["overwrite"] is True

            # perplexity: a bad number is refused, then the defaults are taken
            await pilot.press("p")
            dialog = app.screen
            dialog.query_one("#ctx").value = "lots"
            await pilot.press("ctrl+s")
            assert "not a whole number" in str(dialog.query_one("#error", Static).content)
            dialog.query_one("#ctx").value = "128"
            await pilot.press("enter")  # Enter in a field starts the job
            spec = app.specs[-1]
            assert spec.kind == "perplexity" and spec.params["n_ctx"] == 128
            assert os.path.isfile(spec.params["text_file"])
            assert spec.params["kld_base"] is None and spec.params["chunks"] == -1

            # sweep: the default types in llama.cpp's order, the VRAM as bytes
            await pilot.press("w")
            dialog = app.screen
            dialog.query_one("#vram").value = "512M"
            await pilot.press("ctrl+s")
            spec = app.specs[-1]
            from gguflab.sweep import DEFAULT_TYPES

            assert sorted(spec.params["types"]) == sorted(DEFAULT_TYPES)
            assert spec.params["vram_bytes"] == 512 << 20

            # convert: the output name follows the type until it is edited
            folder = os.path.dirname(src)
            await pilot.press("v")
            dialog = app.screen
            await pilot.pause()
            assert dialog.query_one("#output").value == default_outfile(folder, "f16")
            await pilot.press("down")
            assert dialog.query_one("#output").value == default_outfile(folder, "bf16")
            await pilot.press("enter")
            spec = app.specs[-1]
            assert spec.kind == "convert" and spec.params["folder"] == folder
            assert spec.params["options"]["outtype"] == "bf16"
            assert spec.params["outfile"] == default_outfile(folder, "bf16")

    asyncio.run(run())
    assert not manager.jobs


def test_dialog_closed_while_estimating():
    # SmolLM2's 19 dry-run plans take long enough that they finish after the dialog closed
    manager = JobManager()

    async def run() -> None:
        app = JobsApp(manager, embedded_model())
        async with app.run_test(size=(80, 24)) as pilot:
            for i in range(5):  # close it at different moments of the estimating
                await pilot.press("k")
                await pilot.pause(0.02 * i)
                await pilot.press("escape")
            await pilot.pause(0.5)
            assert app.specs == [None] * 5 and not manager.jobs
            await pilot.press("k")  # the app is alive and a new dialog reads the model again
            requant = app.screen.query_one("#requant")
            await wait_for(pilot, lambda: requant.value, 20, "the source's type")  # Q4_1

    asyncio.run(run())


def test_vbars_heights_follow_values():
    values = [0, 1, 2, 3, 5, 8, 13, 21]
    for height in (1, 3, 5):
        lines = vbars(values, 16, height)
        assert len(lines) == height and all(len(line) == 16 for line in lines)
        for i, v in enumerate(values):
            col = 2 * i  # each value gets 16 // 8 = 2 columns
            eighths = sum(BLOCKS.index(line[col]) for line in lines)
            assert abs(eighths - v / max(values) * height * 8) <= 0.5
    # more values than columns: the max of each bucket survives
    many = [0.0] * 100
    many[37] = 1.0
    assert "█" in "".join(vbars(many, 10, 1))


def test_progress_bar():
    for f in (0.0, 0.25, 0.5, 1.0):
        bar = progress_bar(f, 12)
        filled = bar.count("█")
        assert filled == int(f * 12) and bar.endswith(f"{f * 100:3.0f}%")
