"""JobsPane: polls the JobManager on a timer and shows each job (state, progress bar, ETA,
current tensor, throughput), the selected job's live log, the current tensor's weight
distribution and histogram of quantized levels, and the relative RMSE of every tensor so far
(which layers lose most).

Events are read from `job.events` (the manager's full record), not from what `poll()`
returns, so nothing is missed when someone else polls the same manager."""

from __future__ import annotations

import time

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.widget import Widget
from textual.widgets import DataTable, RichLog, Static

from ....events import Event, Failed, Finished, Log, Measured, Started, TensorDone
from ....fmt import duration, size
from ....jobs import Job, JobManager
from ..plots import progress_bar, vbars, worst

STATE_STYLES = {"queued": "dim", "running": "yellow", "finished": "green",
                "failed": "bold red", "cancelled": "magenta"}
COLUMNS = (("id", "#"), ("state", "state"), ("job", "job"), ("progress", "progress"),
           ("eta", "ETA/time"), ("speed", "MiB/s"), ("tensor", "tensor"))
BAR_WIDTH = 10
TITLE_WIDTH = 24
N_WORST = 3


class BarChart(Widget):
    """Vertical bars filling the widget; `set_values` redraws."""

    DEFAULT_CSS = "BarChart { height: 5; }"

    def __init__(self, *, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes)
        self.values: list[float] = []

    def set_values(self, values: list[float]) -> None:
        self.values = list(values)
        self.refresh()

    def render(self) -> Text:
        return Text("\n".join(vbars(self.values, self.size.width, self.size.height)))


def _short(name: str) -> str:
    return name.removesuffix(".weight")


def describe_event(ev: Event) -> Text | None:
    """One line of the live log for an event (None: nothing worth a line)."""
    if isinstance(ev, Log):
        style = {"warning": "yellow", "error": "red"}.get(ev.level, "")
        prefix = "" if ev.level == "info" else f"{ev.level}: "
        return Text(prefix + ev.text, style=style)
    if isinstance(ev, Started):
        to = f" -> {ev.target}" if ev.target else ""
        return Text(f"started {ev.job}: {ev.source}{to} ({ev.total} steps)", style="bold")
    if isinstance(ev, TensorDone):
        shape = "x".join(str(n) for n in ev.shape)
        what = f"{ev.src_type}->{ev.dst_type}" if ev.converted else f"{ev.src_type} copied"
        rmse = f" rmse {ev.rmse:.4f}" if ev.rmse is not None else ""
        return Text(f"[{ev.index}/{ev.total}] {_short(ev.name)} {what} "
                    f"{size(ev.bytes_in)}->{size(ev.bytes_out)}{rmse} [{shape}]")
    if isinstance(ev, Measured):
        figures = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                            for k, v in ev.values.items())
        return Text(f"{ev.name}: {figures}", style="cyan")
    if isinstance(ev, Finished):
        where = f": {ev.path}" if ev.path else ""
        return Text(f"finished{where}", style="bold green")
    if isinstance(ev, Failed):
        return Text(f"failed: {ev.error}", style="bold red")
    return None  # Progress: the bar shows it


def _cells(job: Job, speed_bps: float | None) -> tuple[Text | str, ...]:
    """The table row of a job as it stands now."""
    title = job.spec.title
    if len(title) > TITLE_WIDTH:
        title = title[: TITLE_WIDTH - 1] + "…"
    if job.done:
        when = duration(job.elapsed) if job.t_start is not None else "-"
    else:
        eta = job.eta_seconds
        when = duration(eta) if eta is not None else "-"
    t, p = job.last_tensor, job.progress
    if t is not None:
        tensor = f"{t.index}/{t.total} {_short(t.name)}"
    elif p is not None and p.total:
        tensor = f"{p.done}/{p.total}"
    else:
        tensor = "-"
    speed = f"{speed_bps / (1 << 20):.1f}" if speed_bps else "-"
    state = Text(job.state, style=STATE_STYLES.get(job.state, ""))
    return (str(job.id), state, title, progress_bar(job.fraction, BAR_WIDTH), when, speed, tensor)


