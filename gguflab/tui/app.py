"""The gguflab TUI: four tabs (Models, Jobs, Chat, Sweep), every action on a key.

The app owns the job manager; the Jobs pane polls it and posts `JobsPane.JobEvent`s, which
the app turns into rescans of the model list. Long work never runs in the UI thread:
scans and header reads run in thread workers, jobs in worker processes.
"""

from __future__ import annotations

import os

from textual import on
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.widgets import Footer, Input, TabbedContent, TabPane

from ..events import Failed, Finished, Started
from ..jobs import JobManager, JobSpec
from .commands import ModelCommands
from .scan import ModelEntry, default_model_dirs
from .widgets import dialogs
from .widgets.browser import ModelBrowser, ModelDetail
from .widgets.chat import ChatPane
from .widgets.jobs import JobsPane
from .widgets.sweep import SweepPane

RESCAN_WHILE_WRITING = 2.0  # seconds between rescans while a job writes a file
TAB_KEYS = Binding.Group("Tabs", compact=True)

# actions on the selected model: (action, the model kinds it applies to)
MODEL_ACTIONS = {
    "quantize": ("gguf",),
    "imatrix": ("gguf",),
    "convert": ("hf",),
    "perplexity": ("gguf",),
    "sweep": ("gguf",),
    "chat": ("gguf",),
    "tensors": ("gguf", "hf"),
}


