"""The TUI driven by key presses (Textual's Pilot): the browser on a folder with a tiny model
and a corrupt file, the detail panel, quantize from the browser end to end, the palette."""

from __future__ import annotations

import asyncio
import fcntl
import os
import pty
import select
import signal
import struct
import subprocess
import sys
import termios
import threading
import time

import gguf as ggufpy
import numpy as np
import pytest
from textual.command import CommandList, CommandPalette
from textual.widgets import DataTable, Input, Static, TabbedContent

from gguflab.fmt import size
from gguflab.gguf import GGMLType
from gguflab.synth import SynthConfig, write_synthetic_llama
from gguflab.tui.app import GgufLabApp
from gguflab.tui.commands import COMMANDS
from gguflab.tui.widgets.browser import ModelBrowser, ModelDetail

TINY = SynthConfig(n_layer=1, n_embd=64, n_ff=128, n_head=4, n_head_kv=2, n_vocab=96)


@pytest.fixture
def folder(tmp_path):
    write_synthetic_llama(tmp_path / "tiny.gguf", TINY)
    (tmp_path / "broken.gguf").write_bytes(b"this is not a model at all, just text")
    return tmp_path


async def until(pilot, cond, timeout: float = 30.0) -> None:
    """Let the app run until `cond()` holds (workers and timers need the loop)."""
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out waiting for the app"
        await pilot.pause(0.05)


def cell_texts(table: DataTable, row: int) -> list[str]:
    return [str(c) for c in table.get_row_at(row)]


async def _browse(folder, size) -> None:
    app = GgufLabApp([str(folder)])
    async with app.run_test(size=size) as pilot:
        browser = app.query_one(ModelBrowser)
        await until(pilot, lambda: browser.table.row_count == 2)
        table = browser.table
        assert app.focused is table
        # sorted by name: the corrupt file's row first, with its error
        assert cell_texts(table, 0)[:2] == ["broken.gguf", "error"]
        assert "not a GGUF file" in cell_texts(table, 0)[3]
        detail = app.query_one(ModelDetail)
        await until(pilot, lambda: detail.entry is not None)
        assert detail.entry.name == "broken.gguf" and "not a GGUF file" in str(
            app.query_one("#detail-text", Static).content
        )
        # the list still works: down to the model, its details load
        await pilot.press("down")
        await until(pilot, lambda: detail.details is not None)
        ref = ggufpy.GGUFReader(str(folder / "tiny.gguf"))
        row = cell_texts(table, 1)
        assert row[:2] == ["tiny.gguf", "llama"] and row[3] == "F16"
        assert dict(detail.details.hparams)["layers"] == str(
            ref.fields["llama.block_count"].contents()
        )
        # the tensor table is filled when shown, one row per tensor
        tensors = app.query_one("#tensor-table", DataTable)
        assert tensors.row_count == 0
        await pilot.press("t")
        await until(pilot, lambda: tensors.row_count == len(ref.tensors))
        assert [str(tensors.get_row_at(i)[0]) for i in range(tensors.row_count)] == [
            t.name for t in ref.tensors
        ]
        await pilot.press("t")
        assert not detail.showing_tensors
        # tabs by number; model actions only in the Models tab's footer
        await pilot.press("2")
        assert app.query_one(TabbedContent).active == "jobs"
        assert "quantize" not in {b.binding.action for b in app.screen.active_bindings.values()}
        await pilot.press("1")
        assert app.query_one(TabbedContent).active == "models"
        assert "quantize" in {b.binding.action for b in app.screen.active_bindings.values()}
        # the chat tab puts the focus on its message line, where F1 still leaves
        await pilot.press("3")
        message = app.focused
        assert isinstance(message, Input) and message.id == "chat-input"
        await pilot.press("1")
        assert message.value == "1" and app.query_one(TabbedContent).active == "chat"
        await pilot.press("f1")
        assert app.query_one(TabbedContent).active == "models" and app.focused is table
        await pilot.press("q")
    assert app.return_code == 0


def test_browser_120x40(folder):
    asyncio.run(_browse(folder, (120, 40)))


def test_browser_80x24(folder):
    asyncio.run(_browse(folder, (80, 24)))


