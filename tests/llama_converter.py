"""llama.cpp's own HF -> GGUF converter as a test oracle: `convert_hf_to_gguf.py`, its
`conversion/` package and `gguf-py/`, from the llama.cpp tree that llama-cpp-python's source
package vendors (`make test` unpacks them into .venv/oracle/llama.cpp; GGUFLAB_LLAMA_CPP_SRC
points elsewhere). It runs in a subprocess with this Python (it needs torch and
transformers) and imports the gguf-py beside it, never the `gguf` installed from PyPI.

A conversion costs ~4 s of imports and well under a second of work for the tiny test models:
convert_many() runs several in one process, and results are kept per (folder, outtype) for
the session."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = "convert_hf_to_gguf.py"

# Runs the converter's main() once per job in one process; asserts that the vendored gguf-py
# is the one imported.
_DRIVER = """
import json, runpy, sys
tree, jobs = sys.argv[1], json.loads(sys.argv[2])
sys.path.insert(0, tree)
main = runpy.run_path(tree + "/convert_hf_to_gguf.py", run_name="llama_cpp_converter")["main"]
import gguf
assert gguf.__file__.startswith(tree), gguf.__file__
for folder, outtype, outfile, *flags in jobs:
    sys.argv = ["convert_hf_to_gguf.py", folder, "--outtype", outtype, "--outfile", outfile, *flags]
    main()
