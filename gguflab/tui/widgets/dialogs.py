"""The job dialogs: each asks for a job's settings from the keyboard and returns a JobSpec
(or None on Escape). The app submits the spec to its JobManager.

Keys in every dialog: Tab moves between fields, Enter in a field or ctrl+s starts the job,
Escape cancels. Bad values get one line in the dialog and the dialog stays open."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.css.query import NoMatches
from textual.screen import ModalScreen
from textual.widgets import Checkbox, Footer, Input, Label, OptionList, SelectionList, Static
from textual.widgets.option_list import Option
from textual.worker import get_current_worker

from ...catalog import default_eval_text
from ...errors import UserError
from ...fmt import size
from ...jobs import JobSpec
from ...quant.mixes import MIXES, Mix

QUANT_DEFAULT = "Q4_K_M"
CONVERT_TYPES = (("f16", "16-bit float (default)"), ("bf16", "bfloat16, as trained models"),
                 ("f32", "32-bit float, largest"), ("q8_0", "8-bit, quantized while converting"),
                 ("auto", "the checkpoint's own float type"))


def quant_mixes() -> list[Mix]:
    """The mixes the dialogs offer: llama.cpp's list without the aliases."""
    return [m for m in MIXES if m.alias_of is None]


def short_hint(m: Mix) -> str:
    """llama.cpp's hint without the model it was measured on (the header says it)."""
    return m.hint.split("@")[0].strip().rstrip(",")


def output_folder(src: str) -> str:
    """Beside the source, unless that is the embedded model's package folder or not
    writable: then the current folder (which the browser scans)."""
    folder = os.path.dirname(os.path.abspath(src))
    try:
        from ...catalog import embedded_model

        embedded = os.path.dirname(embedded_model())
    except UserError:
        embedded = None
    if folder == embedded or not os.access(folder, os.W_OK):
        return os.getcwd()
    return folder


def default_quant_output(src: str, mix: str) -> str:
    """`<dir>/<stem>-<TYPE>.gguf`, the folder from `output_folder`."""
    stem = os.path.basename(src)
    stem = stem[:-5] if stem.lower().endswith(".gguf") else stem
    return os.path.join(output_folder(src), f"{stem}-{mix}.gguf")


def _int(text: str, what: str, low: int | None = None) -> int:
    try:
        v = int(text.strip())
    except ValueError:
        raise UserError(f"{what}: {text!r} is not a whole number") from None
    if low is not None and v < low:
        raise UserError(f"{what}: must be at least {low}")
    return v


def _existing_file(text: str, what: str) -> str:
    path = os.path.expanduser(text.strip())
    if not os.path.isfile(path):
        raise UserError(f"{what}: {path or '(empty)'} is not a file")
    return path


