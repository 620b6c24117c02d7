"""Regenerate the README's screenshots of the TUI (SVG, 120x40) with the embedded SmolLM2:
the Models tab, the quantize dialog, a Q4_K_M quantize in the Jobs tab, a chat with the
result, and a two-type sweep. Minutes on two cores:

    python docs/screenshots/make_screenshots.py [OUT_DIR]
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import time

from textual.widgets import Input

from gguflab.catalog import embedded_model
from gguflab.jobs import JobSpec
from gguflab.tui.app import GgufLabApp
from gguflab.tui.widgets.browser import ModelBrowser, ModelDetail
from gguflab.tui.widgets.chat import ChatPane
from gguflab.tui.widgets.dialogs import QuantizeDialog

SIZE = (120, 40)


async def until(pilot, cond, timeout: float = 900.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise TimeoutError("the app did not get there in time")
        await pilot.pause(0.1)


async def main(out_dir: str, work: str) -> None:
    smol = embedded_model()
    app = GgufLabApp([work, smol])

    def shot(name: str) -> None:
        path = app.save_screenshot(f"{name}.svg", path=out_dir)
        print("wrote", path, flush=True)

    async with app.run_test(size=SIZE) as pilot:
        browser, detail = app.query_one(ModelBrowser), app.query_one(ModelDetail)
        await until(pilot, lambda: browser.table.row_count >= 1)
        browser.select_path(smol)
        await until(pilot, lambda: detail.details is not None)
        shot("models")

        await pilot.press("k")
        await until(pilot, lambda: isinstance(app.screen, QuantizeDialog))
        dialog = app.screen
        await until(pilot, lambda: len(dialog.estimates) == len(dialog.mixes))
        shot("quantize-dialog")
        await pilot.press("escape")

        q4 = os.path.join(work, "SmolLM2-135M-Instruct-Q4_K_M.gguf")
        app.submit(JobSpec("quantize", {"src": smol, "dst": q4, "mix": "Q4_K_M",
                                        "options": {"allow_requantize": True}},
                           title="quantize SmolLM2-135M-Instruct -> Q4_K_M"))
        job = app.manager.jobs[-1]
        await until(pilot, lambda: job.done or job.fraction >= 0.6)
        shot("jobs")
        await until(pilot, lambda: job.done)
        assert job.state == "finished", job.error

        await pilot.press("1")
        await until(pilot, lambda: app.selected is not None and app.selected.path == q4)
        await pilot.press("o")
        chat = app.query_one(ChatPane)
        chat.query_one("#chat-set-temp", Input).value = "0"
        chat.query_one("#chat-set-n_predict", Input).value = "60"
        chat.query_one("#chat-input", Input).focus()
        await pilot.press(*"What is the capital of France?", "enter")
        await until(pilot, lambda: chat.last_reply is not None)
        shot("chat")

        app.submit(JobSpec("sweep", {"model": smol, "types": ["Q8_0", "Q4_K_M"],
                                     "text_file": None, "n_ctx": 128, "chunks": 2,
                                     "out_dir": work}))
        job = app.manager.jobs[-1]
        await until(pilot, lambda: job.done)
        assert job.state == "finished", job.error
        await pilot.pause(1)
        shot("sweep")
        await pilot.press("q")


if __name__ == "__main__":
    out = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(__file__))
    with tempfile.TemporaryDirectory() as work:
        asyncio.run(main(out, work))
