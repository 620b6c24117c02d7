"""The selected model's details: metadata, hyperparameters, tokenizer, tensor types, and
(on demand) the tensor table. Headers are read in a thread worker, never in the UI."""

from __future__ import annotations

from rich.console import Group
from rich.table import Table
from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.containers import VerticalScroll
from textual.css.query import NoMatches
from textual.widget import Widget
from textual.widgets import ContentSwitcher, DataTable, Static
from textual.worker import get_current_worker

from ....fmt import count, size
from ...scan import ModelDetails, ModelEntry, model_details

BAR_WIDTH = 12  # cells of the per-type size bar


class ModelDetail(Widget):
    """Info view (text) or tensors view (a table filled only when first shown)."""

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.entry: ModelEntry | None = None
        self.details: ModelDetails | None = None
        self._tensors_shown_for: ModelDetails | None = None

    def compose(self) -> ComposeResult:
        with ContentSwitcher(initial="detail-info"):
            with VerticalScroll(id="detail-info"):
                yield Static("No model selected.", id="detail-text")
            yield DataTable(id="tensor-table", cursor_type="row")

    def on_mount(self) -> None:
        table = self.query_one("#tensor-table", DataTable)
        for label in ("Tensor", "Type", "Shape", "Size"):
            table.add_column(label, key=label.lower())

    @property
    def showing_tensors(self) -> bool:
        return self.query_one(ContentSwitcher).current == "tensor-table"

    def show(self, entry: ModelEntry | None) -> None:
        """Show `entry`: its row facts now, its header details once read."""
        if entry is not None and entry == self.entry:
            return  # a rescan found it unchanged: keep the view (and its scroll) as it is
        self.entry, self.details = entry, None
        self.query_one("#detail-text", Static).update(_headline(entry, loading=True))
        self.query_one("#tensor-table", DataTable).clear()
        self._tensors_shown_for = None
        if entry is not None and entry.kind in ("gguf", "hf") and not entry.writing:
            self._load(entry)
        else:
            self.query_one("#detail-text", Static).update(_headline(entry))

    def toggle_tensors(self) -> None:
        """Switch between the info text and the tensor table."""
        switcher = self.query_one(ContentSwitcher)
        switcher.current = "detail-info" if self.showing_tensors else "tensor-table"
        self._fill_tensors()

    @work(thread=True, exclusive=True, group="detail")
    def _load(self, entry: ModelEntry) -> None:
        try:
            details, error = model_details(entry), None
        except Exception as e:  # a file changed or damaged since the scan: say so, go on
            details, error = None, str(e).splitlines()[0]
        if not get_current_worker().is_cancelled:
            self.app.call_from_thread(self._loaded, entry, details, error)

    def _loaded(self, entry: ModelEntry, details: ModelDetails | None, error: str | None) -> None:
        if entry is not self.entry:  # the cursor moved on meanwhile
            return
        try:
            text = self.query_one("#detail-text", Static)
        except NoMatches:  # the app closed while the header was read (a slow disk)
            return
        self.details = details
        if details is None:
            text.update(Group(_headline(entry), Text(f"error: {error}", style="red")))
            return
        text.update(_info(details))
        self._fill_tensors()

    def _fill_tensors(self) -> None:
        """Fill the tensor table the first time it is shown for these details."""
        d = self.details
        if d is None or not self.showing_tensors or self._tensors_shown_for is d:
            return
        self._tensors_shown_for = d
        table = self.query_one("#tensor-table", DataTable)
        table.clear()
        for t in d.tensors:
            table.add_row(
                t.name,
                t.type_name,
                " x ".join(map(str, t.shape)),
                Text(size(t.nbytes), justify="right"),
            )


def _headline(entry: ModelEntry | None, loading: bool = False) -> Text:
    if entry is None:
        return Text("No model selected.")
    text = Text(entry.name, style="bold")
    if entry.kind == "error":
        text.append(f"\nerror: {entry.error}", style="red")
        return text
    if entry.writing:
        text.append(f"\nbeing written by a job ({size(entry.size_bytes)} so far)", style="yellow")
        return text
    if entry.kind == "imatrix":
        text.append(f"\nimportance matrix, {size(entry.size_bytes)}: the quantize dialog (k) of "
                    "a model in this folder offers it")
        return text
    facts = [
        entry.arch or "?",
        f"{count(entry.n_params)} parameters" if entry.n_params else "",
        entry.type_name or "",
        size(entry.size_bytes),
    ]
    text.append("\n" + ", ".join(f for f in facts if f), style="dim" if loading else "")
    if loading:
        text.append("\nreading header...", style="dim")
    return text


def _pairs(title: str, rows: list[tuple[str, str]]) -> Table:
    grid = Table.grid(padding=(0, 1))
    grid.title = title
    grid.title_justify = "left"
    grid.title_style = "bold"
    grid.add_column(style="cyan", no_wrap=True)
    grid.add_column(overflow="fold")
    for k, v in rows:
        grid.add_row(k, v)
    return grid


def _types_table(d: ModelDetails) -> Table:
    """Count and bytes per tensor type, with a bar of each type's share."""
    total = sum(b for _, _, b in d.by_type) or 1
    grid = Table.grid(padding=(0, 1))
    grid.title, grid.title_justify, grid.title_style = "Tensor types", "left", "bold"
    for justify in ("left", "right", "right", "right", "left"):
        grid.add_column(justify=justify, no_wrap=True)
    for name, n, nbytes in d.by_type:
        share = nbytes / total
        bar = "█" * round(share * BAR_WIDTH)
        grid.add_row(name, str(n), size(nbytes), f"{100 * share:.1f}%", Text(bar, style="green"))
    return grid


def _info(d: ModelDetails) -> Group:
    parts = [_headline(d.entry), Text("")]
    if d.hparams:
        parts += [_pairs("Hyperparameters", d.hparams), Text("")]
    if d.tokenizer:
        parts += [_pairs("Tokenizer", d.tokenizer), Text("")]
    if d.by_type:
        parts += [_types_table(d), Text(f"{len(d.tensors)} tensors (t: tensor table)"), Text("")]
    if d.metadata:
        meta = Text("Metadata", style="bold")
        for k, v in d.metadata:  # keys are long: one "key = value" line each, folded
            meta.append("\n")
            meta.append(k, style="cyan")
            meta.append(f" = {v}")
        parts.append(meta)
    return Group(*parts)
