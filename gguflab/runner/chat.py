"""Chat prompts: the model's own `tokenizer.chat_template` rendered in jinja2's sandbox (as
Hugging Face does), or a known template by name when the model has none."""

from __future__ import annotations

from datetime import datetime
from functools import cache
from typing import TYPE_CHECKING

from ..errors import UserError

if TYPE_CHECKING:
    from .tokenizer import Tokenizer

FALLBACK_TEMPLATES = {
    "chatml": ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
               "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
               "{% endif %}"),
    "llama2": ("{% for m in messages %}{% if m['role'] == 'system' %}<<SYS>>\n{{ m['content'] }}"
               "\n<</SYS>>\n\n{% elif m['role'] == 'user' %}{{ bos_token }}[INST] "
               "{{ m['content'] }} [/INST]{% else %} {{ m['content'] }} {{ eos_token }}"
               "{% endif %}{% endfor %}"),
    "llama3": ("{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
               "{{ m['content'] | trim }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
               "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"),
    "zephyr": ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n"
               "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"),
}


@cache
def _compile(template: str):
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(msg):
        raise TemplateError(msg)

    env.globals["raise_exception"] = raise_exception
    # today's date, as HF's and llama.cpp's template engines give it (LLaMA 3.2's system line)
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except TemplateError as e:
        raise UserError(f"the chat template does not parse: {e}") from None


def render_chat(template: str, messages: list[dict], *, bos_token: str = "",
                eos_token: str = "", add_generation_prompt: bool = True) -> str:
    from jinja2.exceptions import TemplateError

    try:
        return _compile(template).render(messages=messages, bos_token=bos_token,
                                         eos_token=eos_token,
                                         add_generation_prompt=add_generation_prompt)
    except TemplateError as e:
        raise UserError(f"the chat template failed: {e}") from None


def pick_template(model_template: str | None, name: str | None = None) -> str:
    """An explicit --chat-template name wins, then the model's own, then chatml."""
    if name:
        if name in FALLBACK_TEMPLATES:
            return FALLBACK_TEMPLATES[name]
        raise UserError(f"unknown chat template {name!r}; known: "
                        f"{', '.join(FALLBACK_TEMPLATES)}")
    return model_template or FALLBACK_TEMPLATES["chatml"]


def chat_prompt_ids(tokenizer: Tokenizer, template: str, messages: list[dict]) -> list[int]:
    """The whole conversation rendered with `template` and tokenized as llama.cpp's chat
    does: the template writes the special tokens itself, so none are added and they parse."""

    def text(token: int | None) -> str:
        if token is None:
            return ""
        return tokenizer.token_to_piece(token, special=True).decode("utf-8", "replace")

    prompt = render_chat(template, messages, bos_token=text(tokenizer.bos_id),
                         eos_token=text(tokenizer.eos_id))
    return tokenizer.encode(prompt, add_special=False, parse_special=True)
