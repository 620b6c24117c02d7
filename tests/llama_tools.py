"""llama.cpp's reference tools (llama-quantize, llama-imatrix, llama-perplexity, llama-bench),
built by the Makefile from the llama.cpp that llama-cpp-python vendors, next to the library
the tests load (`.venv/oracle/build/bin`). `GGUFLAB_LLAMA_TOOLS` names another folder."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEFAULT = ROOT / ".venv" / "oracle" / "build" / "bin"


def llama_tool(name: str) -> Path:
    """The path of tool `name`; skips (which fails under CI) when it was not built."""
    folder = Path(os.environ.get("GGUFLAB_LLAMA_TOOLS", DEFAULT))
    path = folder / name
    if not path.exists():
        pytest.skip(f"{name} (the reference tool) is not built in {folder}: run `make test`")
    return path


def run_tool(name: str, *args: str | os.PathLike, timeout: float = 900) -> str:
    """Run a reference tool on this machine's cores; its combined output, or a failed test
    showing it."""
    cmd = [str(llama_tool(name)), *map(str, args)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited {p.returncode}:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p.stdout + p.stderr
