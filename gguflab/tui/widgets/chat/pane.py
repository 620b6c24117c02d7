"""The chat pane: a conversation with one GGUF model, a settings form beside it.

Loading and generation run in thread workers, so typing, scrolling and the other panes
never wait on the model: results come back through `call_from_thread`, and the streamed
text through a small locked buffer that a UI timer shows ten times a second."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widget import Widget
from textual.widgets import Input, Label, Static
from textual.worker import get_current_worker

from ....errors import UserError
from .session import (
    FORM_FIELDS,
    ChatSettings,
    LoadedModel,
    Reply,
    offload_line,
    parse_settings,
    stream_reply,
)

_DEFAULTS = ChatSettings()
_PLACEHOLDERS = {"model": "embedded SmolLM2", "n_ctx": "model's, <= 4096",
                 "threads": "all cores", "system_prompt": "(none)"}


def _form_value(name: str) -> str:
    """What a field shows at start: the default, or empty where a placeholder says it."""
    return "" if name in _PLACEHOLDERS else str(getattr(_DEFAULTS, name))


def _input_type(name: str) -> str:
    default = getattr(_DEFAULTS, name)
    if isinstance(default, str) or name == "n_gpu_layers":  # GPU layers may be "auto"
        return "text"
    return "number" if isinstance(default, float) else "integer"


class _LiveReply:
    """The streamed text of a running reply, written by the worker, read by a UI timer."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.text, self.n, self.tps, self.fresh = "", 0, 0.0, False

    def push(self, piece: str, n: int, tps: float) -> None:
        with self._lock:
            self.text += piece
            self.n, self.tps, self.fresh = n, tps, True

    def take(self) -> tuple[str, int, float]:
        with self._lock:
            self.fresh = False
            return self.text, self.n, self.tps


def _error_text(e: Exception) -> str:
    return str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"


