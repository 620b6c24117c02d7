"""Snapshots (pytest-textual-snapshot) of the Models screen at 80x24 and 120x40, on a fixed
folder: a tiny synthetic model (fixed seed) and a corrupt file, scanned as "." so that no
temporary path shows. Update after a deliberate change with `pytest --snapshot-update`."""

from __future__ import annotations

import time
from importlib.metadata import version

import pytest

from gguflab.synth import SynthConfig, write_synthetic_llama
from gguflab.tui.app import GgufLabApp
from gguflab.tui.widgets.browser import ModelBrowser, ModelDetail

# Textual's rendering changes between releases: the test extra pins the one these SVGs
# came from (pyproject.toml); re-record with --snapshot-update when the pin moves
RECORDED_WITH = "8.2.8"


def test_the_pinned_textual_is_installed():
    assert version("textual") == RECORDED_WITH


TINY = SynthConfig(
    n_layer=1, n_embd=64, n_ff=128, n_head=4, n_head_kv=2, n_vocab=96, name="tiny-llama"
)


@pytest.fixture
def app(tmp_path, monkeypatch):
    write_synthetic_llama(tmp_path / "tiny.gguf", TINY)
    (tmp_path / "broken.gguf").write_bytes(b"this is not a model at all, just text")
    monkeypatch.chdir(tmp_path)
    return GgufLabApp(["."])


async def _settle(pilot, keys: tuple[str, ...] = ()) -> None:
    """Wait for the scan, move to the model, wait for its details, then press `keys`."""
    app = pilot.app
    browser, detail = app.query_one(ModelBrowser), app.query_one(ModelDetail)
    end = time.monotonic() + 30
    while browser.table.row_count < 2:
        assert time.monotonic() < end
        await pilot.pause(0.05)
    await pilot.press("down")
    while detail.details is None:
        assert time.monotonic() < end
        await pilot.pause(0.05)
    await pilot.press(*keys)
    await pilot.pause(0.2)


@pytest.mark.parametrize("size", [(80, 24), (120, 40)], ids=["80x24", "120x40"])
def test_models_screen(app, snap_compare, size):
    assert snap_compare(app, terminal_size=size, run_before=_settle)


@pytest.mark.parametrize("size", [(80, 24), (120, 40)], ids=["80x24", "120x40"])
def test_models_tensor_table(app, snap_compare, size):
    async def tensors(pilot) -> None:
        await _settle(pilot, ("t",))

    assert snap_compare(app, terminal_size=size, run_before=tensors)
