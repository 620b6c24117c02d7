"""Jobs: a core function (convert, quantize, perplexity, sweep) run in a worker process, its
events streamed back as JSON-ready dicts. The UI polls a JobManager; a crash, a hang or a
cancel in a job never takes the UI down, and a cancelled job leaves no partial file.

The same kinds run in this process with `run_inline` (the CLI, tests)."""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import queue
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from .errors import UserError
from .events import Event, Failed, Finished, Log, Measured, Progress, Started, TensorDone

# -- the kinds of job: each a generator of events, imported only in the worker ----------------


def quantize_job(src: str, dst: str | None, mix: str,
                 options: dict[str, Any] | None = None) -> Iterator[Event]:
    from .gguf import type_by_name
    from .quant.mixes import parse_mix
    from .quant.pipeline import QuantizeOptions, quantize_model

    opts = {"weights": True, **(options or {})}  # the Jobs tab draws each distribution
    for key in ("output_tensor_type", "token_embedding_type"):
        if opts.get(key) is not None:
            opts[key] = type_by_name(opts[key])
    yield from quantize_model(src, dst, parse_mix(mix), QuantizeOptions(**opts))


def convert_job(folder: str, outfile: str | None = None,
                options: dict[str, Any] | None = None) -> Iterator[Event]:
    from .convert.pipeline import ConvertOptions, convert_model

    yield from convert_model(folder, outfile, ConvertOptions(**(options or {})))


