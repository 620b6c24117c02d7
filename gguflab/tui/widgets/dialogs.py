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
from ...quant.mixes import ALL_MIXES, Mix, requires_imatrix

QUANT_DEFAULT = "Q4_K_M"
CONVERT_TYPES = (("f16", "16-bit float (default)"), ("bf16", "bfloat16, as trained models"),
                 ("f32", "32-bit float, largest"), ("q8_0", "8-bit, quantized while converting"),
                 ("auto", "the checkpoint's own float type"))


def quant_mixes() -> list[Mix]:
    """The mixes the dialogs offer: every target llama-quantize takes (i-quants, ternary and
    MXFP4 included), in its order, without the aliases."""
    return [m for m in ALL_MIXES if m.alias_of is None]


def mix_available(m: Mix) -> bool:
    """Whether gguflab can quantize to the mix's main type yet (COPY always can)."""
    from ...quant import REGISTRY

    return m.default_type is None or m.default_type in REGISTRY


def mix_needs_imatrix(m: Mix) -> bool:
    """llama.cpp's rule (`mixes.requires_imatrix`) for a mix's main type on a repeating
    layer's weight: the lowest-bit i-quants (and Q2_K_S) cannot be made without an imatrix.
    The dialog refines it per model from the dry-run plan."""
    return m.default_type is not None and requires_imatrix("blk.0.ffn_down.weight",
                                                           m.default_type, m)


IMATRIX_NAMES = ("imatrix.gguf", "imatrix.dat")  # llama-imatrix's default output names


def find_imatrix(model: str) -> str | None:
    """An importance matrix beside `model`: `<stem>.imatrix.gguf` first, then any other
    `*.imatrix.gguf` (newest first), then `imatrix.gguf` / `imatrix.dat`; None if none."""
    folder = os.path.dirname(os.path.abspath(model))
    stem = os.path.basename(model)
    stem = stem[:-5] if stem.lower().endswith(".gguf") else stem
    try:
        names = [n for n in os.listdir(folder) if os.path.isfile(os.path.join(folder, n))]
    except OSError:
        return None
    own = f"{stem}.imatrix.gguf"
    others = sorted((n for n in names if n.endswith(".imatrix.gguf") and n != own),
                    key=lambda n: -os.path.getmtime(os.path.join(folder, n)))
    for n in [own, *others, *IMATRIX_NAMES]:
        if n in names:
            return os.path.join(folder, n)
    # the imatrix dialog writes beside the model, or where `output_folder` says
    made = os.path.join(output_folder(model), own)
    return made if os.path.isfile(made) else None


