"""The Sweep pane as a widget: rows from sweep jobs' Measured events (fed directly, and
routed by the Jobs pane), sorting by any column from the keyboard, "open in chat" on a row,
and the size-vs-quality plot that `gguflab sweep` draws."""

from __future__ import annotations

import asyncio

import pytest
from textual.app import App, ComposeResult
from textual.widgets import DataTable, Static

from gguflab.events import Measured
from gguflab.fmt import size
from gguflab.jobs import Job, JobManager, JobSpec
from gguflab.tui.widgets.jobs import JobsPane
from gguflab.tui.widgets.sweep import SweepPane
from gguflab.tui.widgets.sweep.pane import COLUMNS


def sweep_rows(tmp_path) -> list[dict]:
    """Rows with every field `gguflab sweep` writes, for files that exist."""
    rows = []
    figures = [("F16", 2_000_000, 16.0, 10.0, 0.0, 0.0, True),
               ("Q8_0", 1_100_000, 8.5, 10.01, 0.01, 0.0004, False),
               ("Q4_K_M", 700_000, 4.9, 10.3, 0.3, 0.02, False),
               ("Q2_K", 500_000, 3.2, 12.5, 2.5, 0.31, False)]
    for t, nbytes, bpw, ppl, dppl, kld, base in figures:
        path = tmp_path / f"m-{t}.gguf"
        path.write_bytes(b"x")
        rows.append({"type": t, "file": str(path), "size_bytes": nbytes, "bpw": bpw,
                     "ppl": ppl, "ppl_err": 0.1, "delta_ppl": dppl, "mean_kld": kld,
                     "kld_err": 0.001, "same_top_p": 1 - kld, "pp_tps": 100.0,
                     "tg_tps": 20.0, "fits": None, "cached": False, "is_base": base})
    return rows


class SweepApp(App):
    def __init__(self, manager: JobManager | None = None, forward: bool = False) -> None:
        super().__init__()
        self.manager = manager
        self.forward = forward
        self.opened: list[str] = []

    def compose(self) -> ComposeResult:
        if self.manager is not None:
            yield JobsPane(self.manager)
        yield SweepPane()

    def action_open_in_chat(self, path: str) -> None:
        self.opened.append(path)

    def on_jobs_pane_job_event(self, message: JobsPane.JobEvent) -> None:
        # what an app may also do: forward events; the pane must not add a row twice
        if self.forward:
            self.query_one(SweepPane).handle_job_event(message.job, message.event)


def files_in_order(pane: SweepPane) -> list[str]:
    table = pane.query_one("#sweep-table", DataTable)
    return [table.coordinate_to_cell_key((r, 0)).row_key.value for r in range(table.row_count)]


def test_sweep_pane_fills_sorts_and_opens(tmp_path):
    rows = sweep_rows(tmp_path)
    job = Job(1, JobSpec("sweep", {"model": rows[0]["file"]}))
    other = Job(2, JobSpec("quantize", {"src": "a", "dst": "b", "mix": "Q8_0"}))

    async def run() -> None:
        app = SweepApp()
        async with app.run_test(size=(100, 36)) as pilot:
            pane = app.query_one(SweepPane)
            events = [Measured(r["type"], r) for r in rows]
            for ev in events:
                pane.handle_job_event(job, ev)
            pane.handle_job_event(job, events[1])  # the same event again: no new row
            pane.handle_job_event(other, Measured("perplexity", {"ppl": 3.0}))  # not a sweep
            await pilot.pause()
            table = pane.query_one("#sweep-table", DataTable)
            assert table.row_count == len(rows)
            assert files_in_order(pane) == [r["file"] for r in rows]  # arrival order
            for r in rows:
                assert table.get_cell(r["file"], "size_bytes") == size(r["size_bytes"])
            assert table.get_cell(rows[0]["file"], "type") == "F16 (base)"

            # sort by size (the column right of "type"), then the same key again reverses
            table.focus()
            await pilot.press("right", "s")
            by_size = sorted(rows, key=lambda r: r["size_bytes"])
            assert files_in_order(pane) == [r["file"] for r in by_size]
            await pilot.press("s")
            assert files_in_order(pane) == [r["file"] for r in reversed(by_size)]
            kld_col = [c[0] for c in COLUMNS].index("mean_kld")
            table.move_cursor(column=kld_col)
            await pilot.press("s")
            by_kld = sorted(rows, key=lambda r: r["mean_kld"])
            assert files_in_order(pane) == [r["file"] for r in by_kld]

            # open the row under the cursor in chat, by key and by Enter
            table.move_cursor(row=2)
            await pilot.press("o")
            await pilot.press("enter")
            assert app.opened == [by_kld[2]["file"]] * 2

            # the plot names every quantized type; `p` switches KLD <-> Δppl
            plot = str(pane.query_one("#sweep-plot", Static).content)
            assert "KLD" in plot
            assert all(r["type"] in plot for r in rows if not r["is_base"])
            await pilot.press("p")
            assert "Δppl" in str(pane.query_one("#sweep-plot", Static).content)

            # a re-measured type replaces its row
            pane.add_row(dict(rows[2], ppl=11.0, cached=True))
            assert table.row_count == len(rows)
            assert table.get_cell(rows[2]["file"], "ppl") == "11.0000"
            assert table.get_cell(rows[2]["file"], "cached") == "yes"

    asyncio.run(run())


@pytest.mark.parametrize("forward", [False, True])
def test_jobs_pane_routes_sweep_rows(tmp_path, forward):
    rows = sweep_rows(tmp_path)
    manager = JobManager()
    job = Job(1, JobSpec("sweep", {"model": rows[0]["file"]}), state="finished")
    manager.jobs.append(job)  # a finished job: only the pane reads its events

    async def run() -> None:
        app = SweepApp(manager, forward)
        async with app.run_test(size=(100, 40)) as pilot:
            pane = app.query_one(SweepPane)
            job.events.extend(Measured(r["type"], r) for r in rows[:2])
            await pilot.pause(0.3)
            assert files_in_order(pane) == [r["file"] for r in rows[:2]]
            job.events.extend(Measured(r["type"], r) for r in rows[2:])
            await pilot.pause(0.3)
            assert files_in_order(pane) == [r["file"] for r in rows]

    asyncio.run(run())