class GgufLabApp(App):
    """Browse models, run jobs on them, watch the jobs, chat with the results."""

    TITLE = "gguflab"
    CSS_PATH = "app.tcss"
    COMMANDS = App.COMMANDS | {ModelCommands}
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (110, "-wide")]
    BINDINGS = [
        Binding("1", "tab('models')", "Models", group=TAB_KEYS),
        Binding("2", "tab('jobs')", "Jobs", group=TAB_KEYS),
        Binding("3", "tab('chat')", "Chat", group=TAB_KEYS),
        Binding("4", "tab('sweep')", "Sweep", group=TAB_KEYS),
        # F1..F4 switch tabs from inside a text field too (where 1..4 are typed)
        *(
            Binding(f"f{i}", f"tab('{tab}')", show=False, priority=True)
            for i, tab in enumerate(("models", "jobs", "chat", "sweep"), 1)
        ),
        Binding("r", "rescan", "Rescan"),
        Binding("k", "quantize", "Quant"),
        Binding("i", "imatrix", "IMat"),
        Binding("c", "convert", "Conv"),
        Binding("p", "perplexity", "PPL"),
        Binding("s", "sweep", "Sweep"),
        Binding("o", "chat", "Chat"),
        Binding("t", "tensors", "Tensors"),
        Binding("q", "quit", "Quit"),
    ]

    def __init__(
        self, models_dirs: list[str] | None = None, manager: JobManager | None = None
    ) -> None:
        super().__init__()
        self.models_dirs = list(models_dirs) if models_dirs else default_model_dirs()
        self.manager = manager if manager is not None else JobManager()
        self.theme = "textual-dark"  # Textual maps it down to 256 or 16 colours as needed
        self._select_after_scan: str | None = None  # a job's new file, to show once listed

    # -- layout ----------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        with TabbedContent(initial="models", id="tabs"):
            with TabPane("1 Models", id="models"), Horizontal(id="models-pane"):
                yield ModelBrowser(self.models_dirs, self.manager.writing, id="browser")
                yield ModelDetail(id="detail")
            with TabPane("2 Jobs", id="jobs"):
                yield JobsPane(self.manager)
            with TabPane("3 Chat", id="chat"):
                yield ChatPane()
            with TabPane("4 Sweep", id="sweep"):
                yield SweepPane()
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self.query_one("#model-table").focus()
        self.set_interval(RESCAN_WHILE_WRITING, self._rescan_while_writing)
        self._handle_hangup()

    def _handle_hangup(self) -> None:
        """A dropped SSH session (SIGHUP) or a `kill` (SIGTERM) cancels the jobs, their
        partial files removed, and ends the app (a SIGHUP ignored by nohup stays ignored)."""
        import asyncio
        import signal

        try:
            loop = asyncio.get_running_loop()
            for s in (signal.SIGHUP, signal.SIGTERM):
                if signal.getsignal(s) != signal.SIG_IGN:
                    loop.add_signal_handler(s, self._hung_up, s)
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread
            pass

    def _hung_up(self, signum: int) -> None:
        self.manager.shutdown()  # before anything is drawn on a terminal that may be gone
        self.exit(return_code=128 + signum)

    def _rescan_while_writing(self) -> None:
        """Files being written grow: show their size as they do."""
        if self.manager.writing():
            self.browser.rescan()

    def on_resize(self) -> None:
        # at 80 columns every action key fits only without the palette hint (Ctrl+P still works)
        self.query_one(Footer).show_command_palette = self.size.width >= 100

    @property
    def browser(self) -> ModelBrowser:
        return self.query_one(ModelBrowser)

    @property
    def selected(self) -> ModelEntry | None:
        """The model under the browser's cursor."""
        return self.browser.selected

    @property
    def current_tab(self) -> str:
        return self.query_one(TabbedContent).active

    # -- reactions ---------------------------------------------------------------------------

    @on(ModelBrowser.Highlighted)
    def _show_detail(self, message: ModelBrowser.Highlighted) -> None:
        self.query_one(ModelDetail).show(message.entry)
        self.refresh_bindings()

    @on(TabbedContent.TabActivated)
    def _tab_changed(self) -> None:
        self.refresh_bindings()

    @on(JobsPane.JobEvent)
    def _job_event(self, message: JobsPane.JobEvent) -> None:
        """A job started or ended: the list shows its output as being written, then done."""
        if not self.query(ModelBrowser):  # the app is closing: its widgets are gone
            return
        ev = message.event
        if isinstance(ev, Started) and ev.target and ev.target.endswith(".gguf"):
            self.browser.add_folder(os.path.dirname(os.path.abspath(ev.target)))
        if message.job.spec.kind == "imatrix":  # not a model: the cursor stays on the model
            if isinstance(ev, Finished) and ev.path:
                self.notify(f"importance matrix written: {os.path.basename(ev.path)}; the "
                            "quantize dialog (k) of its model offers it")
            if isinstance(ev, (Started, Failed, Finished)):
                self.browser.rescan()
            return
        if isinstance(ev, Finished) and ev.path and ev.path.endswith(".gguf"):
            self.browser.add_folder(os.path.dirname(os.path.abspath(ev.path)))
            self._select_after_scan = os.path.abspath(ev.path)
            # the chat's default model: the one just made
            self.query_one(ChatPane).suggest_model(os.path.abspath(ev.path))
        if isinstance(ev, (Started, Failed, Finished)):
            self.browser.rescan()

    @on(ModelBrowser.Scanned)
    def _scanned(self) -> None:
        """Put the cursor on a job's new file once a scan lists it as finished."""
        path = self._select_after_scan
        for e in self.browser.entries if path else ():
            if os.path.abspath(e.path) == path and not e.writing:
                self.browser.select_path(e.path)
                self._select_after_scan = None

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """Model actions show in the footer on the Models tab only, dimmed where they do not
        apply to the selected model (Textual: False hides a binding, None dims it)."""
        if action == "tab" and len(self.screen_stack) > 1:
            return False  # not from behind a dialog
        if action == "rescan" or action in MODEL_ACTIONS:
            if self.current_tab != "models":
                return False
            if action in MODEL_ACTIONS:
                e = self.selected
                ok = e is not None and not e.writing and e.kind in MODEL_ACTIONS[action]
                return True if ok else None
        return True

    # -- actions -----------------------------------------------------------------------------

    def action_tab(self, tab: str) -> None:
        """Show a tab and put the focus in it: its text field if it has one (the chat's
        message line), else its first focusable widget."""
        self.query_one(TabbedContent).active = tab
        pane = self.query_one(f"#{tab}", TabPane)
        if tab == "models":
            self.query_one("#model-table").focus()
        elif self.focused is None or pane not in self.focused.ancestors_with_self:
            widgets = [w for w in pane.query("*") if w.focusable]
            inputs = [w for w in widgets if isinstance(w, Input)]
            if inputs or widgets:
                (inputs or widgets)[0].focus()

    def action_rescan(self) -> None:
        self.browser.rescan()

    def action_tensors(self) -> None:
        self.query_one(ModelDetail).toggle_tensors()

    def _model(self, action: str) -> ModelEntry | None:
        """The selected model if `action` applies to it, else a notice saying why not."""
        e = self.selected
        kinds = MODEL_ACTIONS[action]
        if e is None:
            self.notify("No model selected.", severity="warning")
        elif e.writing:
            self.notify(f"{e.name} is still being written.", severity="warning")
        elif e.kind not in kinds:
            need = "a Hugging Face folder" if kinds == ("hf",) else "a GGUF file"
            self.notify(f"{action} needs {need}; {e.name} is not one.", severity="warning")
        else:
            return e
        return None

    def _dialog(self, action: str, name: str) -> None:
        e = self._model(action)
        if e is not None:
            self.push_screen(getattr(dialogs, name)(e.path), self.submit)

    def action_quantize(self) -> None:
        self._dialog("quantize", "QuantizeDialog")

    def action_imatrix(self) -> None:
        self._dialog("imatrix", "ImatrixDialog")

    def action_convert(self) -> None:
        self._dialog("convert", "ConvertDialog")

    def action_perplexity(self) -> None:
        self._dialog("perplexity", "PerplexityDialog")

    def action_sweep(self) -> None:
        self._dialog("sweep", "SweepDialog")

    def action_chat(self) -> None:
        e = self._model("chat")
        if e is not None:
            self.action_open_in_chat(e.path)

    def submit(self, spec: JobSpec | None) -> None:
        """A dialog's result: queue the job and show the tab that follows it."""
        if spec is None:
            return
        job = self.manager.submit(spec)
        self.notify(f"Job {job.id} queued: {spec.title}")
        self.action_tab("sweep" if spec.kind == "sweep" else "jobs")

    def action_open_in_chat(self, path: str) -> None:
        """Load `path` in the chat pane and switch to it (the sweep table calls this too)."""
        self.action_tab("chat")
        self.query_one(ChatPane).open_model(path)

    async def action_quit(self) -> None:
        self.manager.shutdown()
        self.exit()

    def on_unmount(self) -> None:
        self.manager.shutdown()  # any other way out (Ctrl-C, an error) stops the jobs too