def default_imatrix_output(src: str) -> str:
    """`<dir>/<stem>.imatrix.gguf`, the folder from `output_folder` (where the quantize
    dialog looks for it)."""
    stem = os.path.basename(src)
    stem = stem[:-5] if stem.lower().endswith(".gguf") else stem
    return os.path.join(output_folder(src), f"{stem}.imatrix.gguf")


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
    """Quantize a GGUF: the type (with llama.cpp's hint, this model's dry-run size and
    whether it needs an importance matrix), the imatrix found beside the model, the output
    path, overwrite and requantize switches. Types gguflab cannot make yet are greyed."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self.title_text = f"Quantize {os.path.basename(path)}"
        self.mixes = quant_mixes()
        self.estimates: dict[str, str] = {}  # mix name -> one line about this model's result
        # mix name -> whether this model's tensors need an imatrix for it (the dry run's
        # answer; the static rule until it comes)
        self.needs_imatrix: dict[str, bool] = {m.name: mix_needs_imatrix(m) for m in self.mixes}
        # mix name -> why it cannot be made (type not in gguflab yet)
        self.unavailable: dict[str, str] = {
            m.name: f"{m.name}: gguflab cannot quantize to {m.default_type.name} yet"
            for m in self.mixes if not mix_available(m)}
        self.found_imatrix = find_imatrix(path)
        self._auto_out = ""

    def form(self) -> ComposeResult:
        options = [Option(self._prompt(m), id=m.name, disabled=m.name in self.unavailable)
                   for m in self.mixes]
        yield Static("type      imatrix llama.cpp's hint (7-8B) | this model", classes="head")
        yield OptionList(*options, id="types")
        yield Static("estimating sizes for this model…", id="estimate", classes="note")
        yield self.form_row("output", "", "output")
        yield self.form_row("imatrix", self.found_imatrix or "", "imatrix",
                            placeholder="(none found beside the model: i makes one)")
        yield Checkbox("use the importance matrix", self.found_imatrix is not None,
                       id="use-imatrix")
        yield Checkbox("overwrite an existing file (--force)", id="force")
        yield Checkbox("allow requantizing a quantized model", id="requant")

    def _prompt(self, m: Mix) -> str:
        need = "needed" if self.needs_imatrix.get(m.name) else ""
        est = self.unavailable.get(m.name) and "not in gguflab yet"
        return f"{m.name:<9} {need:<7} {short_hint(m):<22} {est or self.estimates.get(m.name, '')}"

    def on_mount(self) -> None:
        types = self.query_one("#types", OptionList)
        types.highlighted = next(i for i, m in enumerate(self.mixes) if m.name == QUANT_DEFAULT)
        types.focus()
        self._estimate_all(QUANT_DEFAULT)

    @property
    def mix(self) -> Mix:
        types = self.query_one("#types", OptionList)
        return self.mixes[types.highlighted or 0]

    @property
    def imatrix(self) -> str | None:
        """The imatrix the job will use: the field's file when the box is ticked."""
        if not self.query_one("#use-imatrix", Checkbox).value:
            return None
        return os.path.expanduser(self.value("imatrix").strip()) or None

    def on_option_list_option_highlighted(self, message: OptionList.OptionHighlighted) -> None:
        out = self.query_one("#output", Input)
        if out.value in ("", self._auto_out):  # follow the type until the user edits the path
            self._auto_out = default_quant_output(self.path, self.mix.name)
            out.value = self._auto_out
        self._show_estimate()

    def on_option_list_option_selected(self, message: OptionList.OptionSelected) -> None:
        message.stop()
        self.action_start()

    def on_input_changed(self, message: Input.Changed) -> None:
        if message.input.id == "imatrix":  # a path typed in is meant to be used
            self.query_one("#use-imatrix", Checkbox).value = bool(message.value.strip())

    def _show_estimate(self) -> None:
        name = self.mix.name
        est = self.estimates.get(name)
        text = f"{name} for this model: {est}" if est else "estimating…"
        if self.needs_imatrix.get(name):
            text += f"\n{name} needs an importance matrix: " + (
                f"using {os.path.basename(self.imatrix)}" if self.imatrix
                else "none chosen (i on the model makes one)")
        self.query_one("#estimate", Static).update(text)

    def on_checkbox_changed(self, message: Checkbox.Changed) -> None:
        if message.checkbox.id == "use-imatrix":
            self._show_estimate()

    @work(thread=True, exclusive=True)
    def _estimate_all(self, first: str) -> None:
        """Dry-run plans of every type off the UI thread (cheap: headers only): the size,
        whether the model's tensors need an imatrix, whether gguflab has every type."""
        from ...gguf import GGUFReader
        from ...quant import REGISTRY
        from ...quant.mixes import is_quantized
        from ...quant.pipeline import QuantizeOptions, plan_model
        from ...sweep import plan_needs_imatrix

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
            if m.name in self.unavailable:
                continue
            needs, missing = self.needs_imatrix[m.name], None
            try:
                plan = plan_model(r, m, QuantizeOptions(dry_run=True, allow_requantize=True))
                n = plan.n_elements or 1
                est = f"{size(plan.dst_bytes)}, {8 * plan.dst_bytes / n:.2f} bpw"
                needs = plan_needs_imatrix(plan, m)
                missing = next((p.dst_type.name for p in plan.tensors
                                if p.converted and p.dst_type not in REGISTRY), None)
            except Exception as e:
                est = f"not possible: {e}"
            self._from_thread(self._got_estimate, m.name, est, needs, missing)

    def _from_thread(self, callback: Callable[..., None], *args: Any) -> None:
        """Run `callback` on the UI thread; the dialog may have closed meanwhile."""

        def guarded() -> None:
            try:
                callback(*args)
            except NoMatches:  # closed: nothing to show the result in
                pass

        self.app.call_from_thread(guarded)

    def _got_estimate(self, name: str, est: str, needs: bool = False,
                      missing: str | None = None) -> None:
        self.estimates[name] = est
        self.needs_imatrix[name] = needs
        types = self.query_one("#types", OptionList)
        index = next(i for i, m in enumerate(self.mixes) if m.name == name)
        if missing is not None:  # a tensor of this model would get a type gguflab lacks
            self.unavailable[name] = (f"{name}: this model needs {missing}, which gguflab "
                                      "cannot quantize to yet")
            types.disable_option_at_index(index)
        types.replace_option_prompt_at_index(index, self._prompt(self.mixes[index]))
        self._show_estimate()

    def _reader_failed(self, error: str) -> None:
        self.query_one("#estimate", Static).update(f"cannot read the model: {error}")

    def _source_quantized(self) -> None:
        self.query_one("#requant", Checkbox).value = True
        self.notify("the source is already quantized: requantizing is allowed, quality will "
                    "be worse than from F16/BF16/F32", severity="warning")

    def build_spec(self) -> JobSpec:
        mix = self.mix.name
        if mix in self.unavailable:
            raise UserError(self.unavailable[mix])
        imatrix = self.imatrix
        if self.query_one("#use-imatrix", Checkbox).value and not imatrix:
            raise UserError("imatrix: give a file, or untick 'use the importance matrix'")
        if imatrix:
            imatrix = _existing_file(imatrix, "imatrix")
        elif self.needs_imatrix.get(mix):
            why = ("it is turned off" if self.found_imatrix else
                   "none found beside the model: press i on the model to make one")
            raise UserError(f"{mix} needs an importance matrix; {why}")
        dst = os.path.expanduser(self.value("output").strip())
        if not dst:
            raise UserError("output: give a file name")
        force = self.query_one("#force", Checkbox).value
        if os.path.abspath(dst) == os.path.abspath(self.path):
            raise UserError("output: that is the input file")
        if os.path.exists(dst) and not force:
            raise UserError(f"{dst} exists: tick overwrite or change the name")
        options: dict[str, Any] = {"overwrite": force,
                                   "allow_requantize": self.query_one("#requant",
                                                                      Checkbox).value}
        title = f"quantize {os.path.basename(self.path)} -> {mix}"
        if imatrix:
            options["imatrix"] = imatrix
            title += f" +imatrix {os.path.basename(imatrix)}"
        return JobSpec("quantize", {"src": self.path, "dst": dst, "mix": mix,
                                    "options": options}, title=title)


