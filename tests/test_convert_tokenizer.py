"""Tokenizer metadata against llama.cpp's own conversions (the LLaMA 2 SentencePiece vocab
fixture, GPT-2's vocab fixture, SmolLM2's GGUF) and gguf-py's SpecialVocab."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from hf_models import write_smollm2_tokenizer

from gguflab.convert.tokenizer import (
    TokenizerError,
    TokenType,
    detect_bpe_pre,
    tokenizer_metadata,
)
from gguflab.gguf import GGUFReader, Keys, ValueType

N, U, C, UD, UNUSED, B = (
    TokenType.NORMAL,
    TokenType.UNKNOWN,
    TokenType.CONTROL,
    TokenType.USER_DEFINED,
    TokenType.UNUSED,
    TokenType.BYTE,
)


def _write(d: Path, name: str, obj) -> None:
    (d / name).write_text(obj if isinstance(obj, str) else json.dumps(obj), encoding="utf-8")


def _tokenizer_keys(path) -> dict:
    r = GGUFReader(path)
    return {k: v for k, v in r.metadata.items() if k.startswith("tokenizer.")}


def _same(a, b) -> bool:
    if a.type != b.type or a.item_type != b.item_type:
        return False
    x, y = a.to_python(), b.to_python()
    return np.array_equal(np.asarray(x), np.asarray(y)) if isinstance(x, list) else x == y


# ---------------------------------------------------------------------------------------------
# SentencePiece: LLaMA 2


def _llama2_folder(d: Path, fixtures: Path, vocab_size: int = 32000) -> Path:
    """What LLaMA 2's Hugging Face folder holds for the tokenizer (its tokenizer.json cut
    down to the parts the converter reads: added tokens and the BOS template)."""
    shutil.copy(fixtures / "llama2-tokenizer.model", d / "tokenizer.model")
    _write(
        d,
        "config.json",
        {
            "architectures": ["LlamaForCausalLM"],
            "bos_token_id": 1,
            "eos_token_id": 2,
            "vocab_size": vocab_size,
        },
    )
    _write(
        d,
        "tokenizer_config.json",
        {
            "add_bos_token": True,
            "add_eos_token": False,
            "bos_token": {"__type": "AddedToken", "content": "<s>", "special": True},
            "eos_token": {"__type": "AddedToken", "content": "</s>", "special": True},
            "unk_token": {"__type": "AddedToken", "content": "<unk>", "special": True},
            "tokenizer_class": "LlamaTokenizer",
        },
    )
    added = [
        {"id": i, "content": t, "special": True, "normalized": False}
        for i, t in enumerate(("<unk>", "<s>", "</s>"))
    ]
    single = [
        {"SpecialToken": {"id": "<s>", "type_id": 0}},
        {"Sequence": {"id": "A", "type_id": 0}},
    ]
    pair = single + [
        {"SpecialToken": {"id": "<s>", "type_id": 1}},
        {"Sequence": {"id": "B", "type_id": 1}},
    ]
    _write(
        d,
        "tokenizer.json",
        {
            "version": "1.0",
            "added_tokens": added,
            "post_processor": {"type": "TemplateProcessing", "single": single, "pair": pair},
            "model": {"type": "BPE", "byte_fallback": True, "vocab": {}, "merges": []},
        },
    )
    return d


def test_sentencepiece_equals_llama_cpp_vocab_fixture(tmp_path, fixtures):
    want = _tokenizer_keys(fixtures / "vocab" / "ggml-vocab-llama-spm.gguf")
    got = tokenizer_metadata(_llama2_folder(tmp_path, fixtures), 32000)
    # today's converter also reads LLaMA 2's pair template ("<s> A <s> B": no separator);
    # the fixture was written before it did
    order = list(want)
    order.insert(order.index(Keys.ADD_BOS) + 1, "tokenizer.ggml.add_sep_token")
    assert list(got) == order
    assert got["tokenizer.ggml.add_sep_token"].value is False
    for key in want:
        assert _same(got[key], want[key]), key
    assert got[Keys.SCORES].item_type == ValueType.FLOAT32
    assert got[Keys.TOKEN_TYPE].item_type == ValueType.INT32


def test_sentencepiece_added_tokens_and_padding(tmp_path, fixtures):
    d = _llama2_folder(tmp_path, fixtures, 32006)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["add_prefix_space"] = False
    cfg["added_tokens_decoder"] = {
        "32001": {"content": "<|im_start|>", "special": False},  # looks special: control
        "32002": {"content": "\u2581hi", "special": False},  # user-defined, mark -> space
        "32003": {"content": "<tool>", "special": True},
        "32009": {"content": "<far>", "special": True},  # beyond vocab_size: ignored
    }
    _write(d, "tokenizer_config.json", cfg)
    _write(d, "added_tokens.json", {"<pad>": 32000, "<x>": 32003})
    m = tokenizer_metadata(d, 32006)
    assert list(m)[:2] == [Keys.ADD_SPACE_PREFIX, Keys.TOKENIZER_MODEL]
    assert m[Keys.ADD_SPACE_PREFIX].value is False
    tokens, scores, types = (m[k].to_python() for k in (Keys.TOKENS, Keys.SCORES, Keys.TOKEN_TYPE))
    assert len(tokens) == len(scores) == len(types) == 32006
    assert tokens[32000:] == ["<pad>", "<|im_start|>", " hi", "<tool>", "[PAD32004]", "[PAD32005]"]
    assert types[32000:] == [UD, C, UD, C, UNUSED, UNUSED]
    assert scores[32000:] == [-1000.0] * 4 + [-10000.0] * 2
    assert types[:4] == [U, C, C, B]


def test_sentencepiece_vocab_size_below_the_model(tmp_path, fixtures):
    d = _llama2_folder(tmp_path, fixtures, 31990)
    with pytest.warns(UserWarning, match="beyond vocab_size"):
        m = tokenizer_metadata(d, 31990)
    assert len(m[Keys.TOKENS].value) == 31990


def test_qwen2_arch_writes_no_space_prefix(tmp_path, fixtures):
    d = _llama2_folder(tmp_path, fixtures)
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["Qwen2ForCausalLM"]
    _write(d, "config.json", cfg)
    tcfg = json.loads((d / "tokenizer_config.json").read_text())
    _write(d, "tokenizer_config.json", {**tcfg, "add_prefix_space": True})
    m = tokenizer_metadata(d, 32000)
    assert Keys.ADD_SPACE_PREFIX not in m and m[Keys.TOKENIZER_MODEL].value == "llama"


# ---------------------------------------------------------------------------------------------
# byte-level BPE: SmolLM2 and GPT-2


@pytest.fixture(scope="module")
def smollm2_keys(smollm2):
    return _tokenizer_keys(smollm2)


def _smollm2_folder(d: Path, keys: dict) -> Path:
    """SmolLM2's tokenizer files rebuilt from its GGUF with the tokenizers library."""
    write_smollm2_tokenizer(d, keys)
    _write(
        d,
        "config.json",
        {
            "architectures": ["LlamaForCausalLM"],
            "bos_token_id": 1,
            "eos_token_id": 2,
            "vocab_size": len(keys[Keys.TOKENS].value),
        },
    )
    return d


