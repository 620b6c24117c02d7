"""The chat pane in a minimal app, driven by key presses: replies must be exactly what the
runner generates for the same conversation (greedy sampling is the oracle), stop and new chat
work mid-stream, and a broken model or too long a prompt is a message, never a crash."""

from __future__ import annotations

import asyncio
import time

import pytest
from textual.app import App, ComposeResult
from textual.widgets import Input, Static

from gguflab.cli import build_parser
from gguflab.errors import UserError
from gguflab.gguf import Keys
from gguflab.runner.chat import render_chat
from gguflab.runner.generate import Generation, Timings
from gguflab.runner.model import Model
from gguflab.runner.offload import parse_n_gpu_layers, plan_for_cli
from gguflab.runner.sampling import Sampler, SamplerParams
from gguflab.runner.tokenizer import Tokenizer
from gguflab.synth import SynthConfig, write_synthetic_llama
from gguflab.tui.widgets.chat import ChatPane


class ChatApp(App):
    def compose(self) -> ComposeResult:
        yield ChatPane()


@pytest.fixture(scope="module")
def tiny(module_tmp, smollm2) -> str:
    """Random weights with SmolLM2's tokenizer and chat template: fast, never says EOS."""
    return write_synthetic_llama(
        module_tmp("chat") / "tiny.gguf",
        SynthConfig(n_layer=2, n_embd=64, n_ff=128, n_head=4, n_head_kv=2,
                    tokenizer_from=smollm2))


def oracle_reply(path: str, messages: list[dict], n_predict: int, n_ctx: int = 512,
                 params: SamplerParams | None = None):
    """Generation as `gguflab chat` does it (greedy unless told), straight from the runner."""
    model = Model(path)
    tok = Tokenizer.from_gguf(model.reader)
    bos = tok.token_to_piece(tok.bos_id, special=True).decode() if tok.bos_id is not None else ""
    eos = tok.token_to_piece(tok.eos_id, special=True).decode() if tok.eos_id is not None else ""
    prompt = render_chat(model.reader.get(Keys.CHAT_TEMPLATE), messages, bos_token=bos,
                         eos_token=eos)
    ids = tok.encode(prompt, add_special=False, parse_special=True)
    t = Timings()
    gen = Generation.start(model, tok, n_ctx)
    sampler = Sampler(params or SamplerParams(temp=0))
    text = "".join(gen.stream(ids, sampler, n_predict, timings=t))
    return text, t


def run(scenario) -> None:
    async def main():
        app = ChatApp()
        async with app.run_test(size=(80, 24)) as pilot:
            await scenario(app.query_one(ChatPane), pilot)
    asyncio.run(main())


