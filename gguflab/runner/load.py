"""Opening a model to run it: the one path the CLI (run, chat, perplexity), the chat tab and
the sweep share. The context size is settled, the GPU offload planned before anything is
loaded onto a device (with no usable GPU the plan says why and all runs on the CPU), and
the model built with its offloaded layers."""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import UserError
from ..gguf import GGUFReader
from .model import HParams, Model
from .offload import OffloadPlan, plan_for_cli
from .tokenizer import Tokenizer


def context_size(n_ctx: int, n_ctx_train: int) -> int:
    """`-c` as llama.cpp's tools take it: 0 is the model's training context (at most 4096)."""
    n = n_ctx or min(4096, n_ctx_train)
    if n < 8:
        raise UserError(f"context size {n} is too small")
    return n


def set_kernel_threads(threads: int | None) -> None:
    """`-t`: None leaves the setting as it is, 0 means all cores."""
    if threads is None:
        return
    if threads < 0:
        raise UserError(f"--threads {threads}: give 1 or more (0: all cores)")
    from ..jit.parallel import set_threads

    set_threads(threads or None)


@dataclass
class LoadedModel:
    model: Model
    tokenizer: Tokenizer
    n_ctx: int  # the context the offloaded layers' KV cache was sized for
    plan: OffloadPlan | None  # None when no GPU layers were asked for


def load_model(path: str | os.PathLike, n_ctx: int = 0, n_gpu_layers: int | str = 0,
               threads: int | None = None, main_gpu: int = 0) -> LoadedModel:
    """The model at `path`, ready to run with `n_gpu_layers` (llama.cpp's -ngl: the last N
    layers, then the output; "auto": what fits) on GPU `main_gpu`."""
    set_kernel_threads(threads)
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file")
    reader = GGUFReader(path)
    n_ctx = context_size(n_ctx, HParams.from_gguf(reader).n_ctx_train)
    plan = plan_for_cli(reader, n_ctx, n_gpu_layers, main_gpu) if n_gpu_layers else None
    model = Model(reader, offload=plan, n_ctx=n_ctx)
    return LoadedModel(model, Tokenizer.from_gguf(reader), n_ctx, plan)
