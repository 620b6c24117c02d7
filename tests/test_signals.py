"""`kill` (SIGTERM) and a hangup (SIGHUP) end a long run the way Ctrl-C does: the command
says so and exits non-zero, no `*.partial` is left and a file already at the target is
untouched. Each run is held with SIGSTOP while the signal is sent, so it is still working
however fast the machine: no sleeps, no races."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from hf_models import llama_config, random_weights, write_folder

from gguflab.jobs import JobManager, JobSpec
from gguflab.synth import SynthConfig, write_synthetic_llama

# big enough (216 MB of F16, tokenizer included) that quantizing it on one thread, or one
# imatrix chunk of it, takes a while on any machine
BIG = SynthConfig(n_layer=4, n_embd=1024, n_ff=4096, n_head=8, n_head_kv=2, tied=True)
OLD = b"an existing file that must survive\n"
SIGNALS = [signal.SIGTERM, signal.SIGHUP]


@pytest.fixture(scope="module")
def big(module_tmp, smollm2) -> str:
    path = module_tmp("signals") / "big.gguf"
    from dataclasses import replace

    return str(write_synthetic_llama(path, replace(BIG, tokenizer_from=smollm2)))


def _default_hup() -> None:  # the child takes SIGHUP's default even under nohup
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


def start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "gguflab", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_default_hup)


def wait_until(ready, proc: subprocess.Popen | None = None, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while not ready():
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"exited {proc.returncode} before it was ready: {proc.stderr.read()}")
        if time.monotonic() > end:
            pytest.fail("not ready in time")
        time.sleep(0.005)


def interrupt(pid: int, signum: int) -> None:
    """Deliver `signum` while the process is held, so it cannot finish first."""
    os.kill(pid, signal.SIGSTOP)
    try:
        os.kill(pid, signum)
    finally:
        os.kill(pid, signal.SIGCONT)


def check_ended(proc: subprocess.Popen, signum: int, folder: Path, target: Path) -> str:
    _, err = proc.communicate(timeout=120)
    name = signal.Signals(signum).name
    assert proc.returncode == 128 + signum, err
    assert f"gguflab: interrupted by {name}" in err
    assert "Traceback" not in err
    assert not list(folder.glob("*.partial"))
    assert target.read_bytes() == OLD
    return err


@pytest.mark.parametrize("signum", SIGNALS, ids=lambda s: signal.Signals(s).name)
def test_quantize(big, tmp_path, signum):
    out = tmp_path / "out.gguf"
    out.write_bytes(OLD)
    partial = Path(str(out) + ".partial")
    proc = start("quantize", "--force", big, str(out), "Q4_K_M", "1")
    wait_until(partial.exists, proc)
    interrupt(proc.pid, signum)
    check_ended(proc, signum, tmp_path, out)


def test_convert(tmp_path, fixtures):
    cfg = llama_config(n_embd=512, n_ff=2048, n_layer=4, n_head=8, n_head_kv=2)
    folder = write_folder(tmp_path / "hf", cfg, random_weights(cfg),
                          fixtures / "llama2-tokenizer.model")
    out = tmp_path / "out.gguf"
    out.write_bytes(OLD)
    partial = Path(str(out) + ".partial")
    proc = start("convert", str(folder), "--outfile", str(out), "--force", "-t", "1")
    wait_until(partial.exists, proc)
    interrupt(proc.pid, signal.SIGTERM)
    check_ended(proc, signal.SIGTERM, tmp_path, out)


def test_imatrix(big, tmp_path, smollm2):
    from gguflab.catalog import default_eval_text

    out = tmp_path / "imatrix.gguf"
    out.write_bytes(OLD)
    # the first chunk is interrupted: nothing whole to keep, the old file stays as it was
    proc = start("imatrix", "-m", big, "-f", default_eval_text(), "-o", str(out), "-c", "512",
                 "--chunks", "2", "-t", "1")
    for line in proc.stderr:
        if line.startswith("imatrix: "):  # Started: the first chunk is under way
            break
    interrupt(proc.pid, signal.SIGHUP)
    check_ended(proc, signal.SIGHUP, tmp_path, out)


def test_job_worker_ends_on_hangup(big, tmp_path):
    # a dropped session sends SIGHUP to the job's worker process too: it stops as if
    # cancelled, its partial file removed
    out = tmp_path / "out.gguf"
    out.write_bytes(OLD)
    partial = Path(str(out) + ".partial")
    manager = JobManager()
    job = manager.submit(JobSpec("quantize", {"src": big, "dst": str(out), "mix": "Q4_K_M",
                                              "options": {"threads": 1, "overwrite": True}}))

    def writing() -> bool:
        manager.poll()
        return partial.exists() or job.done

    wait_until(writing)
    assert not job.done, job.error
    proc = job._proc
    interrupt(proc.pid, signal.SIGHUP)
    manager.wait(job, timeout=120)
    assert job.state == "cancelled" and job.error == "cancelled by SIGHUP"
    assert proc.exitcode is not None  # the worker is gone
    assert not partial.exists() and out.read_bytes() == OLD


def test_tui_hangup_cancels_its_jobs(big, tmp_path):
    # SIGHUP to the TUI (an SSH session dropped): its jobs are cancelled, their partial
    # files removed, and the app ends
    from gguflab.tui.app import GgufLabApp

    out = tmp_path / "out.gguf"
    out.write_bytes(OLD)
    partial = Path(str(out) + ".partial")

    async def run() -> GgufLabApp:
        app = GgufLabApp([str(tmp_path)])
        async with app.run_test(size=(80, 24)) as pilot:
            app.submit(JobSpec("quantize", {"src": big, "dst": str(out), "mix": "Q4_K_M",
                                            "options": {"threads": 1, "overwrite": True}}))
            job = app.manager.jobs[0]
            end = time.monotonic() + 120
            while not (partial.exists() or job.done) and time.monotonic() < end:
                await pilot.pause(0.01)
            assert partial.exists() and not job.done, job.error
            # the app's own handler, never the default (that would end pytest)
            assert signal.getsignal(signal.SIGHUP) not in (signal.SIG_DFL, signal.SIG_IGN)
            # still working when the hangup comes; it goes on once asked to stop
            pid = job._proc.pid
            os.kill(pid, signal.SIGSTOP)
            resume = threading.Timer(0.3, os.kill, (pid, signal.SIGCONT))
            resume.start()
            try:
                os.kill(os.getpid(), signal.SIGHUP)
                await pilot.pause(0.1)
            finally:
                resume.join()
            end = time.monotonic() + 60
            while app.is_running and time.monotonic() < end:
                await pilot.pause(0.05)
        return app

    app = asyncio.run(run())
    job = app.manager.jobs[0]
    assert app.return_code == 128 + signal.SIGHUP
    assert job.state == "cancelled"
    assert not partial.exists() and out.read_bytes() == OLD


def test_sweep(big, tmp_path):
    # the sweep's own quantize is under way: the file it writes goes, the table is not made
    from gguflab.catalog import default_eval_text

    proc = start("sweep", "-m", big, "--types", "Q4_0", "--out-dir", str(tmp_path), "-f",
                 default_eval_text(), "--chunks", "1", "-t", "1")
    wait_until(lambda: any(tmp_path.glob("*.partial")), proc)
    interrupt(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "gguflab: interrupted by SIGTERM" in err and "Traceback" not in err
    assert not list(tmp_path.glob("*.partial")) and not list(tmp_path.glob("*.gguf"))


@pytest.mark.parametrize("at", ["close", "rename"])
def test_an_interrupt_while_committing_leaves_the_target_and_no_partial(tmp_path, monkeypatch,
                                                                        at):
    """The last window: a signal (here its KeyboardInterrupt) between the last write and the
    rename, or in the rename itself: the old file stays as it was, the partial goes. The
    writers of GGUF files, KLD bases, imatrix files and sweep caches all commit this way."""
    from gguflab.gguf import GGUFWriter
    from gguflab.partial import PartialFile

    target = tmp_path / "out.gguf"
    target.write_bytes(OLD)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    writer = GGUFWriter(target, {"general.name": "x"}, [], overwrite=True)
    if at == "close":
        monkeypatch.setattr(writer._out.file, "close", interrupted)
    else:
        monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        writer.finish()
    monkeypatch.undo()
    assert target.read_bytes() == OLD
    assert os.listdir(tmp_path) == ["out.gguf"]
    with PartialFile(target, RuntimeError) as f:  # and a whole one does land
        f.write(b"new")
    assert target.read_bytes() == b"new" and os.listdir(tmp_path) == ["out.gguf"]
