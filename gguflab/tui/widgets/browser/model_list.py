"""The model list: one row per model found on disk, rescanned in a thread worker."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.message import Message
from textual.widget import Widget
from textual.widgets import DataTable
from textual.worker import get_current_worker

from ....fmt import count, size
from ... import scan
from ...scan import ModelEntry

ERROR_WIDTH = 30  # characters of an error shown in the list; the detail panel has it all


class ModelBrowser(Widget):
    """A table of the models in `dirs` (name, architecture, parameters, type, size)."""

    class Highlighted(Message):
        """The cursor moved to another model (None: the list is empty)."""

        def __init__(self, entry: ModelEntry | None) -> None:
            self.entry = entry
            super().__init__()

    class Scanned(Message):
        """A scan finished and the list shows its result."""

        def __init__(self, entries: list[ModelEntry]) -> None:
            self.entries = entries
            super().__init__()

    def __init__(
        self,
        dirs: Iterable[str],
        writing: Callable[[], Iterable[str]] = tuple,
        *,
        id: str | None = None,
    ) -> None:
        super().__init__(id=id)
        self.dirs = list(dirs)
        self._writing = writing
        self.entries: list[ModelEntry] = []
        self._by_path: dict[str, ModelEntry] = {}

    def compose(self) -> ComposeResult:
        table: DataTable = DataTable(id="model-table", cursor_type="row")
        table.add_column("Name", key="name")
        table.add_column("Arch", key="arch")
        table.add_column("Params", key="params")
        table.add_column("Type", key="type")
        table.add_column("Size", key="size")
        yield table

    def on_mount(self) -> None:
        self.rescan()

    @property
    def table(self) -> DataTable:
        return self.query_one("#model-table", DataTable)

    @property
    def selected(self) -> ModelEntry | None:
        """The model under the cursor."""
        t = self.table
        if not self.entries or t.row_count == 0:
            return None
        key = t.coordinate_to_cell_key(t.cursor_coordinate).row_key.value
        return self._by_path.get(key)

    def rescan(self) -> None:
        """Scan again in a worker; the list keeps its cursor on the same model."""
        self._scan(list(self._writing()))  # read the jobs' targets here, in the UI thread

    @work(thread=True, exclusive=True, group="scan")
    def _scan(self, writing: list[str]) -> None:
        entries = scan.scan_models(self.dirs, writing)
        if not get_current_worker().is_cancelled:  # a newer scan (or quitting) replaced it
            self.app.call_from_thread(self._show, entries)

    def _show(self, entries: list[ModelEntry]) -> None:
        table = self.table
        keep = self.selected.path if self.selected else None
        self.entries = entries
        self._by_path = {e.path: e for e in entries}
        with self.prevent(DataTable.RowHighlighted):  # the rebuild is not the user moving
            table.clear()
            for e in entries:
                table.add_row(*_cells(e), key=e.path)
            if keep in self._by_path:
                table.move_cursor(row=table.get_row_index(keep))
        self.post_message(self.Scanned(entries))
        self.post_message(self.Highlighted(self.selected))

    @on(DataTable.RowHighlighted, "#model-table")
    def _highlighted(self, event: DataTable.RowHighlighted) -> None:
        event.stop()
        self.post_message(self.Highlighted(self._by_path.get(event.row_key.value)))

    def covers(self, path: str) -> bool:
        """Whether a scan lists a model file at `path` (in a folder or a direct subfolder)."""
        real = os.path.realpath(path)
        for d in self.dirs:
            if os.path.isfile(d):
                if os.path.realpath(d) == real:
                    return True
                continue
            rel = os.path.relpath(real, os.path.realpath(d))
            if not rel.startswith("..") and rel.count(os.sep) <= 1:
                return True
        return False

    def add_folder(self, folder: str) -> None:
        """Scan `folder` too from now on (where a job wrote a file outside the others)."""
        if not self.covers(os.path.join(folder, "x.gguf")):
            self.dirs.append(folder)

    def select_path(self, path: str) -> bool:
        """Put the cursor on the model at `path` (True if it is in the list)."""
        if path not in self._by_path:
            return False
        self.table.move_cursor(row=self.table.get_row_index(path))
        return True


def _cells(e: ModelEntry) -> tuple[Text, ...]:
    """A row's cells; errors in red, files being written in yellow."""
    if e.kind == "error":
        err = e.error or "unreadable"
        if len(err) > ERROR_WIDTH:
            err = err[: ERROR_WIDTH - 3] + "..."
        return (
            Text(e.name, style="red"),
            Text("error", style="bold red"),
            Text("-"),
            Text(err, style="red"),
            Text(size(e.size_bytes), justify="right"),
        )
    style = "yellow" if e.writing else ""
    kind = "writing" if e.writing else (e.type_name or "?")
    if e.kind == "hf" and not e.writing:
        kind = f"HF {kind}"
    return (
        Text(e.name, style=style),
        Text(e.arch or "-", style=style),
        Text(count(e.n_params) if e.n_params else "-", justify="right", style=style),
        Text(kind, style=style),
        Text(size(e.size_bytes), justify="right", style=style),
    )