async def until(pilot, cond, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out waiting for the chat pane"
        await pilot.pause(0.05)


def setting(pane: ChatPane, name: str, value: str) -> None:
    pane.query_one(f"#chat-set-{name}", Input).value = value


def text_of(pane: ChatPane, selector: str) -> str:
    return str(pane.query_one(selector, Static).content)


async def say(pane: ChatPane, pilot, text: str) -> None:
    pane.query_one("#chat-input", Input).focus()
    await pilot.press(*text, "enter")


def test_form_defaults_are_the_cli_defaults_and_the_offload_line_follows_the_form(tiny):
    a = build_parser().parse_args(["chat"])
    want = dict(n_gpu_layers=a.n_gpu_layers, n_ctx=a.ctx_size, n_predict=a.n_predict,
                temp=a.temp, top_k=a.top_k, top_p=a.top_p, min_p=a.min_p,
                repeat_penalty=a.repeat_penalty, seed=a.seed, system_prompt=a.system_prompt)

    async def scenario(pane, pilot):
        s = pane.settings()
        assert {k: getattr(s, k) for k in want} == want
        setting(pane, "temp", "warm")
        with pytest.raises(UserError, match="temperature: 'warm' is not a number"):
            pane.settings()

        # the plan line is the offload planner's for the model, context and layers typed
        # (a bad field elsewhere in the form does not hide it)
        pane.suggest_model(tiny)  # what the app calls when a job has written a model
        assert pane.query_one("#chat-set-model", Input).value == tiny
        setting(pane, "n_ctx", "256")
        for ngl in ("auto", "1", "0"):
            setting(pane, "n_gpu_layers", ngl)
            plan = plan_for_cli(tiny, 256, parse_n_gpu_layers(ngl)).summary()
            await until(pilot, lambda plan=plan: text_of(pane, "#chat-offload") == plan)
        setting(pane, "n_gpu_layers", "lots")
        await until(pilot, lambda: "GPU layers: 'lots' is not a number"
                    in text_of(pane, "#chat-offload"))
    run(scenario)


def test_reply_is_the_runners_greedy_reply(smollm2):
    async def scenario(pane, pilot):
        pane.open_model(smollm2)
        setting(pane, "temp", "0")
        setting(pane, "n_predict", "6")
        setting(pane, "n_ctx", "512")
        await until(pilot, lambda: pane.loaded is not None)
        assert "SmolLM2" in text_of(pane, "#chat-model")

        await say(pane, pilot, "Hi")
        await until(pilot, lambda: pane.last_reply is not None and not pane.generating)
        want, t = oracle_reply(smollm2, [{"role": "user", "content": "Hi"}], 6)
        assert pane.last_reply.text == want
        assert str(pane.query(".chat-assistant").last().content) == want
        status = text_of(pane, "#chat-status")
        assert f"prompt: {t.n_prompt} tokens" in status
        assert f"generation: {t.n_gen} tokens" in status and "tok/s" in status

    run(scenario)


def test_second_turn_sees_the_first_stop_mid_reply_then_new_chat(tiny):
    async def scenario(pane, pilot):
        pane.open_model(tiny)
        setting(pane, "temp", "0")
        setting(pane, "n_predict", "5")
        setting(pane, "n_ctx", "2048")
        await until(pilot, lambda: pane.loaded is not None)
        pane.suggest_model("/elsewhere/new.gguf")  # a chat in progress keeps its model
        assert pane.query_one("#chat-set-model", Input).value == tiny
        await say(pane, pilot, "Hi")
        await until(pilot, lambda: pane.last_reply is not None and not pane.generating)
        first = [{"role": "user", "content": "Hi"}]
        want, _ = oracle_reply(tiny, first, 5, n_ctx=2048)
        assert pane.last_reply.text == want
        convo = first + [{"role": "assistant", "content": want},
                         {"role": "user", "content": "Tell me everything"}]

        # the whole conversation goes through the template; with room for ~2000 tokens
        # (random weights never say EOS) the reply runs until escape stops it
        setting(pane, "n_predict", "-1")
        await say(pane, pilot, "Tell me everything")
        # the first reply's status also says tok/s: wait for this one's streaming line
        await until(pilot, lambda: text_of(pane, "#chat-status").startswith("generating: "))
        await pilot.press("escape")
        await until(pilot, lambda: not pane.generating)

        reply = pane.last_reply
        assert reply.timings.stop_reason == "stopped"
        assert 0 < reply.timings.n_gen < 2048 - reply.n_prompt
        # what was streamed before the stop is the start of the runner's greedy reply
        want2, _ = oracle_reply(tiny, convo, reply.timings.n_gen, n_ctx=2048)
        assert reply.text and want2.startswith(reply.text)
        assert pane.turns == convo + [{"role": "assistant", "content": reply.text}]
        assert text_of(pane, "#chat-status").endswith("stop: stopped")

        await pilot.press("ctrl+n")
        await pilot.pause()
        assert pane.turns == [] and not pane.query(".chat-assistant")
        assert text_of(pane, "#chat-status") == ""
    run(scenario)


def test_bad_model_and_long_prompt_are_messages_then_reload(tmp_path, tiny):
    bad = tmp_path / "corrupt.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 64)

    async def scenario(pane, pilot):
        pane.open_model(str(bad))
        await until(pilot, lambda: not pane.loading)
        assert pane.loaded is None
        line = text_of(pane, "#chat-model")
        assert line.startswith("error: ") and "corrupt.gguf" in line
        assert "\n" not in line

        # a message with no model loads the form's model first; if that fails, the message
        # goes back into the input line
        await say(pane, pilot, "Hi there")
        await until(pilot, lambda: not pane.loading and pane.query_one("#chat-input", Input).value)
        assert pane.query_one("#chat-input", Input).value == "Hi there"
        assert text_of(pane, "#chat-model").startswith("error: ")
        pane.query_one("#chat-input", Input).value = ""

        setting(pane, "model", tiny)
        setting(pane, "temp", "0")
        setting(pane, "n_predict", "4")
        setting(pane, "n_ctx", "8")  # SmolLM2's template alone is longer than this
        await say(pane, pilot, "Hello")
        await until(pilot, lambda: pane.loaded is not None and not pane.generating
                    and pane.query(".chat-error"))
        assert "does not fit in the context" in str(pane.query(".chat-error").last().content)
        assert pane.turns == [] and pane.last_reply is None

        setting(pane, "n_ctx", "512")
        await say(pane, pilot, "Hello")
        await until(pilot, lambda: pane.last_reply is not None and not pane.generating)
        want, _ = oracle_reply(tiny, [{"role": "user", "content": "Hello"}], 4)
        assert pane.last_reply.text == want

        # ctrl+r loads the form's model again with the form's settings; the chat stays
        before = pane.loaded
        pane.query_one("#chat-log").focus()
        await pilot.press("ctrl+r")
        await until(pilot, lambda: pane.loaded is not None and pane.loaded is not before)
        assert pane.loaded.path == tiny
        convo = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": want}]
        assert pane.turns == convo

        # every sampling field and the system prompt reach the runner
        for name, value in [("temp", "0.9"), ("top_k", "20"), ("top_p", "0.9"),
                            ("min_p", "0.02"), ("repeat_penalty", "1.1"), ("seed", "7"),
                            ("system_prompt", "Be brief.")]:
            setting(pane, name, value)
        await say(pane, pilot, "Again")
        await until(pilot, lambda: len(pane.turns) == 4 and not pane.generating)
        params = SamplerParams(temp=0.9, top_k=20, top_p=0.9, min_p=0.02, repeat_penalty=1.1,
                               seed=7)
        want, _ = oracle_reply(tiny, [{"role": "system", "content": "Be brief."}, *convo,
                                      {"role": "user", "content": "Again"}], 4, params=params)
        assert pane.last_reply.text == want
    run(scenario)


def test_an_unsupported_architecture_is_one_line_naming_the_supported_ones(tmp_path):
    from gguflab.gguf import Value, ValueType, write_gguf
    from gguflab.runner.families import FAMILIES

    path = tmp_path / "neox.gguf"
    write_gguf(path, {"general.architecture": Value(ValueType.STRING, "gptneox")}, [])

    async def scenario(pane, pilot):
        pane.open_model(str(path))
        await until(pilot, lambda: not pane.loading)
        line = text_of(pane, "#chat-model")
        assert line.startswith("error: ") and "'gptneox' is not supported" in line
        assert "\n" not in line and all(arch in line for arch in FAMILIES)
    run(scenario)
