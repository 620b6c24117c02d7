from __future__ import annotations

import os
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


@pytest.fixture(autouse=True, scope="session")
def _jit_cache(tmp_path_factory):
    """Tests compile into a private cache so they never read a stale user cache."""
    os.environ.setdefault("GGUFLAB_CACHE_DIR", str(tmp_path_factory.mktemp("gguflab-cache")))