def test_rescan_key_and_palette(folder):
    async def run() -> None:
        app = GgufLabApp([str(folder)])
        async with app.run_test(size=(80, 24)) as pilot:
            browser = app.query_one(ModelBrowser)
            await until(pilot, lambda: browser.table.row_count == 2)
            detail = app.query_one(ModelDetail)
            await pilot.press("down")  # tiny.gguf, its details read once
            await until(pilot, lambda: detail.details is not None)
            shown = detail.details
            write_synthetic_llama(folder / "another.gguf", TINY)
            (folder / "being-written.gguf.partial").write_bytes(b"GGUF")
            await pilot.press("r")
            await until(pilot, lambda: browser.table.row_count == 4)
            # the cursor stays on tiny.gguf, unchanged, so its details are not read again
            assert app.selected.name == "tiny.gguf" and detail.details is shown
            rows = {cell_texts(browser.table, i)[0]: cell_texts(browser.table, i) for i in range(4)}
            assert rows["being-written.gguf"][3] == "writing"
            assert rows["another.gguf"][3] == "F16"
            # a file being written offers no actions
            browser.select_path(str(folder / "being-written.gguf"))
            await pilot.pause()
            assert app.check_action("quantize", ()) is None
            await pilot.press("k")
            assert len(app.screen_stack) == 1
            # the command palette runs actions by name
            await pilot.press("ctrl+p")
            await until(pilot, lambda: isinstance(app.screen, CommandPalette))
            await pilot.press(*"jobs tab")
            hits = app.screen.query_one(CommandList)
            await until(
                pilot,
                lambda: (
                    hits.option_count > 0 and "Jobs tab" in str(hits.get_option_at_index(0).prompt)
                ),
            )
            await pilot.press("down", "enter")
            await until(pilot, lambda: app.query_one(TabbedContent).active == "jobs")

    asyncio.run(run())


def greedy_reply(path: str, user: str, n_predict: int) -> str:
    """The oracle for the chat step: the runner's own greedy answer to one user message."""
    from gguflab.gguf import Keys
    from gguflab.runner.chat import chat_prompt_ids
    from gguflab.runner.generate import Generation
    from gguflab.runner.model import Model
    from gguflab.runner.sampling import Sampler, SamplerParams
    from gguflab.runner.tokenizer import Tokenizer

    model = Model(path)
    tok = Tokenizer.from_gguf(model.reader)
    ids = chat_prompt_ids(
        tok, model.reader.get(Keys.CHAT_TEMPLATE), [{"role": "user", "content": user}]
    )
    gen = Generation.start(model, tok, 256)
    return "".join(gen.stream(ids, Sampler(SamplerParams(temp=0)), n_predict))


def test_quantize_from_the_browser_then_chat_with_the_result(tmp_path, smollm2):
    """The issue's walk: select a model, quantize it from the dialog, see the new file
    in the browser, open it in chat, get the streamed answer."""
    from textual.widgets import Input

    from gguflab.tui.widgets.chat import ChatPane
    from gguflab.tui.widgets.dialogs import QuantizeDialog

    chat_model = SynthConfig(
        n_layer=1, n_embd=64, n_ff=128, n_head=4, n_head_kv=2, tokenizer_from=smollm2
    )  # SmolLM2's vocab and chat template
    write_synthetic_llama(tmp_path / "tiny.gguf", chat_model)
    out = tmp_path / "tiny-Q8_0.gguf"

    async def run() -> None:
        app = GgufLabApp([str(tmp_path)])
        async with app.run_test(size=(120, 40)) as pilot:
            browser = app.query_one(ModelBrowser)
            await until(pilot, lambda: browser.table.row_count == 1)
            assert app.selected.name == "tiny.gguf"
            await pilot.press("k")
            await until(pilot, lambda: isinstance(app.screen, QuantizeDialog))
            dialog = app.screen
            types = dialog.query_one("#types")
            types.highlighted = next(i for i, m in enumerate(dialog.mixes) if m.name == "Q8_0")
            await pilot.pause()
            await pilot.press("enter")
            await until(pilot, lambda: len(app.manager.jobs) == 1)
            assert app.query_one(TabbedContent).active == "jobs"
            job = app.manager.jobs[0]
            await until(pilot, lambda: job.done, timeout=120)
            assert job.state == "finished", job.error
            # the Jobs pane's Finished event makes the browser rescan and select the new file
            await pilot.press("1")
            await until(pilot, lambda: app.selected is not None and app.selected.path == str(out))
            row = cell_texts(browser.table, browser.table.cursor_row)
            assert row[0] == "tiny-Q8_0.gguf" and row[3] == "Q8_0"
            assert row[4] == size(out.stat().st_size)
            ref = ggufpy.GGUFReader(str(out))  # the oracle reads what the job wrote
            ftype = int(ref.fields["general.file_type"].contents())
            assert ggufpy.LlamaFileType(ftype).name == "MOSTLY_Q8_0"
            assert any(t.tensor_type == GGMLType.Q8_0 for t in ref.tensors)
            assert not os.path.exists(str(out) + ".partial")

            # open it in chat and talk to it
            chat = app.query_one(ChatPane)
            await pilot.press("o")
            assert app.query_one(TabbedContent).active == "chat"
            assert chat.query_one("#chat-set-model", Input).value == str(out)
            chat.query_one("#chat-set-n_predict", Input).value = "5"
            chat.query_one("#chat-set-temp", Input).value = "0"
            chat.query_one("#chat-set-n_ctx", Input).value = "256"
            chat.query_one("#chat-input", Input).focus()
            await pilot.press(*"hello", "enter")
            await until(pilot, lambda: chat.last_reply is not None, timeout=120)
            assert chat.last_reply.text == greedy_reply(str(out), "hello", 5)
            assert chat.last_reply.timings.n_gen == 5
            await pilot.press("escape", "1", "q")

    asyncio.run(run())


