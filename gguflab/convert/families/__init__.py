"""The Hugging Face architectures gguflab converts, one llama.cpp converter family per module
(llama.cpp's `conversion/<family>.py`), each an `Arch` declaration: a new family is one
module here and one line in ARCHES."""

from __future__ import annotations

import os

from ...errors import UserError
from ..arch import Arch, HParams, make_hparams, read_config
from . import gemma, llama, phi3, qwen

ARCHES: tuple[Arch, ...] = (llama.LLAMA, qwen.QWEN2, qwen.QWEN3, qwen.QWEN3MOE, gemma.GEMMA2,
                            gemma.GEMMA3, phi3.PHI3)


def supported_architectures() -> list[str]:
    return [n for a in ARCHES for n in a.hf_names]


def load_hparams(folder: str | os.PathLike) -> HParams:
    """config.json of an HF folder and the family that converts it; one clear error line for
    an architecture no family declares."""
    path, config = read_config(folder)
    names = config.get("architectures") or []
    if not isinstance(names, list):
        names = [str(names)]
    arch = next((a for a in ARCHES for n in names if n in a.hf_names), None)
    if arch is None:
        raise UserError(f"{path}: unsupported architecture {', '.join(map(str, names)) or '(none)'}"
                        f"; gguflab converts {', '.join(supported_architectures())}")
    return make_hparams(arch, path, config)