class JobsPane(Widget):
    """The jobs list, the selected job's log and its histograms."""

    BINDINGS = [Binding("x", "cancel_job", "Cancel job")]

    DEFAULT_CSS = """
    JobsPane { layout: vertical; height: 1fr; }
    JobsPane #jobs-table { height: auto; max-height: 8; }
    JobsPane #job-status { height: 1; padding: 0 1; }
    JobsPane #jobs-bottom { height: 1fr; }
    JobsPane #job-log { width: 1fr; border: round $secondary; scrollbar-gutter: stable; }
    JobsPane #job-plots { width: 40%; min-width: 36; max-width: 70;
                          border: round $secondary; }
    JobsPane .plot-title { height: 1; color: $text-muted; }
    JobsPane #tensor-plots { height: 1fr; min-height: 4; max-height: 13; }
    JobsPane #tensor-plots > Vertical { width: 1fr; padding-right: 1; }
    JobsPane #hist { height: 1fr; color: $success; }
    JobsPane #weights { height: 1fr; color: $accent; }
    JobsPane #rmse { height: 1fr; min-height: 3; max-height: 12; color: $warning; }
    JobsPane #worst { height: auto; }
    """

    class JobEvent(Message):
        """Posted for every event of every job, in order (the app rescans on Finished, the
        sweep pane fills its table from Measured)."""

        def __init__(self, job: Job, event: Event) -> None:
            super().__init__()
            self.job = job
            self.event = event

    def __init__(self, manager: JobManager, *, poll_interval: float = 0.1,
                 id: str | None = None, classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes)
        self.manager = manager
        self.poll_interval = poll_interval
        self.selected: Job | None = None
        self._seen: dict[int, int] = {}  # events already handled, per job id
        self._cells: dict[int, tuple] = {}
        self._rmse: dict[int, list[tuple[str, float]]] = {}
        self._hist: dict[int, TensorDone] = {}
        self._poll_error: str | None = None
        self._cancelling: set[int] = set()
        self._t_started: dict[int, float] = {}  # when each job's Started event arrived
        self._t_done: dict[int, float] = {}

    def compose(self) -> ComposeResult:
        yield DataTable(id="jobs-table", cursor_type="row")
        yield Static("no jobs yet: pick a model in Models and start one", id="job-status")
        with Horizontal(id="jobs-bottom"):
            yield RichLog(id="job-log", max_lines=5000, wrap=True, markup=False,
                          min_width=20)
            with Vertical(id="job-plots"):
                with Horizontal(id="tensor-plots"):
                    with Vertical():
                        yield Static("weights", id="weights-title", classes="plot-title")
                        yield BarChart(id="weights")
                    with Vertical():
                        yield Static("levels", id="hist-title", classes="plot-title")
                        yield BarChart(id="hist")
                yield Static("relative RMSE per tensor", id="rmse-title", classes="plot-title")
                yield BarChart(id="rmse")
                yield Static("", id="worst")

    def on_mount(self) -> None:
        table = self.query_one("#jobs-table", DataTable)
        for key, label in COLUMNS:
            table.add_column(label, key=key)
        self.query_one("#job-log", RichLog).border_title = "log"
        self.query_one("#job-plots").border_title = "histograms"
        self.set_interval(self.poll_interval, self.refresh_jobs)

    def on_show(self) -> None:
        """Shown (its tab picked): take the focus, so `x` and the arrow keys work at once."""
        self.query_one("#jobs-table", DataTable).focus()

    # -- polling ----------------------------------------------------------------------------

    def refresh_jobs(self) -> None:
        """One tick: poll the manager, handle new events, redraw rows that changed."""
        try:
            self.manager.poll()
        except Exception as e:  # the UI outlives whatever went wrong in the manager
            msg = f"job manager: {type(e).__name__}: {e}"
            if msg != self._poll_error:
                self._poll_error = msg
                self.notify(msg, severity="error")
        table = self.query_one("#jobs-table", DataTable)
        follow = None
        for job in list(self.manager.jobs):
            if job.id not in self._cells:
                self._cells[job.id] = cells = _cells(job, None)
                table.add_row(*cells, key=str(job.id))
                if follow is None and self._idle_view():
                    follow = job
            if job.started is not None and job.id not in self._t_started and self._idle_view():
                follow = job  # a job begins: show it unless another is being watched
            seen = self._seen.get(job.id, 0)
            new = job.events[seen:]
            self._seen[job.id] = seen + len(new)
            for ev in new:
                self._handle(job, ev)
            cells = _cells(job, self._speed(job))
            if cells != self._cells[job.id]:
                for (key, _), old, cell in zip(COLUMNS, self._cells[job.id], cells):
                    if old != cell:
                        table.update_cell(str(job.id), key, cell, update_width=True)
                self._cells[job.id] = cells
        if follow is not None and follow is not self.selected:
            table.move_cursor(row=table.get_row_index(str(follow.id)))
            self._select(follow)
        self._show_status()

    def _idle_view(self) -> bool:
        """Whether the selected job is one nobody needs to watch (none, queued or done)."""
        return self.selected is None or self.selected.state in ("queued", "finished",
                                                                "failed", "cancelled")

    def _speed(self, job: Job) -> float | None:
        """Input bytes per second since the job's Started event: the worker's start-up
        (imports, compiling kernels) is not throughput."""
        t0 = self._t_started.get(job.id)
        if t0 is None or not job.bytes_done:
            return None
        seconds = self._t_done.get(job.id, time.monotonic()) - t0
        return job.bytes_done / seconds if seconds > 0 else None

    def _handle(self, job: Job, ev: Event) -> None:
        try:
            if isinstance(ev, Started):
                self._t_started[job.id] = time.monotonic()
            elif isinstance(ev, (Finished, Failed)):
                self._t_done[job.id] = time.monotonic()
            if isinstance(ev, TensorDone):
                if ev.index == 1:  # a new pass over a model (a sweep quantizes several)
                    self._rmse[job.id] = []
                if ev.rmse is not None:
                    self._rmse.setdefault(job.id, []).append((ev.name, ev.rmse))
                if ev.hist or ev.weights:
                    self._hist[job.id] = ev
            if job is self.selected:
                line = describe_event(ev)
                if line is not None:
                    self.query_one("#job-log", RichLog).write(line)
                if isinstance(ev, TensorDone):
                    self._show_plots(job)
            self.post_message(self.JobEvent(job, ev))
            self._route_to_sweep(job, ev)
        except Exception as e:  # an odd event must not stop the others
            self.query_one("#job-log", RichLog).write(Text(f"(event not shown: {e})", "red"))

    def _route_to_sweep(self, job: Job, ev: Event) -> None:
        """Sweep rows go straight to the sweep pane (it ignores what it has already seen)."""
        if job.spec.kind != "sweep" or not isinstance(ev, Measured):
            return
        from ..sweep import SweepPane

        for pane in self.screen.query(SweepPane):
            pane.handle_job_event(job, ev)

    # -- the selected job -------------------------------------------------------------------

    def on_data_table_row_highlighted(self, message: DataTable.RowHighlighted) -> None:
        if message.data_table.id != "jobs-table" or message.row_key.value is None:
            return
        job_id = int(message.row_key.value)
        job = next((j for j in self.manager.jobs if j.id == job_id), None)
        if job is not None and job is not self.selected:
            self._select(job)

    def _select(self, job: Job) -> None:
        self.selected = job
        log = self.query_one("#job-log", RichLog)
        log.clear()
        log.border_title = f"log of #{job.id}"
        for ev in job.events[: self._seen.get(job.id, 0)]:
            line = describe_event(ev)
            if line is not None:
                log.write(line)
        self._show_plots(job)
        self._show_status()

    def _show_plots(self, job: Job) -> None:
        t = self._hist.get(job.id)
        hist_title = self.query_one("#hist-title", Static)
        weights_title = self.query_one("#weights-title", Static)
        w = t.weights if t is not None else None
        if w:
            weights_title.update(f"weights {w['lo']:+.2g}..{w['hi']:+.2g}")
        else:
            weights_title.update("weights: none yet")
        self.query_one("#weights", BarChart).set_values([float(v) for v in (w or {})
                                                          .get("counts", [])])
        if t is not None and t.hist:
            hist_title.update(f"levels, {t.dst_type}")
            self.query_one("#hist", BarChart).set_values([float(v) for v in t.hist])
        else:
            hist_title.update("levels: none yet")
            self.query_one("#hist", BarChart).set_values([])
        pairs = self._rmse.get(job.id, [])
        rmse_title = self.query_one("#rmse-title", Static)
        if pairs:
            rmse_title.update(f"rel. RMSE, {len(pairs)} tensors, max {max(v for _, v in pairs):.4f}")
        else:
            rmse_title.update("relative RMSE per tensor: none yet")
        self.query_one("#rmse", BarChart).set_values([v for _, v in pairs])
        lines = [f"{v:.4f} {_short(n)}" for n, v in worst(pairs, N_WORST)]
        self.query_one("#worst", Static).update("\n".join(lines))

    def _show_status(self) -> None:
        job = self.selected
        if job is None:
            return
        if job.state == "failed":
            first = (job.error or "").strip().splitlines()[:1]
            text = Text(f"#{job.id} failed: {first[0] if first else 'unknown error'}", "bold red")
        elif job.state == "finished":
            path = job.result.path if job.result else None
            where = f" -> {path}" if path else ""
            text = Text(f"#{job.id} finished in {duration(job.elapsed)}{where}", "green")
        elif job.state == "running" and job.id in self._cancelling:
            text = Text(f"#{job.id} cancelling…", "magenta")
        elif job.state == "running" and job.last_tensor is not None:
            t = job.last_tensor
            text = Text(f"#{job.id} {t.index}/{t.total} {_short(t.name)} {t.dst_type}  "
                        "(x cancels)")
        else:
            text = Text(f"#{job.id} {job.state}: {job.spec.title}  (x cancels)")
        self.query_one("#job-status", Static).update(text)

    def action_cancel_job(self) -> None:
        """Cancel the selected job; the manager removes its partial output."""
        job = self.selected
        if job is None or job.done:
            self.notify("no running job selected", severity="warning")
            return
        self.manager.cancel(job)
        self._cancelling.add(job.id)
        self.notify(f"cancelling job #{job.id}")
        self._show_status()
