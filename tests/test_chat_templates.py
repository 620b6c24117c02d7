"""Chat templates of the families people run, as the models ship them (llama.cpp keeps
copies in its tree: models/templates/, unpacked by `make test`), rendered by us and by
Hugging Face's own renderer (transformers' render_jinja_template, what apply_chat_template
runs): the same prompt text, system turn and generation prompt included."""

from __future__ import annotations

import pytest
from llama_converter import llama_cpp_src

from gguflab.runner.chat import render_chat

TEMPLATES = ["meta-llama-Llama-3.1-8B-Instruct", "meta-llama-Llama-3.2-3B-Instruct",
             "meta-llama-Llama-3.3-70B-Instruct", "Qwen-Qwen2.5-7B-Instruct",
             "Qwen-Qwen3-0.6B", "google-gemma-2-2b-it", "microsoft-Phi-3.5-mini-instruct",
             "mistralai-Mistral-Nemo-Instruct-2407", "HuggingFaceTB-SmolLM3-3B"]
CHAT = [{"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "What is 2+2? Answer in one word."}]


@pytest.mark.parametrize("name", TEMPLATES)
def test_template_renders_as_hugging_face_renders_it(name):
    hf = pytest.importorskip("transformers.utils.chat_template_utils")
    template = (llama_cpp_src() / "models" / "templates" / f"{name}.jinja").read_text()
    messages = CHAT[1:] if "gemma" in name else CHAT  # Gemma 2's template refuses a system turn
    for gen in (True, False):
        want = hf.render_jinja_template([messages], chat_template=template,
                                        add_generation_prompt=gen, bos_token="<s>",
                                        eos_token="</s>")[0][0]
        got = render_chat(template, messages, bos_token="<s>", eos_token="</s>",
                          add_generation_prompt=gen)
        assert got == want