def perplexity_job(model: str, text_file: str | None = None, n_ctx: int = 512,
                   chunks: int = -1, kld_base: str | None = None,
                   save_base: str | None = None, threads: int | None = None) -> Iterator[Event]:
    """llama-perplexity on `text_file`; with `kld_base`, KL-divergence against a base saved
    earlier with `save_base`."""
    from .catalog import default_eval_text
    from .runner.model import Model
    from .runner.perplexity import iter_perplexity
    from .runner.tokenizer import Tokenizer

    text_file = text_file or default_eval_text()
    t0 = time.perf_counter()
    m = Model(model)
    tok = Tokenizer.from_gguf(m.reader)
    try:
        with open(text_file, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise UserError(f"{text_file}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise UserError(f"{text_file}: not UTF-8 text") from None
    tokens = tok.encode(text, add_special=True, parse_special=False)
    steps = iter_perplexity(m, tokens, n_ctx, add_bos=tok.add_bos, bos_id=tok.bos_id,
                            n_chunks=chunks, base_path=kld_base, save_base=save_base)
    yield Started("perplexity", m.path, save_base, max(1, len(tokens) // n_ctx), 0,
                  {"n_tokens": len(tokens), "n_ctx": n_ctx, "text": text_file})
    while True:
        try:
            i, n, ppl = next(steps)
        except StopIteration as stop:
            res = stop.value
            break
        yield Progress(i, n)
        yield Log("info", f"[{i}/{n}] running PPL = {ppl:.4f}")
    values = {"ppl": res.ppl, "ppl_err": res.ppl_err, "n_chunks": res.n_chunks,
              "n_ctx": res.n_ctx, "count": res.count, **(res.kld or {})}
    yield Measured("perplexity", values)
    yield Log("info", f"Final estimate: PPL = {res.ppl:.4f} +/- {res.ppl_err:.5f}")
    yield Finished(save_base, {**values, "seconds": time.perf_counter() - t0})


def imatrix_job(**kwargs: Any) -> Iterator[Event]:
    from .imatrix.collect import collect_imatrix

    yield from collect_imatrix(**kwargs)


def sweep_job(**kwargs: Any) -> Iterator[Event]:
    from .sweep import sweep_model

    yield from sweep_model(**kwargs)


JOB_KINDS: dict[str, Callable[..., Iterator[Event]]] = {
    "quantize": quantize_job,
    "convert": convert_job,
    "perplexity": perplexity_job,
    "sweep": sweep_job,
    "imatrix": imatrix_job,
}


@dataclass
class JobSpec:
    kind: str  # a key of JOB_KINDS
    params: dict[str, Any]  # JSON-serialisable keyword arguments of the kind's function
    title: str = ""

    def __post_init__(self) -> None:
        if self.kind not in JOB_KINDS:
            raise UserError(f"unknown job kind {self.kind!r} (one of {', '.join(JOB_KINDS)})")
        if not self.title:
            self.title = f"{self.kind} {os.path.basename(str(_first(self.params)))}"


def _first(params: dict[str, Any]) -> Any:
    return next(iter(params.values()), "")


def run_inline(spec: JobSpec) -> Iterator[Event]:
    """The job's events in this process (the CLI and tests); errors propagate."""
    yield from JOB_KINDS[spec.kind](**spec.params)


# -- the worker process -----------------------------------------------------------------------

_CANCELLED = "cancelled"


def _work(kind: str, params: dict[str, Any], out: mp.Queue, cancel: Any) -> None:
    """Worker entry: run the job, send every event as a dict, end with Finished or Failed."""
    from .signals import install, signal_name

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C belongs to the UI, which cancels us
    install()  # SIGTERM, or the SIGHUP of a dropped session: the job ends as if cancelled
    gen = None
    try:
        gen = JOB_KINDS[kind](**params)
        for ev in gen:
            out.put(ev.to_dict())
            if cancel.is_set():
                gen.close()  # the job's own cleanup: the partial file is removed
                out.put(Failed(_CANCELLED).to_dict())
                return
    except KeyboardInterrupt as e:  # the job's writers removed their partial files
        out.put(Failed(f"{_CANCELLED} by {signal_name(e) or 'SIGINT'}").to_dict())
        # whoever started us may be gone or no longer reading: never hang flushing the queue
        guard = threading.Timer(5.0, os._exit, (1,))
        guard.daemon = True
        guard.start()
    except UserError as e:
        out.put(Failed(str(e)).to_dict())
    except MemoryError:
        out.put(Failed("out of memory").to_dict())
    except Exception as e:  # a bug: one line for the user, the trace in the log
        out.put(Log("error", traceback.format_exc()).to_dict())
        out.put(Failed(f"{type(e).__name__}: {e}").to_dict())
    finally:
        if gen is not None:
            gen.close()


@dataclass(eq=False)
class Job:
    id: int
    spec: JobSpec
    state: str = "queued"  # queued | running | finished | failed | cancelled
    events: list[Event] = field(default_factory=list)
    started: Started | None = None
    progress: Progress | None = None
    last_tensor: TensorDone | None = None
    result: Finished | None = None
    error: str | None = None
    t_start: float | None = None
    t_end: float | None = None
    _proc: Any = field(default=None, repr=False)
    _queue: Any = field(default=None, repr=False)
    _cancel: Any = field(default=None, repr=False)
    _cancel_at: float | None = field(default=None, repr=False)
    _tensor_bytes: int = field(default=0, repr=False)

    @property
    def done(self) -> bool:
        return self.state in ("finished", "failed", "cancelled")

    @property
    def target(self) -> str | None:
        return self.started.target if self.started else None

    @property
    def elapsed(self) -> float:
        if self.t_start is None:
            return 0.0
        return (self.t_end or time.monotonic()) - self.t_start

    @property
    def bytes_done(self) -> int:
        """Input bytes processed: Progress events inside a tensor, TensorDone between them."""
        p = self.progress.bytes_done if self.progress else 0
        return max(p, self._tensor_bytes)

    @property
    def fraction(self) -> float:
        if self.state == "finished":
            return 1.0
        total_bytes = self.started.total_bytes if self.started else 0
        if total_bytes:
            return min(1.0, self.bytes_done / total_bytes)
        p = self.progress
        if p is not None and p.total:
            return min(1.0, p.done / p.total)
        t = self.last_tensor
        return t.index / t.total if t is not None and t.total else 0.0

    @property
    def bytes_per_second(self) -> float | None:
        if not self.bytes_done or self.elapsed <= 0:
            return None
        return self.bytes_done / self.elapsed

    @property
    def eta_seconds(self) -> float | None:
        f = self.fraction
        if self.done or f <= 0 or self.elapsed <= 0:
            return None
        eta = self.elapsed * (1 - f) / f
        return eta if math.isfinite(eta) else None

    def _apply(self, ev: Event) -> None:
        self.events.append(ev)
        if isinstance(ev, Started):
            self.started = ev
        elif isinstance(ev, Progress):
            self.progress = ev
        elif isinstance(ev, TensorDone):
            self.last_tensor = ev
            self._tensor_bytes += ev.bytes_in
        elif isinstance(ev, Finished):
            self.result, self.state = ev, "finished"
        elif isinstance(ev, Failed):
            self.error = ev.error
            self.state = "cancelled" if ev.error.startswith(_CANCELLED) else "failed"
        if self.done:
            self.t_end = time.monotonic()


class JobManager:
    """Queue of jobs, each in its own worker process; `poll()` from the UI's timer."""

    def __init__(self, max_running: int = 1, cancel_grace: float = 5.0):
        self.max_running = max_running
        self.cancel_grace = cancel_grace
        self.jobs: list[Job] = []
        self._ctx = mp.get_context("spawn")  # never fork a process that runs UI threads

    def submit(self, spec: JobSpec) -> Job:
        job = Job(len(self.jobs) + 1, spec)
        self.jobs.append(job)
        self._start_queued()
        return job

    def _running(self) -> list[Job]:
        return [j for j in self.jobs if j.state == "running"]

    def _start_queued(self) -> None:
        for job in self.jobs:
            if len(self._running()) >= self.max_running:
                return
            if job.state == "queued":
                _start_resource_tracker()
                job._queue = self._ctx.Queue()
                job._cancel = self._ctx.Event()
                job._proc = self._ctx.Process(
                    target=_work, args=(job.spec.kind, job.spec.params, job._queue, job._cancel),
                    name=f"gguflab-job-{job.id}", daemon=True)
                job._proc.start()
                job.state, job.t_start = "running", time.monotonic()

    def poll(self) -> list[tuple[Job, Event]]:
        """Events that arrived since the last call; starts queued jobs when others end."""
        got: list[tuple[Job, Event]] = []
        for job in self._running():
            while not job.done:
                try:
                    d = job._queue.get_nowait()
                except queue.Empty:
                    break
                except (EOFError, OSError):
                    break
                ev = Event.from_dict(d)
                job._apply(ev)
                got.append((job, ev))
            if job.done:
                self._reap(job)
            elif not job._proc.is_alive():
                # drain what is left; a worker that died without a last word is a failure
                time.sleep(0.05)
                try:
                    while not job.done:
                        ev = Event.from_dict(job._queue.get_nowait())
                        job._apply(ev)
                        got.append((job, ev))
                except (queue.Empty, EOFError, OSError):
                    pass
                if not job.done:
                    code = job._proc.exitcode
                    why = (_CANCELLED if job._cancel_at is not None
                           else f"the worker process died (exit code {code})")
                    ev = Failed(why)
                    job._apply(ev)
                    got.append((job, ev))
                self._reap(job)
            elif job._cancel_at is not None and time.monotonic() > job._cancel_at:
                job._proc.kill()  # did not stop in time: the partial file is removed in _reap
        self._start_queued()
        return got

    def _reap(self, job: Job) -> None:
        if job._proc is not None:
            job._proc.join(timeout=2)
            if job._proc.is_alive():
                job._proc.kill()
                job._proc.join(timeout=2)
        if job.state != "finished":
            _remove_partial(job)
        if job._queue is not None:
            job._queue.close()
            job._queue.cancel_join_thread()
        job._proc = job._queue = None

    def cancel(self, job: Job) -> None:
        """Ask the job to stop; it closes its output (removing the partial file) within the
        grace period or is killed, and the partial file is removed here."""
        if job.state == "queued":
            job._apply(Failed(_CANCELLED))
        elif job.state == "running" and job._cancel_at is None:
            job._cancel.set()
            job._cancel_at = time.monotonic() + self.cancel_grace

    def wait(self, job: Job, timeout: float = 60.0) -> Job:
        """Poll until `job` is done (tests, the CLI); raises TimeoutError."""
        end = time.monotonic() + timeout
        while not job.done:
            if time.monotonic() > end:
                raise TimeoutError(f"job {job.id} ({job.spec.title}) still {job.state}")
            self.poll()
            time.sleep(0.02)
        return job

    def writing(self) -> set[str]:
        """Targets of running jobs, as absolute paths (the browser marks them)."""
        return {os.path.abspath(j.target) for j in self._running() if j.target}

    def shutdown(self) -> None:
        for job in self.jobs:
            self.cancel(job)
        end = time.monotonic() + self.cancel_grace + 1
        while self._running() and time.monotonic() < end:
            self.poll()
            time.sleep(0.02)
        for job in self._running():
            job._proc.kill()
            job._apply(Failed(_CANCELLED))
            self._reap(job)


def _start_resource_tracker() -> None:
    """multiprocessing starts its resource tracker on first use and hands it sys.stderr's fd;
    under a TUI sys.stderr may be a capture whose fileno() is -1, and the start would fail
    ("bad value(s) in fds_to_keep"): start it with the process's real stderr."""
    from multiprocessing import resource_tracker

    saved = sys.stderr
    sys.stderr = sys.__stderr__
    try:
        resource_tracker.ensure_running()
    finally:
        sys.stderr = saved


def _remove_partial(job: Job) -> None:
    """After a failed or killed job, no `.partial` is left beside its target."""
    targets = [job.target, job.spec.params.get("dst"), job.spec.params.get("outfile"),
               job.spec.params.get("save_base")]
    for t in {t for t in targets if t}:
        try:
            os.remove(str(t) + ".partial")
        except OSError:
            pass