class JobDialog(ModalScreen[JobSpec | None]):
    """The frame shared by the dialogs: title, form, one error line, footer with the keys."""

    BINDINGS = [Binding("escape", "cancel", "Cancel"),
                Binding("ctrl+s", "start", "Start job", priority=True)]

    DEFAULT_CSS = """
    JobDialog { align: center middle; }
    JobDialog > #dialog { width: 90%; max-width: 100; height: auto; max-height: 100%;
                          border: round $accent; background: $panel; padding: 0 1; }
    JobDialog #dialog-title { text-style: bold; height: 1; }
    JobDialog #form { height: auto; }
    JobDialog .row { height: 1; }
    JobDialog .head { height: 1; color: $text-muted; }
    JobDialog .row > Label { width: 16; }
    JobDialog .row > Input { width: 1fr; height: 1; border: none; padding: 0 1;
                             background: $boost; }
    JobDialog .row > Input:focus { background: $primary 40%; }
    JobDialog Checkbox { height: 1; border: none; padding: 0;
                         background: $panel; }
    JobDialog Checkbox:focus { background: $primary 40%; }
    JobDialog OptionList, JobDialog OptionList:focus,
    JobDialog SelectionList, JobDialog SelectionList:focus { height: auto; border: none;
                                                             padding: 0; margin-bottom: 1; }
    /* a fixed share of the screen: an auto height would count every option */
    JobDialog #types { height: 45vh; }
    JobDialog .note { height: auto; color: $text-muted; margin-bottom: 1; }
    JobDialog #error { height: auto; color: $error; text-style: bold; }
    """

    title_text = "job"

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Static(self.title_text, id="dialog-title")
            with Vertical(id="form"):
                yield from self.form()
            yield Static("", id="error")
        yield Footer()

    def form(self) -> ComposeResult:
        yield from ()

    def build_spec(self) -> JobSpec:
        raise NotImplementedError

    def form_row(self, label: str, value: str, id: str, placeholder: str = "") -> Horizontal:
        return Horizontal(Label(label), Input(value, placeholder=placeholder, id=id),
                          classes="row")

    def value(self, id: str) -> str:
        return self.query_one(f"#{id}", Input).value

    def show_error(self, text: str) -> None:
        self.query_one("#error", Static).update(text)

    def action_start(self) -> None:
        try:
            spec = self.build_spec()
        except UserError as e:
            self.show_error(str(e))
            return
        self.dismiss(spec)

    def action_cancel(self) -> None:
        self.dismiss(None)

    def on_input_submitted(self, message: Input.Submitted) -> None:
        message.stop()
        self.action_start()


