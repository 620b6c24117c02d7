"""The events every long operation yields. The CLI prints them, the TUI draws them, tests
assert on them, and jobs send them between processes as JSON."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any


@dataclass
class Event:
    def to_dict(self) -> dict[str, Any]:
        return {"event": type(self).__name__, **asdict(self)}

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Event:
        d = dict(d)
        cls = EVENT_TYPES[d.pop("event")]
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class Started(Event):
    job: str  # "quantize", "convert", ...
    source: str
    target: str | None
    total: int  # units of work (tensors)
    total_bytes: int = 0  # input bytes, for throughput and ETA
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class TensorDone(Event):
    index: int  # 1-based, in processing order
    total: int
    name: str
    shape: list[int]  # ggml order (ne), as llama.cpp prints it
    src_type: str
    dst_type: str
    bytes_in: int
    bytes_out: int
    seconds: float
    hist: list[int] | None = None  # counts of quantized levels in 16 bins
    rmse: float | None = None  # relative RMSE of dequantized vs input
    converted: bool = True  # False when the bytes were copied as they were
    note: str = ""  # e.g. the fallback type reason
    weights: dict[str, Any] | None = None  # input distribution: {"counts", "lo", "hi"}


@dataclass
class Log(Event):
    level: str  # "info" | "warning" | "error"
    text: str


@dataclass
class Progress(Event):
    done: int
    total: int
    bytes_done: int = 0
    total_bytes: int = 0


@dataclass
class Finished(Event):
    path: str | None
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class Failed(Event):
    error: str


@dataclass
class Measured(Event):
    """One row of results as it is measured (a sweep's row for one type, a perplexity
    figure): `name` says what was measured, `values` holds JSON-serialisable figures."""
    name: str
    values: dict[str, Any] = field(default_factory=dict)


EVENT_TYPES: dict[str, type[Event]] = {
    c.__name__: c for c in (Started, TensorDone, Log, Progress, Finished, Failed, Measured)
}
