from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def fixtures_dir() -> Path:
    """../shared/fixtures beside the checkout (CI lays it there), or $GGUFLAB_FIXTURES."""
    env = os.environ.get("GGUFLAB_FIXTURES")
    return Path(env) if env else REPO.parent / "shared" / "fixtures"


@pytest.fixture(scope="session")
def fixtures() -> Path:
    d = fixtures_dir()
    if not d.is_dir():
        pytest.skip(f"shared fixtures not found at {d}")
    return d


@pytest.fixture(scope="session")
def smollm2() -> str:
    from gguflab.catalog import embedded_model

    return embedded_model()


@pytest.fixture(scope="module")
def module_tmp(request, tmp_path_factory):
    """`mktemp` for a module's fixtures: what it made is removed after the module's last test,
    unless one of the module's tests failed (then it stays, beside the failed test's tmp_path).

    The models the fixtures write (SmolLM2 at F32 is 540 MB, and several modules make one)
    would otherwise stay until the session ends: about 15 GB, more than a CI machine may have
    free. Function-scoped tmp_path folders go when their test passes
    (tmp_path_retention_policy = "failed" in pyproject.toml)."""
    made: list[Path] = []
    failed_before = request.session.testsfailed

    def mktemp(name: str) -> Path:
        made.append(tmp_path_factory.mktemp(name))
        return made[-1]

    yield mktemp
    if request.session.testsfailed == failed_before:
        for d in made:
            shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(autouse=True, scope="session")
def _jit_cache(tmp_path_factory):
    """Tests compile into a private cache so they never read a stale user cache."""
    os.environ.setdefault("GGUFLAB_CACHE_DIR", str(tmp_path_factory.mktemp("gguflab-cache")))


# -- CI cannot go green by skipping ------------------------------------------------------
#
# With CI=true a test whose oracle, fixture or tool is missing fails instead of skipping:
# a skip there means the run did not check what it claims. The one exception is a test that
# needs a GPU (marked `gpu`, or skipped with "no GPU: ..."): CI machines have none.


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _gpu_skip(report) -> bool:
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    return "gpu" in getattr(report, "keywords", {}) or "no GPU" in reason


def _fail_skip_in_ci(report) -> None:
    if _in_ci() and report.skipped and not hasattr(report, "wasxfail") and not _gpu_skip(report):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped in CI (CI=true), which must not skip: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_skip_in_ci(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _fail_skip_in_ci(outcome.get_result())