class QuantizeDialog(JobDialog):
    """Quantize a GGUF: the type (with llama.cpp's hint and this model's dry-run size), the
    output path, overwrite and requantize switches."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self.title_text = f"Quantize {os.path.basename(path)}"
        self.mixes = quant_mixes()
        self.estimates: dict[str, str] = {}  # mix name -> one line about this model's result
        self._auto_out = ""

    def form(self) -> ComposeResult:
        options = [Option(self._prompt(m), id=m.name) for m in self.mixes]
        yield Static("type    llama.cpp's hint (7-8B model) | this model", classes="head")
        yield OptionList(*options, id="types")
        yield Static("estimating sizes for this model…", id="estimate", classes="note")
        yield self.form_row("output", "", "output")
        yield Checkbox("overwrite an existing file (--force)", id="force")
        yield Checkbox("allow requantizing a quantized model", id="requant")

    def _prompt(self, m: Mix) -> str:
        return f"{m.name:<7} {short_hint(m):<20} {self.estimates.get(m.name, '')}"

    def on_mount(self) -> None:
        types = self.query_one("#types", OptionList)
        types.highlighted = next(i for i, m in enumerate(self.mixes) if m.name == QUANT_DEFAULT)
        types.focus()
        self._estimate_all(QUANT_DEFAULT)

    @property
    def mix(self) -> Mix:
        types = self.query_one("#types", OptionList)
        return self.mixes[types.highlighted or 0]

    def on_option_list_option_highlighted(self, message: OptionList.OptionHighlighted) -> None:
        out = self.query_one("#output", Input)
        if out.value in ("", self._auto_out):  # follow the type until the user edits the path
            self._auto_out = default_quant_output(self.path, self.mix.name)
            out.value = self._auto_out
        self._show_estimate()

    def on_option_list_option_selected(self, message: OptionList.OptionSelected) -> None:
        message.stop()
        self.action_start()

    def _show_estimate(self) -> None:
        est = self.estimates.get(self.mix.name)
        text = f"{self.mix.name} for this model: {est}" if est else "estimating…"
        self.query_one("#estimate", Static).update(text)

    @work(thread=True, exclusive=True)
    def _estimate_all(self, first: str) -> None:
        """Dry-run plans of every type off the UI thread (cheap: headers only)."""
        from ...gguf import GGUFReader
        from ...quant.mixes import is_quantized
        from ...quant.pipeline import QuantizeOptions, plan_model

        try:
            r = GGUFReader(self.path)
        except Exception as e:
            self._from_thread(self._reader_failed, str(e))
            return
        quantized = any(is_quantized(t.type) for t in r.tensors)
        if quantized:
            self._from_thread(self._source_quantized)
        worker = get_current_worker()
        for m in sorted(self.mixes, key=lambda m: m.name != first):
            if worker.is_cancelled:  # the dialog was closed
                return
            try:
                plan = plan_model(r, m, QuantizeOptions(dry_run=True, allow_requantize=True))
                n = plan.n_elements or 1
                est = f"{size(plan.dst_bytes)}, {8 * plan.dst_bytes / n:.2f} bpw"
                if any("imatrix" in w for w in plan.warnings):
                    est += " needs imatrix"
            except Exception as e:
                est = f"not possible: {e}"
            self._from_thread(self._got_estimate, m.name, est)

    def _from_thread(self, callback: Callable[..., None], *args: Any) -> None:
        """Run `callback` on the UI thread; the dialog may have closed meanwhile."""

        def guarded() -> None:
            try:
                callback(*args)
            except NoMatches:  # closed: nothing to show the result in
                pass

        self.app.call_from_thread(guarded)

    def _got_estimate(self, name: str, est: str) -> None:
        self.estimates[name] = est
        types = self.query_one("#types", OptionList)
        index = next(i for i, m in enumerate(self.mixes) if m.name == name)
        types.replace_option_prompt_at_index(index, self._prompt(self.mixes[index]))
        self._show_estimate()

    def _reader_failed(self, error: str) -> None:
        self.query_one("#estimate", Static).update(f"cannot read the model: {error}")

    def _source_quantized(self) -> None:
        self.query_one("#requant", Checkbox).value = True
        self.notify("the source is already quantized: requantizing is allowed, quality will "
                    "be worse than from F16/BF16/F32", severity="warning")

    def build_spec(self) -> JobSpec:
        dst = os.path.expanduser(self.value("output").strip())
        if not dst:
            raise UserError("output: give a file name")
        force = self.query_one("#force", Checkbox).value
        if os.path.abspath(dst) == os.path.abspath(self.path):
            raise UserError("output: that is the input file")
        if os.path.exists(dst) and not force:
            raise UserError(f"{dst} exists: tick overwrite or change the name")
        options = {"overwrite": force,
                   "allow_requantize": self.query_one("#requant", Checkbox).value}
        mix = self.mix.name
        return JobSpec("quantize", {"src": self.path, "dst": dst, "mix": mix,
                                    "options": options},
                       title=f"quantize {os.path.basename(self.path)} -> {mix}")


class ConvertDialog(JobDialog):
    """Convert a Hugging Face folder to GGUF: output type and file."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self.title_text = f"Convert {os.path.basename(os.path.normpath(path))} to GGUF"
        self._auto_out = ""

    def form(self) -> ComposeResult:
        yield OptionList(*[Option(f"{t:<5} {hint}", id=t) for t, hint in CONVERT_TYPES],
                         id="outtype")
        yield self.form_row("output", "", "output", placeholder="(beside the checkpoint)")
        yield Checkbox("overwrite an existing file (--force)", id="force")

    def on_mount(self) -> None:
        types = self.query_one("#outtype", OptionList)
        types.highlighted = 0
        types.focus()

    @property
    def outtype(self) -> str:
        return CONVERT_TYPES[self.query_one("#outtype", OptionList).highlighted or 0][0]

    def on_option_list_option_highlighted(self, message: OptionList.OptionHighlighted) -> None:
        from ...convert.pipeline import default_outfile

        out = self.query_one("#output", Input)
        if out.value in ("", self._auto_out):
            # "auto" is resolved by the converter, which then names the file itself
            self._auto_out = ("" if self.outtype == "auto"
                              else default_outfile(self.path, self.outtype))
            out.value = self._auto_out

    def on_option_list_option_selected(self, message: OptionList.OptionSelected) -> None:
        message.stop()
        self.action_start()

    def build_spec(self) -> JobSpec:
        if not os.path.isdir(self.path):
            raise UserError(f"{self.path}: not a folder")
        out = os.path.expanduser(self.value("output").strip()) or None
        force = self.query_one("#force", Checkbox).value
        if out and os.path.exists(out) and not force:
            raise UserError(f"{out} exists: tick overwrite or change the name")
        return JobSpec("convert", {"folder": self.path, "outfile": out,
                                   "options": {"outtype": self.outtype, "overwrite": force}},
                       title=f"convert {os.path.basename(os.path.normpath(self.path))} "
                             f"-> {self.outtype}")