def test_smollm2_round_trip(tmp_path, smollm2_keys):
    d = _smollm2_folder(tmp_path, smollm2_keys)
    assert isinstance(json.loads((d / "tokenizer.json").read_text())["model"]["merges"][0], list)
    got = tokenizer_metadata(d, len(smollm2_keys[Keys.TOKENS].value))
    # llama.cpp's current order (the GGUF was written by an older converter: add_bos came
    # first there and add_eos was not written)
    assert list(got) == [
        Keys.ADD_SPACE_PREFIX,
        Keys.TOKENIZER_MODEL,
        Keys.TOKENIZER_PRE,
        Keys.TOKENS,
        Keys.TOKEN_TYPE,
        Keys.MERGES,
        Keys.BOS_ID,
        Keys.EOS_ID,
        Keys.UNK_ID,
        Keys.PAD_ID,
        Keys.ADD_BOS,
        Keys.ADD_EOS,
        Keys.CHAT_TEMPLATE,
    ]
    for key, want in smollm2_keys.items():
        assert _same(got[key], want), key
    assert got[Keys.TOKENIZER_PRE].value == "smollm"
    assert got[Keys.ADD_EOS].value is False


def test_gpt2_vocab_fixture_round_trip(tmp_path, fixtures):
    want = _tokenizer_keys(fixtures / "vocab" / "ggml-vocab-gpt-2.gguf")
    tokens = want[Keys.TOKENS].to_python()
    tj = {
        "version": "1.0",
        "added_tokens": [
            {"id": 50256, "content": "<|endoftext|>", "special": True, "normalized": True}
        ],
        "normalizer": None,
        "pre_tokenizer": {
            "type": "ByteLevel",
            "add_prefix_space": False,
            "trim_offsets": True,
            "use_regex": True,
        },
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False},
        "model": {
            "type": "BPE",
            "vocab": {t: i for i, t in enumerate(tokens)},
            "merges": want[Keys.MERGES].to_python(),  # the older "a b" string form
        },
    }
    assert detect_bpe_pre(tj) == want[Keys.TOKENIZER_PRE].value == "gpt-2"
    _write(tmp_path, "tokenizer.json", tj)
    _write(tmp_path, "tokenizer_config.json", {"model_max_length": 1024})
    _write(
        tmp_path,
        "config.json",
        {
            "architectures": ["GPT2LMHeadModel"],
            "bos_token_id": 50256,
            "eos_token_id": 50256,
            "vocab_size": 50257,
        },
    )
    got = tokenizer_metadata(tmp_path, 50257)
    # the fixture predates add_bos/add_eos from a ByteLevel post-processor
    assert list(got) == list(want) + [Keys.ADD_BOS, Keys.ADD_EOS]
    for key in want:
        assert _same(got[key], want[key]), key
    assert got[Keys.ADD_BOS].value is False and got[Keys.ADD_EOS].value is False