"""

# llama.cpp's name heuristics (gguf-py's Metadata) on a list of names, without torch.
_NAMES_DRIVER = """
import json, sys
sys.path.insert(0, sys.argv[1] + "/gguf-py")
import gguf
from gguf.metadata import Metadata
assert gguf.__file__.startswith(sys.argv[1]), gguf.__file__
names, counts, sizes = json.loads(sys.argv[2])
print(json.dumps({
    "parts": [[Metadata.get_model_id_components(n, c) for c in counts] for n in names],
    "titles": [Metadata.id_to_title(n) for n in names],
    "sizes": [gguf.size_label(c, c, 0, 0) for c in sizes],
}))
"""

_done: dict[tuple[str, ...], Path] = {}  # (folder, outtype, *flags) -> file written


def llama_cpp_src() -> Path:
    """The unpacked converter tree, or a skip saying how to get it."""
    env = os.environ.get("GGUFLAB_LLAMA_CPP_SRC")
    candidates = [Path(env)] if env else [Path(sys.prefix) / "oracle" / "llama.cpp",
                                           REPO / ".venv" / "oracle" / "llama.cpp"]
    for tree in candidates:
        if all((tree / p).exists() for p in (SCRIPT, "conversion", "gguf-py/gguf")):
            break
    else:
        pytest.skip(f"llama.cpp's converter (the conversion oracle) not found at "
                    f"{' or '.join(map(str, candidates))}: `make test` unpacks it from the "
                    f"llama-cpp-python source package (or set GGUFLAB_LLAMA_CPP_SRC)")
    for module in ("torch", "transformers"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"llama.cpp's converter needs {module}, which is not installed")
    return tree.resolve()


def _run(code_or_script: list[str], timeout: float) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    p = subprocess.run([sys.executable, *code_or_script], capture_output=True, text=True,
                       env=env, timeout=timeout, stdin=subprocess.DEVNULL)
    if p.returncode:
        raise AssertionError(f"llama.cpp's converter failed (exit {p.returncode}):\n"
                             f"{p.stderr[-4000:]}")
    return p


def convert_with_llama_cpp(folder: str | os.PathLike, outtype: str, outfile: str | os.PathLike,
                           *flags: str) -> Path:
    """`convert_hf_to_gguf.py FOLDER --outtype OUTTYPE --outfile OUTFILE [FLAGS]`; the path
    written (an earlier output when this folder was converted so before in the session)."""
    key = (str(Path(folder).resolve()), outtype, *flags)
    if key not in _done or not _done[key].exists():
        tree = llama_cpp_src()
        _run([str(tree / SCRIPT), key[0], "--outtype", outtype, "--outfile", str(outfile),
              *flags], timeout=600)
        _done[key] = Path(outfile)
    return _done[key]


def convert_many(jobs: Iterable[tuple]) -> list[Path]:
    """Several conversions, each (folder, outtype, outfile, *flags), in one process: the
    imports once. The paths written, in the order of `jobs`."""
    keyed = [((str(Path(f).resolve()), t, *flags), str(o)) for f, t, o, *flags in jobs]
    todo = [(k, o) for k, o in keyed if k not in _done or not _done[k].exists()]
    if todo:
        args = [[k[0], k[1], o, *k[2:]] for k, o in todo]
        _run(["-c", _DRIVER, str(llama_cpp_src()), json.dumps(args)],
             timeout=600 + 60 * len(todo))
        _done.update({k: Path(o) for k, o in todo})
    return [_done[k] for k, _ in keyed]


def llama_cpp_names(names: list[str], counts: list[int], sizes: list[int]) -> dict:
    """llama.cpp's reading of model names: "parts", for each name its components (full name,
    organization, basename, finetune, version, size label) for each parameter count in
    `counts`; "titles", each name title-cased; "sizes", the size label of each of `sizes`."""
    out = _run(["-c", _NAMES_DRIVER, str(llama_cpp_src()), json.dumps([names, counts, sizes])],
               timeout=120)
    return json.loads(out.stdout)


# ---------------------------------------------------------------------------------------------
# where two GGUF files differ, said with gguf-py's reader


def first_difference(ours: str | os.PathLike, theirs: str | os.PathLike) -> str | None:
    """None when the files are the same bytes, else the first thing that differs: a header
    field, a metadata key (name, type or value), a tensor's info or data, or a byte offset."""
    a, b = Path(ours).read_bytes(), Path(theirs).read_bytes()
    if a == b:
        return None
    from gguf import GGUFReader

    ra, rb = GGUFReader(ours), GGUFReader(theirs)
    # the keys first (a different key count is best said by the key), then the header
    fa = [f for f in ra.fields.values() if not f.name.startswith("GGUF.")]
    fb = [f for f in rb.fields.values() if not f.name.startswith("GGUF.")]
    for i, (x, y) in enumerate(zip(fa, fb)):
        if x.name != y.name:
            return f"metadata key #{i}: ours {x.name!r}, llama.cpp's {y.name!r}"
        if x.types != y.types:
            return f"metadata {x.name}: type ours {x.types}, llama.cpp's {y.types}"
        if _field_bytes(x) != _field_bytes(y):
            return (f"metadata {x.name}: ours {_short(x.contents())}, "
                    f"llama.cpp's {_short(y.contents())}")
    if len(fa) != len(fb):
        extra = [f.name for f in (fa[len(fb):] or fb[len(fa):])]
        return (f"metadata: ours has {len(fa)} keys, llama.cpp's {len(fb)}; "
                f"{'ours' if len(fa) > len(fb) else 'theirs'} also has {extra}")
    for name in ("GGUF.version", "GGUF.tensor_count", "GGUF.kv_count"):
        x, y = ra.fields[name].contents(), rb.fields[name].contents()
        if x != y:
            return f"header {name}: ours {x}, llama.cpp's {y}"
    for i, (x, y) in enumerate(zip(ra.tensors, rb.tensors)):
        ix = (x.name, x.tensor_type.name, x.shape.tolist(), int(x.data_offset))
        iy = (y.name, y.tensor_type.name, y.shape.tolist(), int(y.data_offset))
        if ix != iy:
            return f"tensor #{i} (name, type, shape, offset): ours {ix}, llama.cpp's {iy}"
        if x.data.tobytes() != y.data.tobytes():
            return f"tensor {x.name}: data differs"
    if len(ra.tensors) != len(rb.tensors):
        return f"tensors: ours {len(ra.tensors)}, llama.cpp's {len(rb.tensors)}"
    at = next((i for i, (p, q) in enumerate(zip(a, b)) if p != q), min(len(a), len(b)))
    return f"byte {at} (sizes: ours {len(a)}, llama.cpp's {len(b)}): padding or layout"


def _field_bytes(f) -> bytes:
    return b"".join(bytes(p) for p in f.parts)


def _short(v) -> str:
    s = repr(v)
    return s if len(s) < 200 else f"{s[:200]}... ({len(v) if hasattr(v, '__len__') else ''})"