class ImatrixDialog(JobDialog):
    """Collect an importance matrix (llama-imatrix) with a GGUF model over a text: the
    quantize dialog then finds it beside the model."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self.title_text = f"Importance matrix of {os.path.basename(path)}"

    def form(self) -> ComposeResult:
        yield self.form_row("text file", default_eval_text(), "text")
        yield self.form_row("context", "512", "ctx")
        yield self.form_row("chunks", "-1", "chunks", placeholder="-1: all")
        yield self.form_row("output", default_imatrix_output(self.path), "output")
        yield Checkbox("overwrite an existing file", id="force")
        yield Static("The quantize dialog (k) offers <model>.imatrix.gguf beside the model; "
                     "IQ1/IQ2 types and Q2_K_S need one, the others get better with one.",
                     classes="note")

    def on_mount(self) -> None:
        self.query_one("#text", Input).focus()

    def build_spec(self) -> JobSpec:
        text = _existing_file(self.value("text"), "text file")
        n_ctx = _int(self.value("ctx"), "context", low=8)
        chunks = _int(self.value("chunks"), "chunks", low=-1)
        if chunks == 0:
            raise UserError("chunks: 0 collects nothing; give a count, or -1 for all")
        out = os.path.expanduser(self.value("output").strip())
        if not out:
            raise UserError("output: give a file name")
        if os.path.abspath(out) == os.path.abspath(self.path):
            raise UserError("output: that is the model file")
        if os.path.exists(out) and not self.query_one("#force", Checkbox).value:
            raise UserError(f"{out} exists: tick overwrite or change the name")
        fmt = "dat" if out.lower().endswith(".dat") else "gguf"
        return JobSpec("imatrix", {"model": self.path, "text_file": text, "output": out,
                                   "n_ctx": n_ctx, "chunks": chunks, "output_format": fmt},
                       title=f"imatrix {os.path.basename(self.path)}")


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

        mixes = [m for m in quant_mixes() if m.default_type is not None and mix_available(m)]
        yield SelectionList[str](*[(f"{m.name:<9} {'imatrix' if mix_needs_imatrix(m) else '':<7}"
                                    f" {short_hint(m)}", m.name, m.name in DEFAULT_TYPES)
                                   for m in mixes], id="types")
        yield self.form_row("text file", default_eval_text(), "text")
        yield self.form_row("context", "512", "ctx")
        yield self.form_row("chunks", "-1", "chunks", placeholder="-1: all")
        yield self.form_row("GPU layers", "0", "ngl")
        yield self.form_row("VRAM", "", "vram", placeholder="(optional) e.g. 8G: marks what fits")
        yield self.form_row("imatrix", find_imatrix(self.path) or "", "imatrix",
                            placeholder="(optional) also measure each type with it: TYPE+imat")

    def on_mount(self) -> None:
        self.query_one("#types", SelectionList).focus()

    def build_spec(self) -> JobSpec:
        from ...quant.mixes import parse_mix
        from ...sweep import parse_size

        vram = self.value("vram").strip()
        chosen = set(self.query_one("#types", SelectionList).selected)
        types = [m.name for m in quant_mixes() if m.name in chosen]  # llama.cpp's order
        if not types:
            raise UserError("types: select at least one (space toggles)")
        imatrix = self.value("imatrix").strip()
        imatrix = _existing_file(imatrix, "imatrix") if imatrix else None
        needy = [t for t in types if mix_needs_imatrix(parse_mix(t))]
        if needy and imatrix is None:
            verb = "needs" if len(needy) == 1 else "need"
            raise UserError(f"{', '.join(needy)} {verb} an importance matrix: give one, or "
                            "untick it")
        params = {"model": self.path, "types": types,
                  "text_file": _existing_file(self.value("text"), "text file"),
                  "n_ctx": _int(self.value("ctx"), "context", low=8),
                  "chunks": _int(self.value("chunks"), "chunks", low=-1),
                  "n_gpu_layers": _int(self.value("ngl"), "GPU layers", low=0),
                  "vram_bytes": parse_size(vram) if vram else None, "imatrix": imatrix}
        return JobSpec("sweep", params, title=f"sweep {os.path.basename(self.path)}")