# ---------------------------------------------------------------------------------------------
# byte-level BPE rules on a small vocab


def _bytelevel(use_regex: bool = False) -> dict:
    return {
        "type": "ByteLevel",
        "add_prefix_space": False,
        "trim_offsets": True,
        "use_regex": use_regex,
    }


def _split(rx: str) -> dict:
    return {"type": "Split", "pattern": {"Regex": rx}, "behavior": "Isolated", "invert": False}


LLAMA3_HF = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_HF = LLAMA3_HF.replace(r"\p{N}{1,3}", r"\p{N}")
_UP, _LO = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]", r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]"
_C = "(?i:'s|'t|'re|'ve|'m|'ll|'d)"
O200K_HF = (
    rf"[^\r\n\p{{L}}\p{{N}}]?{_UP}*{_LO}+{_C}?|[^\r\n\p{{L}}\p{{N}}]?{_UP}+{_LO}*{_C}?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
TEKKEN_HF = (
    rf"[^\r\n\p{{L}}\p{{N}}]?{_UP}*{_LO}+|[^\r\n\p{{L}}\p{{N}}]?{_UP}+{_LO}*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _seq(*steps: dict) -> dict:
    return {"type": "Sequence", "pretokenizers": list(steps)}


@pytest.mark.parametrize(
    ("pre_tokenizer", "added", "name"),
    [
        (_seq(_split(LLAMA3_HF), _bytelevel()), [], "llama-bpe"),
        (_seq(_split(QWEN2_HF), _bytelevel()), [], "qwen2"),
        (_bytelevel(True), [], "gpt-2"),
        (_seq(_split(O200K_HF), _bytelevel()), [], "gpt-4o"),
        (_seq(_split(TEKKEN_HF), _bytelevel()), [], "tekken"),
        (_seq({"type": "Digits", "individual_digits": True}, _bytelevel(True)), [], "starcoder"),
        (
            _seq({"type": "Digits", "individual_digits": True}, _bytelevel(True)),
            ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
            "smollm",
        ),
    ],
)
def test_detect_bpe_pre(pre_tokenizer, added, name):
    tj = {
        "pre_tokenizer": pre_tokenizer,
        "added_tokens": [{"id": i, "content": t, "special": True} for i, t in enumerate(added)],
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert detect_bpe_pre(tj) == name


@pytest.mark.parametrize(
    "pre_tokenizer",
    [
        None,
        {"type": "Whitespace"},
        _seq(_split(r"\p{L}+"), _bytelevel()),
        {**_bytelevel(True), "add_prefix_space": True},
        _seq(_bytelevel(), _split(LLAMA3_HF)),  # byte-level before the split: not llama.cpp's
    ],
)
def test_unknown_pre_tokenizer_falls_back_to_default(pre_tokenizer):
    with pytest.warns(UserWarning, match="not recognised"):
        assert detect_bpe_pre({"pre_tokenizer": pre_tokenizer}) == "default"


def _small_bpe(d: Path, *, merges, added=(), pre=None, **extra) -> Path:
    vocab = {t: i for i, t in enumerate(["a", "b", "c", "ab", "\u0120", "\u0120a"])}
    tj = {
        "added_tokens": [dict(a) for a in added],
        "pre_tokenizer": pre or _seq(_split(LLAMA3_HF), _bytelevel()),
        "model": {"type": "BPE", "vocab": vocab, "merges": merges},
        **extra,
    }
    _write(d, "tokenizer.json", tj)
    return d


def test_bpe_token_types_padding_and_merge_pairs(tmp_path):
    added = [
        {"id": 6, "content": "<|eot|>", "special": False, "normalized": False},  # looks special
        {"id": 7, "content": "\u2581user", "special": False, "normalized": True},
        {"id": 8, "content": "<think>", "special": True, "normalized": False},
        {"id": 10, "content": "[X]", "special": False, "normalized": True},
        {"id": 2, "content": "c", "special": True, "normalized": False},  # base token made special
    ]
    d = _small_bpe(tmp_path, merges=[["a", "b"], ["\u0120", "a"], ["a b", "c"]], added=added)
    m = tokenizer_metadata(d, 12)
    assert list(m) == [
        Keys.TOKENIZER_MODEL,
        Keys.TOKENIZER_PRE,
        Keys.TOKENS,
        Keys.TOKEN_TYPE,
        Keys.MERGES,
    ]
    assert m[Keys.TOKENIZER_MODEL].value == "gpt2" and m[Keys.TOKENIZER_PRE].value == "llama-bpe"
    assert m[Keys.TOKENS].value == [
        "a", "b", "c", "ab", "\u0120", "\u0120a",
        "<|eot|>", " user", "<think>", "[PAD9]", "[X]", "[PAD11]",
    ]  # fmt: skip
    assert m[Keys.TOKEN_TYPE].to_python() == [N, N, C, N, N, N, C, UD, C, UNUSED, UD, UNUSED]
    # pairs are joined with a space; a space inside a part is written as U+0120
    assert m[Keys.MERGES].value == ["a b", "\u0120 a", "a\u0120b c"]
    # with no vocab_size: the count of distinct tokens, which the hole at 9 leaves too small
    with pytest.raises(TokenizerError, match="token id 10 is not below vocab_size 10"):
        tokenizer_metadata(d, None)


def test_bpe_vocab_size_too_small(tmp_path):
    d = _small_bpe(tmp_path, merges=["a b"])
    with pytest.raises(TokenizerError, match="token id 5 is not below vocab_size 4"):
        tokenizer_metadata(d, 4)


def test_bpe_unknown_pre_warns_and_writes_default(tmp_path):
    d = _small_bpe(tmp_path, merges=["a b"], pre={"type": "Whitespace"})
    with pytest.warns(UserWarning, match="tokenizer.json: pre-tokenizer not recognised"):
        m = tokenizer_metadata(d, None)
    assert m[Keys.TOKENIZER_PRE].value == "default"


def test_merges_txt_when_tokenizer_json_has_none(tmp_path):
    d = _small_bpe(tmp_path, merges=[])
    _write(d, "merges.txt", "#version: 0.2\na b\n\n\u0120 a\nbad line here\n")
    m = tokenizer_metadata(d, None)
    assert m[Keys.MERGES].value == ["a b", "\u0120 a"]


def test_llama_family_byte_fallback_tokenizer_json_is_a_llama_vocab(tmp_path):
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<0x0A>": 3, "\u2581a": 4, "b": 5}
    added = [
        {"id": i, "content": t, "special": True, "normalized": False}
        for i, t in enumerate(("<unk>", "<s>", "</s>"))
    ] + [{"id": 6, "content": "<extra>", "special": False, "normalized": False}]
    _write(
        tmp_path,
        "tokenizer.json",
        {
            "added_tokens": added,
            "decoder": {"type": "Sequence", "decoders": []},
            "model": {"type": "BPE", "byte_fallback": True, "vocab": vocab, "merges": ["\u2581 a"]},
        },
    )
    _write(tmp_path, "config.json", {"architectures": ["LlamaForCausalLM"], "vocab_size": 7})
    _write(
        tmp_path,
        "tokenizer_config.json",
        {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>"},
    )
    m = tokenizer_metadata(tmp_path, 7)
    assert m[Keys.TOKENIZER_MODEL].value == "llama" and m[Keys.TOKENIZER_PRE].value == "default"
    assert m[Keys.TOKENS].value == ["<unk>", "<s>", "</s>", "<0x0A>", "\u2581a", "b", "<extra>"]
    assert m[Keys.TOKEN_TYPE].to_python() == [C, C, C, B, N, N, UD]
    assert m[Keys.SCORES].to_python() == [-1000.0] * 7
    assert Keys.MERGES not in m
    assert (m[Keys.BOS_ID].value, m[Keys.EOS_ID].value) == (1, 2)
    # another architecture reads the same file as byte-level BPE
    _write(tmp_path, "config.json", {"architectures": ["Qwen2ForCausalLM"], "vocab_size": 7})
    with pytest.warns(UserWarning, match="not recognised"):
        assert tokenizer_metadata(tmp_path, 7)[Keys.TOKENIZER_MODEL].value == "gpt2"


def test_llama_family_vocab_size_rules(tmp_path):
    """CodeLlama's infill ids (only EOT has a key) and granite-small's add_bos = false."""
    d = _small_bpe(tmp_path, merges=["a b"], post_processor=_template(["<s>", "A"]))
    _write(d, "config.json", {"architectures": ["LlamaForCausalLM"]})
    _write(d, "tokenizer_config.json", {"bos_token": "<s>", "add_bos_token": True})
    m = tokenizer_metadata(d, 32016)
    assert list(m)[-2:] == [Keys.ADD_BOS, Keys.EOT_ID]
    assert m[Keys.EOT_ID].value == 32010 and m[Keys.ADD_BOS].value is True
    m = tokenizer_metadata(d, 49152)
    assert list(m)[-1] == Keys.ADD_BOS and m[Keys.ADD_BOS].value is False


# ---------------------------------------------------------------------------------------------
# special tokens against gguf-py's SpecialVocab


def _template(single: list[str], pair: list[str] | None = None) -> dict:
    def entry(x: str) -> dict:
        if x in ("A", "B"):
            return {"Sequence": {"id": x, "type_id": 0}}
        return {"SpecialToken": {"id": x, "type_id": 0}}

    return {
        "type": "TemplateProcessing",
        "single": [entry(x) for x in single],
        "pair": [entry(x) for x in (pair or [])],
    }


_SPECIALS = [
    {"id": 6, "content": "<s>", "special": True},
    {"id": 7, "content": "</s>", "special": True},
    {"id": 8, "content": "<eot>", "special": True},
    {"id": 9, "content": "[SEP]", "special": True},
    {"id": 10, "content": "[CLS]", "special": True},
]

SPECIAL_CASES = {
    "llama3-template": (
        {"post_processor": _template(["<s>", "A"], ["<s>", "A", "<s>", "B"])},
        {"bos_token": "<s>", "eos_token": "<eot>", "chat_template": "{{ x }}"},
        {"eos_token_id": [7, 8], "pad_token_id": 7},
    ),
    "eos-differs-from-template": (
        {"post_processor": _template(["<s>", "A", "</s>"], ["<s>", "A", "</s>", "B", "</s>"])},
        {"bos_token": "<s>", "eos_token": "<eot>"},
        {},
    ),
    "bert-template": (
        {
            "post_processor": _template(
                ["[CLS]", "A", "[SEP]"], ["[CLS]", "A", "[SEP]", "B", "[SEP]"]
            )
        },
        {"cls_token": "[CLS]", "sep_token": "[SEP]", "mask_token": {"content": "</s>"}},
        {},
    ),
    "roberta": (
        {"post_processor": {"type": "RobertaProcessing", "sep": ["</s>", 7], "cls": ["<s>", 6]}},
        {"unk_token": "<eot>"},
        {"bos_token_id": 99},
    ),
    "config-only": ({}, {}, {"text_config": {"bos_token_id": 6, "eos_token_id": 7}}),
    "named-templates": (
        {},
        {
            "chat_template": [
                {"name": "default", "template": "D"},
                {"name": "tool use", "template": "T"},
            ]
        },
        {},
    ),
    "no-tokenizer-config": ({"post_processor": _template(["<s>", "A"])}, None, {"eos_token_id": 7}),
}


def _gguf_py_specials(d: Path, **kw) -> list[tuple[str, object]]:
    import gguf as ggufpy

    w = ggufpy.GGUFWriter(None, "llama")
    ggufpy.SpecialVocab(d, **kw).add_to_gguf(w, quiet=True)
    out = []
    for key, v in w.kv_data[0].items():
        if not key.startswith("tokenizer."):
            continue  # general.architecture
        value = v.value
        if v.type == ggufpy.GGUFValueType.ARRAY:
            value = list(value)
        out.append((key, int(v.type), value))
    return out


def _ours_specials(m: dict) -> list[tuple[str, object]]:
    keys = list(m)
    after = keys[keys.index(Keys.TOKEN_TYPE) + 1 :]
    return [(k, int(m[k].type), m[k].to_python()) for k in after]


@pytest.mark.parametrize("case", sorted(SPECIAL_CASES))
def test_special_tokens_equal_gguf_py(tmp_path, case):
    tj_extra, tcfg, cfg = SPECIAL_CASES[case]
    d = _small_bpe(tmp_path, merges=["a b"], added=_SPECIALS, **tj_extra)
    if tcfg is not None:
        _write(d, "tokenizer_config.json", tcfg)
    _write(d, "config.json", {"architectures": ["Qwen2ForCausalLM"], **cfg})
    got = _ours_specials(tokenizer_metadata(d, 11))
    assert got == _gguf_py_specials(d, load_merges=True)
    assert got  # every case writes something


def test_post_processor_wins_over_tokenizer_config(tmp_path):
    """Rules newer than the gguf-py release installed here (checked against llama.cpp's
    current gguf-py): a post-processor's add_bos/add_eos beat tokenizer_config's, a
    ByteLevel post-processor means neither, and a template ending in another EOS makes
    the config's EOS the EOT token."""
    pp = _template(["<s>", "A", "</s>"])
    d = _small_bpe(tmp_path, merges=["a b"], added=_SPECIALS, post_processor=pp)
    tcfg = {
        "bos_token": "<s>",
        "eos_token": "<eot>",
        "add_bos_token": False,
        "add_eos_token": False,
    }
    _write(d, "tokenizer_config.json", tcfg)
    got = _ours_specials(tokenizer_metadata(d, 11))
    assert got == [
        (Keys.MERGES, ValueType.ARRAY, ["a b"]),
        (Keys.BOS_ID, ValueType.UINT32, 6),
        (Keys.EOS_ID, ValueType.UINT32, 7),
        (Keys.EOT_ID, ValueType.UINT32, 8),
        (Keys.ADD_BOS, ValueType.BOOL, True),
        (Keys.ADD_EOS, ValueType.BOOL, True),
    ]
    pp = {"type": "Sequence", "processors": [{"type": "ByteLevel"}]}
    d = _small_bpe(tmp_path, merges=["a b"], added=_SPECIALS, post_processor=pp)
    _write(d, "tokenizer_config.json", {"add_bos_token": True, "add_eos_token": True})
    got = _ours_specials(tokenizer_metadata(d, 11))
    assert got[1:] == [(Keys.ADD_BOS, ValueType.BOOL, False), (Keys.ADD_EOS, ValueType.BOOL, False)]


def test_chat_template_files(tmp_path):
    d = _small_bpe(tmp_path, merges=["a b"])
    _write(d, "tokenizer_config.json", {"bos_token": "<s>"})
    _write(d, "chat_template.json", {"chat_template": "from json"})
    assert tokenizer_metadata(d, None)[Keys.CHAT_TEMPLATE].value == "from json"
    _write(d, "chat_template.jinja", "from jinja")
    (d / "additional_chat_templates").mkdir()
    _write(d / "additional_chat_templates", "rag.jinja", "R")
    m = tokenizer_metadata(d, None)
    assert m[Keys.CHAT_TEMPLATE].value == "from jinja"
    assert m["tokenizer.chat_template.rag"].value == "R"
    assert m["tokenizer.chat_templates"].value == ["rag"]
    # the config's own template wins over the files
    _write(d, "tokenizer_config.json", {"chat_template": "from config"})
    assert tokenizer_metadata(d, None)[Keys.CHAT_TEMPLATE].value == "from config"


def test_normalizer_flags(tmp_path):
    norm = {"type": "Sequence", "normalizers": [{"type": "NFC"}, {"type": "Lowercase"}]}
    m = tokenizer_metadata(_small_bpe(tmp_path, merges=["a b"], normalizer=norm), None)
    assert list(m)[-1] == "tokenizer.ggml.normalizer.lowercase" and list(m.values())[-1].value


# ---------------------------------------------------------------------------------------------
# errors


def test_no_tokenizer(tmp_path):
    _write(tmp_path, "config.json", {"architectures": ["LlamaForCausalLM"]})
    with pytest.raises(TokenizerError, match=f"no tokenizer.model or tokenizer.json in {tmp_path}"):
        tokenizer_metadata(tmp_path, 32000)


def test_corrupt_files(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": {')
    with pytest.raises(TokenizerError, match=r"tokenizer\.json: not readable as JSON"):
        tokenizer_metadata(tmp_path, None)
    (tmp_path / "tokenizer.json").unlink()
    (tmp_path / "tokenizer.model").write_bytes(b"\x0a\x05junk" * 10)
    with pytest.raises(TokenizerError, match=r"tokenizer\.model: not a SentencePiece model"):
        tokenizer_metadata(tmp_path, None)


def test_unsupported_tokenizer_json_model(tmp_path):
    _write(tmp_path, "tokenizer.json", {"model": {"type": "Unigram", "vocab": {}}})
    with pytest.raises(TokenizerError, match="a Unigram tokenizer model, only BPE"):
        tokenizer_metadata(tmp_path, None)