class ChatPane(Widget):
    """Chat with a model: enter sends, escape stops, ctrl+n starts over."""

    DEFAULT_CSS = """
    ChatPane { layout: horizontal; height: 1fr; }
    ChatPane #chat-left { width: 1fr; }
    ChatPane #chat-model { height: auto; max-height: 2; color: $text-muted; }
    ChatPane #chat-model.-error { color: $error; }
    ChatPane #chat-log { height: 1fr; border: round $primary-darken-2; padding: 0 1; }
    ChatPane #chat-log:focus { border: round $accent; }
    ChatPane .chat-user { color: $accent; margin-top: 1; }
    ChatPane .chat-assistant { color: $text; }
    ChatPane .chat-error { color: $error; }
    ChatPane #chat-status { height: 2; color: $text-muted; }
    ChatPane #chat-status.-error { color: $error; }
    ChatPane #chat-settings { width: 34; border: round $primary-darken-2; }
    ChatPane #chat-settings.-hidden { display: none; }
    ChatPane .chat-field { height: 1; }
    ChatPane .chat-field Label { width: 12; color: $text-muted; }
    ChatPane .chat-field Input { width: 1fr; }
    ChatPane #chat-offload { color: $text-muted; margin-top: 1; }
    """

    BINDINGS = [
        Binding("escape", "stop", "Stop"),
        Binding("ctrl+n", "new_chat", "New chat"),
        Binding("ctrl+r", "reload", "Reload"),
        Binding("ctrl+t", "toggle_settings", "Settings"),
    ]

    def __init__(self, *, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes)
        self.loaded: LoadedModel | None = None
        self.turns: list[dict] = []  # the conversation so far: user / assistant messages
        self.generating = False
        self.loading = False
        self.error: str | None = None  # the last error line shown
        self.last_reply: Reply | None = None
        self._stop = threading.Event()
        self._pending: str | None = None  # a message typed before the model was loaded
        self._chat_id = 0  # bumps on new chat: late pieces of an old reply are dropped
        self._load_id = 0
        self._offload_id = 0
        self._reply_widget: Static | None = None
        self._live: _LiveReply | None = None  # what the running reply has streamed so far

    def compose(self) -> ComposeResult:
        with Vertical(id="chat-left"):
            yield Static("no model: open one from the Models tab, or type a message to "
                         "chat with the embedded SmolLM2", id="chat-model", markup=False)
            yield VerticalScroll(id="chat-log")
            yield Static("", id="chat-status", markup=False)
            yield Input(placeholder="message (enter sends)", id="chat-input")
        with VerticalScroll(id="chat-settings"):
            for name, label in FORM_FIELDS:
                with Horizontal(classes="chat-field"):
                    yield Label(label)
                    yield Input(_form_value(name), placeholder=_PLACEHOLDERS.get(name, ""),
                                type=_input_type(name), valid_empty=True, compact=True,
                                id=f"chat-set-{name}")
            yield Static("", id="chat-offload", markup=False)

    def on_mount(self) -> None:
        self.query_one("#chat-log").border_title = "chat"
        self.query_one("#chat-settings").border_title = "settings"
        self.set_interval(1 / 10, self._show_live)
        self._update_offload()

    def on_unmount(self) -> None:
        self._stop.set()  # a running reply ends at its next token, so quitting never waits

    # -- public --------------------------------------------------------------------------

    def open_model(self, path: str) -> None:
        """Load `path` (in the background) and start a new chat with it."""
        self.query_one("#chat-set-model", Input).value = path
        self.action_new_chat()
        self._start_load()
        self.query_one("#chat-input", Input).focus()

    def suggest_model(self, path: str) -> None:
        """Make `path` the model a first message loads (the file a job just wrote), unless
        a model is already loaded or loading: a chat in progress is left alone."""
        if self.loaded is None and not self.loading:
            self.query_one("#chat-set-model", Input).value = path

    def settings(self, names: list[str] | None = None) -> ChatSettings:
        """The form's values (only `names`, the rest default); UserError if one is bad."""
        return parse_settings({name: self.query_one(f"#chat-set-{name}", Input).value
                               for name in names or [n for n, _ in FORM_FIELDS]})

    # -- actions -------------------------------------------------------------------------

    def action_stop(self) -> None:
        """Stop the reply being generated (the stream checks between tokens)."""
        if self.generating:
            self._stop.set()

    def action_new_chat(self) -> None:
        self._stop.set()
        self._chat_id += 1
        self.turns = []
        self.last_reply = None
        self._reply_widget = None
        self.query_one("#chat-log", VerticalScroll).remove_children()
        self._status("")

    def action_reload(self) -> None:
        """Load the model again with the form's settings; the conversation stays."""
        self._stop.set()
        self._start_load()

    def action_toggle_settings(self) -> None:
        self.query_one("#chat-settings").toggle_class("-hidden")

    # -- loading -------------------------------------------------------------------------

    def _start_load(self) -> bool:
        """Load the form's model with the form's settings in a thread worker."""
        try:
            settings = self.settings()
            path = settings.model_path()
        except UserError as e:
            self._status(str(e), error=True)
            return False
        self._load_id += 1
        self.loading = True
        self.loaded = None
        self._set_model_line(f"loading {path} ...")
        self._load(path, settings, self._load_id)
        return True

    @work(thread=True, exclusive=True, group="chat-load", exit_on_error=False)
    def _load(self, path: str, settings: ChatSettings, load_id: int) -> None:
        try:
            lm, err = LoadedModel.load(path, settings), None
        except Exception as e:  # a model that will not load is a message, never a crash
            lm, err = None, _error_text(e)
        self._to_ui(self._loaded, load_id, lm, err)

    def _loaded(self, load_id: int, lm: LoadedModel | None, err: str | None) -> None:
        if load_id != self._load_id:
            return  # a newer load was started meanwhile
        self.loading = False
        self.loaded = lm
        pending, self._pending = self._pending, None
        if lm is None:
            self.error = err
            self._set_model_line(f"error: {err}", error=True)
            self._status("")
            if pending is not None:  # give the message back to send once a model loads
                self.query_one("#chat-input", Input).value = pending
            return
        self._set_model_line(lm.summary)
        self._update_offload()
        if pending is not None:
            self._send(pending)

    # -- sending and streaming -----------------------------------------------------------

    @on(Input.Submitted, "#chat-input")
    def _submitted(self, event: Input.Submitted) -> None:
        text = event.value.strip()
        if not text:
            return
        if self.generating:
            self._status("still generating: escape stops it")
            return
        try:
            self.settings()
        except UserError as e:  # keep the message typed; the form says what to fix
            self._status(str(e), error=True)
            return
        event.input.value = ""
        if self.loaded is not None:
            self._send(text)
            return
        if self.loading or self._start_load():
            self._pending = text  # sent when the model is ready

    def _send(self, text: str) -> None:
        try:
            settings = self.settings()
        except UserError as e:
            self._status(str(e), error=True)
            return
        log = self.query_one("#chat-log", VerticalScroll)
        log.mount(Static(Text(f"> {text}"), classes="chat-user"))
        self._live = _LiveReply()
        self._reply_widget = Static("", classes="chat-assistant", markup=False)
        log.mount(self._reply_widget)
        log.scroll_end(animate=False)
        messages = ([{"role": "system", "content": settings.system_prompt}]
                    if settings.system_prompt else [])
        messages += self.turns + [{"role": "user", "content": text}]
        self.generating = True
        self._stop.clear()
        self._status("processing the prompt ...")
        self._generate(self.loaded, settings, messages, self._chat_id, self._live)

    @work(thread=True, exclusive=True, group="chat-generate", exit_on_error=False)
    def _generate(self, lm: LoadedModel, settings: ChatSettings, messages: list[dict],
                  chat_id: int, live: _LiveReply) -> None:
        worker = get_current_worker()
        try:
            reply, err = stream_reply(lm, settings, messages,
                                      lambda: self._stop.is_set() or worker.is_cancelled,
                                      live.push), None
        except Exception as e:  # too long a prompt, a broken template: shown, not raised
            reply, err = None, _error_text(e)
        self._to_ui(self._finish_reply, chat_id, messages, reply, err)

    def _show_live(self) -> None:
        """Timer: show what the running reply streamed since the last tick (the worker never
        waits for the screen, so a fast model is not slowed to the UI's pace)."""
        if self._live is None or self._reply_widget is None or not self._live.fresh:
            return
        text, n, tps = self._live.take()
        self._reply_widget.update(Text(text))
        self.query_one("#chat-log", VerticalScroll).scroll_end(animate=False)
        self._status(f"generating: {n} tokens, {tps:.1f} tok/s (escape stops)")

    def _finish_reply(self, chat_id: int, messages: list[dict], reply: Reply | None,
                      err: str | None) -> None:
        self.generating = False
        self._live = None
        if chat_id != self._chat_id:
            return  # the chat was cleared while this reply was running
        if reply is None:
            self.error = err
            if self._reply_widget is not None:
                self._reply_widget.remove()
            self.query_one("#chat-log", VerticalScroll).mount(
                Static(Text(f"not sent: {err}"), classes="chat-error"))
            self._status("")
            return
        self.last_reply = reply
        if self._reply_widget is not None:
            self._reply_widget.update(Text(reply.text))
        self.turns = [m for m in messages if m["role"] != "system"]
        self.turns.append({"role": "assistant", "content": reply.text})
        t = reply.timings
        self._status(f"{t.line()} | stop: {t.stop_reason}")

    # -- small helpers -------------------------------------------------------------------

    def _to_ui(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run `fn` on the UI thread; after the app has closed there is nobody to tell."""
        try:
            self.app.call_from_thread(fn, *args)
        except RuntimeError:
            pass

    def _status(self, text: str, error: bool = False) -> None:
        status = self.query_one("#chat-status", Static)
        status.update(text, layout=False)  # a fixed height: no relayout, it changes often
        status.set_class(error, "-error")
        if error:
            self.error = text

    def _set_model_line(self, text: str, error: bool = False) -> None:
        line = self.query_one("#chat-model", Static)
        line.update(text)
        line.set_class(error, "-error")

    @on(Input.Changed, "#chat-set-n_gpu_layers, #chat-set-n_ctx, #chat-set-model")
    def _offload_inputs_changed(self) -> None:
        self._update_offload()

    def _update_offload(self) -> None:
        self._offload_id += 1
        try:
            settings = self.settings(["model", "n_ctx", "n_gpu_layers"])
        except UserError as e:
            self._show_offload(self._offload_id, f"offload: {e}")
            return
        self._plan_offload(settings, self._offload_id)

    @work(thread=True, group="chat-offload", exit_on_error=False)
    def _plan_offload(self, settings: ChatSettings, offload_id: int) -> None:
        """Probing the GPU can take a moment (driver start), so it runs off the UI thread."""
        try:
            line = offload_line(settings)
        except Exception as e:
            line = f"offload: {_error_text(e)}"
        self._to_ui(self._show_offload, offload_id, line)

    def _show_offload(self, offload_id: int, line: str) -> None:
        if offload_id == self._offload_id:  # plans finish out of order: show the latest
            self.query_one("#chat-offload", Static).update(line)
