"""SweepPane: the rows of sweep jobs as they are measured (one `Measured` event per type),
sortable by any column from the keyboard, a row opens in chat, and the size-vs-quality plot
of `gguflab sweep` below the table."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.widget import Widget
from textual.widgets import DataTable, Static

from ....events import Event, Measured
from ....fmt import size
from ....jobs import Job


def _num(fmt: str) -> Callable[[Any], str]:
    return lambda v: "-" if v is None else fmt.format(v)


def _fits(v: Any) -> str:
    return {None: "", True: "yes", False: "no"}.get(v, str(v))


# (row field, header, how the cell reads); the table sorts on the field's raw value
COLUMNS: list[tuple[str, str, Callable[[Any], str]]] = [
    ("type", "type", str),
    ("size_bytes", "size", lambda v: "-" if v is None else size(v)),
    ("bpw", "bpw", _num("{:.2f}")),
    ("ppl", "ppl", _num("{:.4f}")),
    ("delta_ppl", "Δppl", _num("{:+.4f}")),
    ("mean_kld", "KLD", _num("{:.5f}")),
    ("same_top_p", "top-1", lambda v: "-" if v is None else f"{100 * v:.1f}%"),
    ("pp_tps", "pp t/s", _num("{:.1f}")),
    ("tg_tps", "tg t/s", _num("{:.1f}")),
    ("fits", "fits", _fits),
    ("cached", "cached", lambda v: "yes" if v else ""),
]


def row_cells(values: dict[str, Any]) -> list[str]:
    cells = [fmt(values.get(key)) for key, _, fmt in COLUMNS]
    if values.get("is_base"):
        cells[0] += " (base)"
    return cells


def plot_text(rows: list[dict[str, Any]], metric: str, width: int, height: int) -> str:
    """The sweep's size-vs-quality plot (gguflab.sweep draws it; the CLI prints the same)."""
    if not any(not r.get("is_base") for r in rows):
        return "the size vs quality plot appears once a quantized type is measured"
    try:
        from ....sweep import plot_rows

        width = max(20, width - 10)  # room for the y axis labels
        extra = len(plot_rows(rows, metric, width, 4).splitlines()) - 4  # titles and x axis
        return plot_rows(rows, metric, width, max(3, height - extra))
    except Exception as e:  # a row missing a field must not take the pane down
        return f"(no plot: {e})"


class SweepPane(Widget):
    """The sweep table (live from sweep jobs) and its plot."""

    BINDINGS = [Binding("s", "sort", "Sort by column"),
                Binding("o", "open_in_chat", "Open in chat"),
                Binding("p", "toggle_plot", "Plot KLD/Δppl")]

    DEFAULT_CSS = """
    SweepPane { layout: vertical; height: 1fr; }
    SweepPane #sweep-table { height: auto; max-height: 50%; }
    SweepPane #sweep-status { height: 1; padding: 0 1; color: $text-muted; }
    SweepPane #sweep-plot { height: 1fr; border: round $secondary; }
    """

    def __init__(self, *, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes)
        self.rows: dict[str, dict[str, Any]] = {}  # row key (the file) -> values
        self.sort_key: str | None = None
        self.sort_reverse = False
        self.metric = "kld"

    def compose(self) -> ComposeResult:
        yield DataTable(id="sweep-table", cursor_type="cell")
        yield Static("no sweep yet: pick a model in Models and start a sweep", id="sweep-status")
        yield Static("", id="sweep-plot")

    def on_mount(self) -> None:
        table = self.query_one("#sweep-table", DataTable)
        for key, label, _ in COLUMNS:
            table.add_column(label, key=key)
        self.query_one("#sweep-plot", Static).border_title = "size vs quality"

    def on_show(self) -> None:
        """Shown (its tab picked): take the focus, so the sort and open keys work at once."""
        self.query_one("#sweep-table", DataTable).focus()

    def on_resize(self) -> None:
        self.call_after_refresh(self._show_plot)  # the plot's new size is known after layout

    # -- filling ------------------------------------------------------------------------------

    def handle_job_event(self, job: Job, event: Event) -> None:
        """A sweep job's Measured event becomes a row; anything else is ignored. The same
        event twice (routed by the jobs pane and forwarded by an app) just rewrites its row."""
        if not isinstance(event, Measured):
            return
        if job.spec.kind != "sweep":
            return
        self.add_row({"type": event.name, **event.values})

    def add_row(self, values: dict[str, Any]) -> None:
        """Add a row, or replace the row of the same file (a re-run of the same type)."""
        key = str(values.get("file") or values.get("type"))
        table = self.query_one("#sweep-table", DataTable)
        if key in self.rows:
            for (col, _, _), cell in zip(COLUMNS, row_cells(values)):
                table.update_cell(key, col, cell)
        else:
            table.add_row(*row_cells(values), key=key)
        self.rows[key] = dict(values)
        if self.sort_key is not None:
            self._sort()
        self._show_status()
        self.call_after_refresh(self._show_plot)  # after the table has grown

    # -- actions ------------------------------------------------------------------------------

    def action_sort(self) -> None:
        """Sort by the cursor's column; again on the same column reverses."""
        table = self.query_one("#sweep-table", DataTable)
        key = COLUMNS[table.cursor_column][0]
        self.sort_reverse = not self.sort_reverse if key == self.sort_key else False
        self.sort_key = key
        self._sort()
        self._show_status()

    def _show_status(self) -> None:
        n = len(self.rows)
        if self.sort_key is None:
            order = "s sorts by the column under the cursor"
        else:
            header = next(label for key, label, _ in COLUMNS if key == self.sort_key)
            order = f"sorted by {header} {'↓' if self.sort_reverse else '↑'}"
        self.query_one("#sweep-status", Static).update(
            f"{n} row{'s' if n != 1 else ''}; {order}; o opens the row in chat")

    def _sort(self) -> None:
        """Rebuild the table in order of the raw values (sizes as bytes, not their text)."""
        key = self.sort_key
        present = [k for k, r in self.rows.items() if r.get(key) is not None]
        missing = [k for k in self.rows if k not in present]  # rows without the figure: last
        ordered = sorted(present, key=lambda k: self.rows[k][key], reverse=self.sort_reverse)
        table = self.query_one("#sweep-table", DataTable)
        column = table.cursor_column
        table.clear()
        for k in ordered + missing:
            table.add_row(*row_cells(self.rows[k]), key=k)
        table.move_cursor(row=0, column=column)

    def selected_row(self) -> dict[str, Any] | None:
        table = self.query_one("#sweep-table", DataTable)
        if table.row_count == 0:
            return None
        row_key = table.coordinate_to_cell_key(table.cursor_coordinate).row_key
        return self.rows.get(str(row_key.value))

    def action_open_in_chat(self) -> None:
        row = self.selected_row()
        path = row.get("file") if row else None
        if not path or not os.path.isfile(path):
            self.notify("this row has no model file to chat with", severity="warning")
            return
        opener = getattr(self.app, "action_open_in_chat", None)
        if opener is None:
            self.notify("chat is not available here", severity="error")
            return
        opener(path)

    def on_data_table_cell_selected(self, message: DataTable.CellSelected) -> None:
        message.stop()
        self.action_open_in_chat()

    def action_toggle_plot(self) -> None:
        self.metric = "ppl" if self.metric == "kld" else "kld"
        self._show_plot()

    def _show_plot(self) -> None:
        plot = self.query_one("#sweep-plot", Static)
        w, h = plot.content_size
        plot.update(Text(plot_text(list(self.rows.values()), self.metric, w, h)))
