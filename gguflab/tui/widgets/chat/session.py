"""What the chat pane runs, kept free of Textual so it reads (and tests) on its own: the
settings form's values, loading a model, the offload plan line, and one streamed reply.

It drives the runner exactly as `gguflab chat` does: the whole conversation is rendered with
the model's chat template and re-evaluated for every reply."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ....errors import UserError
from ....fmt import size
from ....runner.sampling import Sampler, SamplerParams

if TYPE_CHECKING:
    from ....runner.generate import Timings
    from ....runner.model import Model
    from ....runner.tokenizer import Tokenizer

_SAMPLING = SamplerParams()  # `gguflab chat` and the TUI share the runner's defaults


@dataclass
class ChatSettings:
    """The settings form, parsed. Defaults are `gguflab chat`'s."""

    model: str = ""  # "": the embedded SmolLM2
    n_gpu_layers: int | str = 0  # llama.cpp's -ngl: the last N layers, or "auto"
    n_ctx: int = 0  # 0: the model's training context, at most 4096
    threads: int = 0  # 0: all cores
    n_predict: int = -1  # -1: until end of generation
    temp: float = _SAMPLING.temp
    top_k: int = _SAMPLING.top_k
    top_p: float = _SAMPLING.top_p
    min_p: float = _SAMPLING.min_p
    repeat_penalty: float = _SAMPLING.repeat_penalty
    seed: int = -1  # -1: random
    system_prompt: str = ""

    def sampler(self) -> Sampler:
        return Sampler(SamplerParams(temp=self.temp, top_k=self.top_k, top_p=self.top_p,
                                     min_p=self.min_p, repeat_penalty=self.repeat_penalty,
                                     repeat_last_n=_SAMPLING.repeat_last_n,
                                     seed=None if self.seed < 0 else self.seed))

    def context_size(self, n_ctx_train: int) -> int:
        from ....runner.load import context_size

        return context_size(self.n_ctx, n_ctx_train)

    def model_path(self) -> str:
        from ....catalog import embedded_model

        return os.path.expanduser(self.model) if self.model else embedded_model()


# (field, label) in the order the form shows them
FORM_FIELDS: list[tuple[str, str]] = [
    ("model", "model"),
    ("n_gpu_layers", "GPU layers"),
    ("n_ctx", "context"),
    ("threads", "threads"),
    ("n_predict", "max tokens"),
    ("temp", "temperature"),
    ("top_k", "top-k"),
    ("top_p", "top-p"),
    ("min_p", "min-p"),
    ("repeat_penalty", "repeat pen."),
    ("seed", "seed"),
    ("system_prompt", "system"),
]


def parse_settings(values: dict[str, str]) -> ChatSettings:
    """Form strings -> settings; an empty field keeps its default; bad input is one line."""
    out = ChatSettings()
    labels = dict(FORM_FIELDS)
    for name, raw in values.items():
        raw = raw if name == "system_prompt" else raw.strip()
        default = getattr(out, name)
        if raw == "":
            continue
        if name == "n_gpu_layers" and raw.lower() == "auto":
            value = "auto"
        elif isinstance(default, str):
            value = raw
        else:
            try:
                value = float(raw) if isinstance(default, float) else int(raw)
            except ValueError:
                raise UserError(f"{labels[name]}: {raw!r} is not a number") from None
        setattr(out, name, value)
    if out.n_gpu_layers != "auto" and out.n_gpu_layers < 0:
        raise UserError("GPU layers: give a number of layers >= 0, or auto")
    if out.threads < 0 or out.n_ctx < 0:
        raise UserError("context and threads cannot be negative")
    if out.temp < 0 or not 0 <= out.top_p <= 1 or not 0 <= out.min_p <= 1:
        raise UserError("temperature must be >= 0; top-p and min-p within 0..1")
    return out


def offload_line(settings: ChatSettings) -> str:
    """The offload plan for the form's model, context and GPU layers in one line: layers on
    the GPU and memory needed vs free, or why it all runs on the CPU. Probing the GPU can
    take a moment (the driver starts): call it off the UI thread."""
    from ....gguf import GGUFReader
    from ....runner.model import HParams
    from ....runner.offload import plan_for_cli

    reader = GGUFReader(settings.model_path())
    n_ctx = settings.context_size(HParams.from_gguf(reader).n_ctx_train)
    return plan_for_cli(reader, n_ctx, settings.n_gpu_layers).summary()


@dataclass
class LoadedModel:
    """A model ready to chat: weights (memory-mapped), tokenizer and chat template."""

    path: str
    model: Model
    tokenizer: Tokenizer
    template: str
    summary: str

    @classmethod
    def load(cls, path: str, settings: ChatSettings) -> LoadedModel:
        """Load as `gguflab chat` does (`runner.load_model`); with GPU layers asked for, the
        offload plan must fit."""
        from ....gguf import Keys
        from ....runner.chat import pick_template
        from ....runner.load import load_model

        lm = load_model(path, settings.n_ctx, settings.n_gpu_layers)
        hp = lm.model.hp
        summary = (f"{os.path.basename(path)} | {hp.arch}, {hp.n_layer} layers, "
                   f"trained ctx {hp.n_ctx_train}, {size(os.path.getsize(path))}")
        if lm.plan is not None and lm.plan.on_gpu:
            out = " + output" if lm.plan.output_on_gpu else ""
            summary += f" | {len(lm.plan.gpu_layers)}/{hp.n_layer} layers{out} on the GPU"
        return cls(path, lm.model, lm.tokenizer,
                   pick_template(lm.model.reader.get(Keys.CHAT_TEMPLATE)), summary)


@dataclass
class Reply:
    """One finished (or stopped) assistant turn and how long it took."""

    text: str
    timings: Timings
    n_prompt: int = 0  # tokens of the rendered conversation it answered


def stream_reply(lm: LoadedModel, settings: ChatSettings, messages: list[dict],
                 should_stop: Callable[[], bool],
                 on_piece: Callable[[str, int, float], None]) -> Reply:
    """Generate the assistant's next turn for `messages`, calling `on_piece(text, n_tokens,
    tok_per_s)` as text completes; `should_stop()` is asked between tokens."""
    from ....runner.chat import chat_prompt_ids
    from ....runner.generate import Generation, Timings
    from ....runner.load import set_kernel_threads

    set_kernel_threads(settings.threads)  # the form's threads, as `-t` in the CLI
    ids = chat_prompt_ids(lm.tokenizer, lm.template, messages)
    gen = Generation.start(lm.model, lm.tokenizer,
                           settings.context_size(lm.model.hp.n_ctx_train))
    t = Timings()
    text = ""
    t0 = time.perf_counter()
    stream = gen.stream(ids, settings.sampler(), settings.n_predict, timings=t)
    try:
        for piece in stream:
            text += piece
            n = len(gen.history) - len(ids)
            gen_s = time.perf_counter() - t0 - t.prompt_s
            on_piece(piece, n, n / gen_s if gen_s > 0 else 0.0)
            if should_stop():
                # the generator's own accounting ends with it: count what was made
                t.n_gen, t.gen_s, t.stop_reason = n, gen_s, "stopped"
                break
    finally:
        stream.close()
    return Reply(text, t, len(ids))
