"""Jobs in worker processes: the same bytes and figures as running the core in-process,
cancel leaves nothing behind, a failing or dying worker becomes one line, jobs queue."""

from __future__ import annotations

import os

import pytest

from gguflab.catalog import default_eval_text, embedded_model
from gguflab.events import Event, Failed, Finished, Measured, Started, TensorDone
from gguflab.jobs import JobManager, JobSpec, run_inline
from gguflab.synth import SynthConfig, write_synthetic_llama

TINY = SynthConfig(n_layer=2, n_embd=256, n_ff=512, n_head=4, n_head_kv=2, n_vocab=256)


@pytest.fixture
def manager():
    m = JobManager()
    yield m
    m.shutdown()


@pytest.fixture
def tiny(tmp_path):
    return str(write_synthetic_llama(tmp_path / "tiny-f16.gguf", TINY))


def test_quantize_job_in_a_worker_writes_the_inline_bytes(manager, tiny, tmp_path):
    dst = str(tmp_path / "tiny-Q4_K_M.gguf")
    job = manager.wait(manager.submit(JobSpec("quantize", {"src": tiny, "dst": dst,
                                                            "mix": "Q4_K_M"})))
    assert job.state == "finished", job.error
    assert job.fraction == 1.0 and job.result.path == dst
    kinds = [type(e) for e in job.events]
    assert kinds[0] is Started and kinds[-1] is Finished
    done = [e for e in job.events if isinstance(e, TensorDone)]
    assert [e.index for e in done] == list(range(1, len(done) + 1))
    assert any(e.hist for e in done)  # histograms travel through the queue

    inline = str(tmp_path / "inline.gguf")
    list(run_inline(JobSpec("quantize", {"src": tiny, "dst": inline, "mix": "Q4_K_M"})))
    with open(dst, "rb") as a, open(inline, "rb") as b:
        assert a.read() == b.read()


def test_failed_job_is_one_line_and_the_manager_goes_on(manager, tmp_path, tiny):
    bad = tmp_path / "corrupt.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 64)
    job = manager.wait(manager.submit(JobSpec("quantize", {"src": str(bad),
                                                            "dst": str(tmp_path / "o.gguf"),
                                                            "mix": "Q8_0"})))
    assert job.state == "failed" and "corrupt.gguf" in job.error and "\n" not in job.error
    assert not os.path.exists(tmp_path / "o.gguf")
    ok = manager.wait(manager.submit(JobSpec("quantize", {"src": tiny,
                                                           "dst": str(tmp_path / "o.gguf"),
                                                           "mix": "Q8_0"})))
    assert ok.state == "finished"


def test_cancel_removes_the_partial_and_keeps_an_existing_target(manager, tmp_path):
    src = str(write_synthetic_llama(tmp_path / "big.gguf", SynthConfig(
        n_layer=8, n_embd=1024, n_ff=2816, n_head=8, n_head_kv=8, n_vocab=2048)))
    dst = tmp_path / "big-Q4_K_M.gguf"
    dst.write_bytes(b"keep me")
    job = manager.submit(JobSpec("quantize", {"src": src, "dst": str(dst), "mix": "Q4_K_M",
                                              "options": {"overwrite": True}}))
    while not any(isinstance(e, TensorDone) for e in job.events):
        manager.poll()
        assert not job.done, job.error
    assert os.path.exists(str(dst) + ".partial")
    assert str(dst) in manager.writing()
    manager.cancel(job)
    manager.wait(job)
    assert job.state == "cancelled"
    assert not os.path.exists(str(dst) + ".partial")
    assert dst.read_bytes() == b"keep me"


def test_a_worker_that_dies_is_a_failed_job(manager, tmp_path):
    src = str(write_synthetic_llama(tmp_path / "big.gguf", SynthConfig(
        n_layer=8, n_embd=1024, n_ff=2816, n_head=8, n_head_kv=8, n_vocab=2048)))
    dst = tmp_path / "out.gguf"
    job = manager.submit(JobSpec("quantize", {"src": src, "dst": str(dst), "mix": "Q6_K"}))
    while not job.events:
        manager.poll()
    job._proc.kill()
    manager.wait(job)
    assert job.state == "failed" and "died" in job.error
    assert not os.path.exists(str(dst) + ".partial") and not dst.exists()


def test_jobs_queue_one_at_a_time(manager, tiny, tmp_path):
    a = manager.submit(JobSpec("quantize", {"src": tiny, "dst": str(tmp_path / "a.gguf"),
                                            "mix": "Q8_0"}))
    b = manager.submit(JobSpec("quantize", {"src": tiny, "dst": str(tmp_path / "b.gguf"),
                                            "mix": "Q4_0"}))
    assert a.state == "running" and b.state == "queued"
    manager.cancel(b)  # a queued job is dropped without starting
    c = manager.submit(JobSpec("quantize", {"src": tiny, "dst": str(tmp_path / "c.gguf"),
                                            "mix": "Q4_0"}))
    manager.wait(c)
    assert (a.state, b.state, c.state) == ("finished", "cancelled", "finished")
    assert not (tmp_path / "b.gguf").exists() and (tmp_path / "c.gguf").exists()


def test_perplexity_job_gives_the_runner_figures(manager, tmp_path):
    from gguflab.runner.model import Model
    from gguflab.runner.perplexity import perplexity
    from gguflab.runner.tokenizer import Tokenizer

    model = str(write_synthetic_llama(tmp_path / "v.gguf", SynthConfig(
        n_layer=1, n_embd=64, n_ff=128, n_head=2, n_head_kv=1, n_vocab=0,
        tokenizer_from=embedded_model())))
    job = manager.wait(manager.submit(JobSpec("perplexity", {"model": model, "n_ctx": 128,
                                                              "chunks": 2})), timeout=120)
    assert job.state == "finished", job.error
    (row,) = [e.values for e in job.events if isinstance(e, Measured)]

    m = Model(model)
    tok = Tokenizer.from_gguf(m.reader)
    with open(default_eval_text(), encoding="utf-8") as f:
        tokens = tok.encode(f.read(), add_special=True, parse_special=False)
    res = perplexity(m, tokens, 128, add_bos=tok.add_bos, bos_id=tok.bos_id, n_chunks=2)
    assert row["ppl"] == pytest.approx(res.ppl, rel=1e-9) and row["n_chunks"] == 2


def test_bad_kind_and_event_round_trip():
    from gguflab.errors import UserError

    with pytest.raises(UserError, match="unknown job kind"):
        JobSpec("frobnicate", {})
    for ev in (Measured("Q4_K_M", {"ppl": 1.5}), Failed("x")):
        assert Event.from_dict(ev.to_dict()) == ev
