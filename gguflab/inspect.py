"""What is in a GGUF file, for people (a gguf-dump-like listing) and for scripts (JSON)."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import numpy as np

from . import fmt
from .gguf import GGUFReader, Keys, LlamaFileType, Value, ValueType

ARRAY_HEAD = 8  # items shown of a long array


def value_json(v: Value, full: bool = False) -> Any:
    """A metadata value as JSON: scalars as they are, long arrays summarised unless `full`."""
    if v.type != ValueType.ARRAY:
        return v.value
    items = v.value
    n = len(items)
    shown = items if full or n <= ARRAY_HEAD else items[:ARRAY_HEAD]
    if isinstance(shown, np.ndarray):
        py = [bool(x) for x in shown] if v.item_type == ValueType.BOOL else shown.tolist()
    elif v.item_type == ValueType.ARRAY:
        py = [value_json(x, full) for x in shown]
    else:
        py = list(shown)
    if full or n <= ARRAY_HEAD:
        return py
    return {"length": n, "head": py}


def file_type_name(ftype: int | None) -> str:
    if ftype is None:
        return "unknown"
    try:
        return LlamaFileType(ftype).name.removeprefix("MOSTLY_")
    except ValueError:
        return f"unknown ({ftype})"


def summary(r: GGUFReader) -> dict[str, Any]:
    """The headline facts: architecture, parameters, file type, size and bits per weight."""
    n_params = sum(t.n_elements for t in r.tensors)
    by_type: Counter[str] = Counter()
    bytes_by_type: Counter[str] = Counter()
    for t in r.tensors:
        by_type[t.type.name] += 1
        bytes_by_type[t.type.name] += t.nbytes
    names = {t.name for t in r.tensors}
    features = {
        "experts": r.arch_get(Keys.EXPERT_COUNT),
        "experts_used": r.arch_get(Keys.EXPERT_USED_COUNT),
        "sliding_window": r.arch_get(Keys.SLIDING_WINDOW),
        "qk_norm": "blk.0.attn_q_norm.weight" in names or None,
        "rope_scaling": r.arch_get(Keys.ROPE_SCALING_TYPE)
        or ("llama3 (rope_freqs)" if "rope_freqs.weight" in names else None),
    }
    return {
        "architecture": r.architecture,
        "name": r.get(Keys.NAME),
        "features": {k: v for k, v in features.items() if v is not None},
        "parameters": n_params,
        "file_type": file_type_name(r.get(Keys.FILE_TYPE)),
        "file_size": r.file_size,
        "tensor_bytes": r.tensor_data_bytes,
        "bits_per_weight": 8 * r.tensor_data_bytes / n_params if n_params else 0.0,
        "tensor_types": {
            k: {"count": by_type[k], "bytes": bytes_by_type[k]}
            for k in sorted(by_type, key=lambda k: -bytes_by_type[k])
        },
    }


def to_json(r: GGUFReader, full: bool = False) -> dict[str, Any]:
    return {
        "path": r.path,
        "version": r.version,
        "alignment": r.alignment,
        "data_offset": r.data_offset,
        "summary": summary(r),
        "metadata": {
            k: {
                "type": v.type.name,
                **({"item_type": v.item_type.name} if v.item_type is not None else {}),
                "value": value_json(v, full),
            }
            for k, v in r.metadata.items()
        },
        "tensors": [
            {
                "name": t.name,
                "shape": list(t.ne),
                "type": t.type.name,
                "offset": t.offset - r.data_offset,
                "bytes": t.nbytes,
            }
            for t in r.tensors
        ],
    }


def _value_text(v: Value, width: int = 60) -> str:
    if v.type == ValueType.STRING:
        s = repr(v.value)
        return s if len(s) <= width else s[: width - 4] + "...'"
    if v.type != ValueType.ARRAY:
        return repr(v.value)
    head = value_json(Value(v.type, v.value[:ARRAY_HEAD], v.item_type))
    body = ", ".join(repr(x) for x in head)
    if len(body) > width:
        body = body[:width] + " ..."
    more = ", ..." if len(v.value) > ARRAY_HEAD else ""
    return f"[{body}{more}]"


def render_text(r: GGUFReader) -> str:
    """The listing `gguflab inspect` prints: header, metadata, tensors, summary."""
    s = summary(r)
    out = [
        f"{r.path}: GGUF v{r.version}, {len(r.metadata)} metadata keys, {len(r.tensors)} "
        f"tensors, alignment {r.alignment}, data at offset {r.data_offset}",
        "",
        f"* {len(r.metadata)} key/value pairs",
    ]
    for i, (k, v) in enumerate(r.metadata.items(), 1):
        tname = f"[{v.item_type.name}]" if v.type == ValueType.ARRAY else v.type.name
        n = len(v.value) if v.type == ValueType.ARRAY else 1
        out.append(f"{i:6d}: {tname:10s} | {n:8d} | {k} = {_value_text(v)}")
    out += ["", f"* {len(r.tensors)} tensors"]
    for i, t in enumerate(r.tensors, 1):
        dims = ", ".join(f"{d:5d}" for d in (list(t.ne) + [1] * 4)[:4])
        out.append(
            f"{i:6d}: {t.n_elements:10d} | {dims} | {t.type.name:7s} | "
            f"{fmt.size(t.nbytes):>11s} | {t.name}"
        )
    out += [
        "",
        f"* {s['architecture'] or '?'} model, {fmt.count(s['parameters'])} parameters "
        f"({s['parameters']}), file type {s['file_type']}, "
        f"{fmt.size(s['file_size'])}, {s['bits_per_weight']:.2f} bits per weight",
    ]
    if s["features"]:  # what the family adds: experts, q/k norm, sliding window ...
        label = {"qk_norm": "q/k norm"}
        out.append("    " + ", ".join(
            label.get(k, k.replace("_", " ")) + ("" if v is True else f": {v}")
            for k, v in s["features"].items()))
    for name, d in s["tensor_types"].items():
        out.append(f"    {name:8s} {d['count']:5d} tensors  {fmt.size(d['bytes']):>11s}")
    return "\n".join(out)


def dumps(r: GGUFReader, full: bool = False) -> str:
    return json.dumps(to_json(r, full), indent=1)