def test_model_actions_open_their_dialog_for_the_selected_model(folder):
    """Each key opens its dialog on the model under the cursor, only for the kind of model
    it applies to; Escape submits nothing."""
    from safetensors.numpy import save_file

    from gguflab.tui.widgets import dialogs

    hf = folder / "tiny-hf"
    hf.mkdir()
    save_file({"model.norm.weight": np.ones(16, np.float16)}, str(hf / "model.safetensors"))
    (hf / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    gguf, hf_path = str(folder / "tiny.gguf"), str(hf)
    opens = {
        ("k", gguf): dialogs.QuantizeDialog,
        ("i", gguf): dialogs.ImatrixDialog,
        ("p", gguf): dialogs.PerplexityDialog,
        ("s", gguf): dialogs.SweepDialog,
        ("c", hf_path): dialogs.ConvertDialog,
    }

    async def run() -> None:
        app = GgufLabApp([str(folder)])
        async with app.run_test(size=(80, 24)) as pilot:
            browser = app.query_one(ModelBrowser)
            await until(pilot, lambda: browser.table.row_count == 3)
            for path in (gguf, hf_path):
                assert browser.select_path(path)
                await until(pilot, lambda p=path: app.selected.path == p)
                for key in "kipsc":
                    cls = opens.get((key, path))
                    await pilot.press(key)
                    if cls is None:  # does not apply: dimmed in the footer, nothing opens
                        action = {b.key: b.action for b in app.BINDINGS}[key]
                        assert app.check_action(action, ()) is None
                        assert len(app.screen_stack) == 1
                        continue
                    await until(pilot, lambda c=cls: isinstance(app.screen, c))
                    assert app.screen.path == path
                    await pilot.press("escape")
                    await until(pilot, lambda: len(app.screen_stack) == 1)
            assert app.manager.jobs == []

    asyncio.run(run())


def test_every_key_binding_is_in_the_palette():
    keys = {b.key: b.action for b in GgufLabApp.BINDINGS if b.show}
    assert {key: action for _, _, action, key in COMMANDS} == keys


def test_cli_without_a_terminal_is_one_error_line(tmp_path):
    for args in ([], ["tui", "--models-dir", str(tmp_path / "missing")]):
        r = subprocess.run(
            [sys.executable, "-m", "gguflab", *args],
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            timeout=60,
        )
        assert r.returncode == 1 and r.stdout == ""
        [line] = r.stderr.strip().splitlines()
        assert line.startswith("gguflab: error: ")


def test_gguflab_alone_opens_the_tui_and_q_restores_the_terminal(folder):
    """A real pseudo-terminal at 80x24 with 256 colours: the browser draws, `q` exits 0 and
    switches back from the alternate screen with the cursor shown."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: `gguflab --models-dir FOLDER` as a user types it
        os.environ.update(TERM="xterm-256color", COLUMNS="80", LINES="24")
        os.environ.pop("COLORTERM", None)
        try:
            os.execvp(
                sys.executable, [sys.executable, "-m", "gguflab", "--models-dir", str(folder)]
            )
        finally:
            os._exit(127)
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    out = b""

    def read_until(done, timeout: float) -> None:
        nonlocal out
        end = time.monotonic() + timeout
        while not done() and time.monotonic() < end:
            if select.select([fd], [], [], 0.1)[0]:
                try:
                    out += os.read(fd, 1 << 16)
                except OSError:  # the child closed the terminal
                    return

    try:
        read_until(lambda: b"tiny.gguf" in out, 60)
        assert b"tiny.gguf" in out and b"\x1b[?1049h" in out  # drawn on the alternate screen
        assert b"38;2;" not in out  # no 24-bit colour on a 256-colour terminal
        os.write(fd, b"q")
        read_until(lambda: b"\x1b[?1049l" in out, 30)
        _, status = os.waitpid(pid, 0)
        read_until(lambda: False, 2)  # what it wrote last, up to the end of its output
    finally:
        os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0
    tail = out[out.rindex(b"\x1b[?1049l") :]
    assert b"\x1b[?25h" in tail  # cursor shown again


def test_job_output_outside_the_scanned_folders_is_listed(folder, tmp_path_factory):
    """Like the embedded model (listed as a single file): where its job writes the output,
    that folder joins the browser's folders and the new file shows, selected."""
    from gguflab.jobs import JobSpec

    out = tmp_path_factory.mktemp("elsewhere") / "tiny-Q4_0.gguf"

    async def run() -> None:
        app = GgufLabApp([str(folder / "tiny.gguf")])
        async with app.run_test(size=(80, 24)) as pilot:
            browser = app.query_one(ModelBrowser)
            await until(pilot, lambda: browser.table.row_count == 1)
            app.submit(
                JobSpec(
                    "quantize", {"src": str(folder / "tiny.gguf"), "dst": str(out), "mix": "Q4_0"}
                )
            )
            job = app.manager.jobs[0]
            await until(pilot, lambda: job.done, timeout=120)
            assert job.state == "finished", job.error
            await until(pilot, lambda: app.selected.path == str(out))
            assert browser.table.row_count == 2
            assert app.selected.type_name == "Q4_0" and not app.selected.writing

    asyncio.run(run())


def test_quit_while_a_job_runs_cancels_it_and_leaves_no_partial(tmp_path):
    from gguflab.jobs import JobSpec

    # big enough (160 MB of F16) that the quantize still works when a loaded machine's UI
    # first sees it start
    big = SynthConfig(n_layer=4, n_embd=1024, n_ff=4096, n_head=8, n_head_kv=2, n_vocab=8192)
    write_synthetic_llama(tmp_path / "big.gguf", big)
    out = tmp_path / "big-Q4_K_M.gguf"

    async def run() -> GgufLabApp:
        app = GgufLabApp([str(tmp_path)])
        async with app.run_test(size=(80, 24)) as pilot:
            app.submit(
                JobSpec(
                    "quantize",
                    {"src": str(tmp_path / "big.gguf"), "dst": str(out), "mix": "Q4_K_M"},
                )
            )
            job = app.manager.jobs[0]
            await until(pilot, lambda: job.started is not None or job.done, timeout=60)
            # hold the worker where it is, so that however fast the machine (or slow this
            # UI on a loaded one) the user quits while it still works; it goes on only once
            # the quit has asked it to stop
            pid = job._proc.pid
            os.kill(pid, signal.SIGSTOP)
            resume = threading.Timer(0.5, os.kill, (pid, signal.SIGCONT))
            resume.start()
            try:
                assert not job.done  # still working when the user quits
                await pilot.press("q")
            finally:
                resume.join()
        return app

    app = asyncio.run(run())
    job = app.manager.jobs[0]
    assert app.return_code == 0 and job.state == "cancelled"
    assert not out.exists() and not os.path.exists(str(out) + ".partial")
    assert sorted(os.listdir(tmp_path)) == ["big.gguf"]