class PerplexityDialog(JobDialog):
    """Perplexity of a GGUF on a text; optionally save or compare KL-divergence logits."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self.title_text = f"Perplexity / KLD of {os.path.basename(path)}"

    def form(self) -> ComposeResult:
        yield self.form_row("text file", default_eval_text(), "text")
        yield self.form_row("context", "512", "ctx")
        yield self.form_row("chunks", "-1", "chunks", placeholder="-1: all")
        yield self.form_row("KLD base", "", "kld", placeholder="(optional) base logits to compare")
        yield self.form_row("save base", "", "save", placeholder="(optional) save logits as base")
        yield Static("KLD: run the base model once with 'save base', then the quantized one "
                     "with that file as 'KLD base'.", classes="note")

    def on_mount(self) -> None:
        self.query_one("#text", Input).focus()

    def build_spec(self) -> JobSpec:
        text = _existing_file(self.value("text"), "text file")
        n_ctx = _int(self.value("ctx"), "context", low=8)
        chunks = _int(self.value("chunks"), "chunks", low=-1)
        kld = self.value("kld").strip()
        kld = _existing_file(kld, "KLD base") if kld else None
        save = os.path.expanduser(self.value("save").strip()) or None
        if kld and save:
            raise UserError("give either a KLD base to compare or one to save, not both")
        return JobSpec("perplexity", {"model": self.path, "text_file": text, "n_ctx": n_ctx,
                                      "chunks": chunks, "kld_base": kld, "save_base": save},
                       title=f"perplexity {os.path.basename(self.path)}")


class SweepDialog(JobDialog):
    """A sweep: quantize to several types and measure size, perplexity, KLD and speed."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self.title_text = f"Sweep {os.path.basename(path)}"

    def form(self) -> ComposeResult:
        from ...sweep import DEFAULT_TYPES

        mixes = [m for m in quant_mixes() if m.default_type is not None]
        yield SelectionList[str](*[(f"{m.name:<7} {short_hint(m)}", m.name,
                                    m.name in DEFAULT_TYPES) for m in mixes], id="types")
        yield self.form_row("text file", default_eval_text(), "text")
        yield self.form_row("context", "512", "ctx")
        yield self.form_row("chunks", "-1", "chunks", placeholder="-1: all")
        yield self.form_row("GPU layers", "0", "ngl")
        yield self.form_row("VRAM", "", "vram", placeholder="(optional) e.g. 8G: marks what fits")

    def on_mount(self) -> None:
        self.query_one("#types", SelectionList).focus()

    def build_spec(self) -> JobSpec:
        from ...sweep import parse_size

        vram = self.value("vram").strip()
        chosen = set(self.query_one("#types", SelectionList).selected)
        types = [m.name for m in quant_mixes() if m.name in chosen]  # llama.cpp's order
        if not types:
            raise UserError("types: select at least one (space toggles)")
        params = {"model": self.path, "types": types,
                  "text_file": _existing_file(self.value("text"), "text file"),
                  "n_ctx": _int(self.value("ctx"), "context", low=8),
                  "chunks": _int(self.value("chunks"), "chunks", low=-1),
                  "n_gpu_layers": _int(self.value("ngl"), "GPU layers", low=0),
                  "vram_bytes": parse_size(vram) if vram else None}
        return JobSpec("sweep", params, title=f"sweep {os.path.basename(self.path)}")
