"""The tokenizer.* metadata of a GGUF, written as llama.cpp's converter writes it.

Three vocab sources, picked in llama.cpp's order for the model's architecture:
- SentencePiece (`tokenizer.model`): tokenizer.ggml.model "llama", scores and token types
  from the model, `added_tokens.json` and tokenizer_config's `added_tokens_decoder` on top,
  `[PAD{i}]` up to config.json's vocab_size;
- a LLaMA-style byte-fallback BPE `tokenizer.json` (llama family without tokenizer.model):
  "llama" too, every score -1000;
- byte-level BPE `tokenizer.json` (GPT-2, LLaMA 3, Qwen2, SmolLM ...): "gpt2", merges, and
  tokenizer.ggml.pre recognised from the pre_tokenizer section (llama.cpp hashes a probe
  text's tokens instead; the names and their regexes are llama.cpp's).

Then the special tokens (ids, add_bos/add_eos/add_sep, chat template, normalizer flags)
read from tokenizer.json, tokenizer_config.json, config.json, chat_template.jinja/.json the
way gguf-py's SpecialVocab reads them. Nothing here needs transformers or protobuf.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError
from ..gguf import Keys, Value, ValueType

log = logging.getLogger(__name__)

__all__ = ["SCHEMES", "TokenizerError", "TokenType", "detect_bpe_pre", "embedding_vocab_rows",
           "tokenizer_metadata"]


class TokenizerError(UserError):
    """A tokenizer that cannot be exported: the message names the folder or file and the cause."""


class TokenType(IntEnum):
    """llama.cpp's token types (tokenizer.ggml.token_type)."""

    NORMAL = 1
    UNKNOWN = 2
    CONTROL = 3
    USER_DEFINED = 4
    UNUSED = 5
    BYTE = 6


# Tokenizer keys llama.cpp writes that gguf.constants.Keys does not spell (yet).
EOM_ID = Keys.EOM_ID
MASK_ID = Keys.MASK_ID
ADD_SEP = Keys.ADD_SEP
CHAT_TEMPLATE_NAMED = Keys.CHAT_TEMPLATE_NAMED
CHAT_TEMPLATES = Keys.CHAT_TEMPLATES
NORMALIZER_LOWERCASE = Keys.NORMALIZER_LOWERCASE
NORMALIZER_STRIP_ACCENTS = Keys.NORMALIZER_STRIP_ACCENTS

# special token kind -> key of its id; kinds with no key (cls, prefix, ...) are not written
_SPECIAL_ID_KEYS = {
    "bos": Keys.BOS_ID,
    "eos": Keys.EOS_ID,
    "unk": Keys.UNK_ID,
    "sep": Keys.SEP_ID,
    "pad": Keys.PAD_ID,
    "mask": MASK_ID,
    "eot": Keys.EOT_ID,
    "eom": EOM_ID,
}
_ADD_KEYS = {"bos": Keys.ADD_BOS, "eos": Keys.ADD_EOS, "sep": ADD_SEP}
_SPECIAL_KINDS = ("bos", "eos", "unk", "sep", "pad", "cls", "mask")

# SentencePiece's word-boundary mark; llama.cpp turns it into a space in user-defined tokens
_SPM_SPACE = "\u2581"

# config.json architectures converted by llama.cpp's LlamaModel.set_vocab (SentencePiece, then
# byte-fallback BPE, then byte-level BPE; add_space_prefix; CodeLlama / granite-small rules).
# Every other architecture: SentencePiece if tokenizer.model is there, else byte-level BPE.
_LLAMA_FAMILY = frozenset(
    {
        "LLaMAForCausalLM",
        "LlamaForCausalLM",
        "LlamaModel",
        "LlamaBidirectionalModel",
        "MistralForCausalLM",
        "MixtralForCausalLM",
        "IQuestCoderForCausalLM",
        "ArceeForCausalLM",
        "SmolLM3ForCausalLM",
        "ApertusForCausalLM",
        "AfmoeForCausalLM",
        "NanbeigeForCausalLM",
        "GraniteForCausalLM",
        "GraniteMoeForCausalLM",
        "GraniteMoeSharedForCausalLM",
    }
)
_CODELLAMA_VOCAB = 32016  # CodeLlama: infill tokens at fixed ids
_CODELLAMA_FIM = (("prefix", 32007), ("suffix", 32008), ("middle", 32009), ("eot", 32010))
_GRANITE_SMALL_VOCAB = 49152  # granite small (and SmolLM) models: never add BOS


def _looks_special(text: str) -> bool:
    """Added tokens llama.cpp makes CONTROL even when the tokenizer does not flag them special."""
    return (
        text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (text.startswith("<|") and text.endswith("|>"))
        or (text.startswith("<\uff5c") and text.endswith("\uff5c>"))  # fullwidth bars
        or (text.startswith("<unused") and text.endswith(">"))
    )


# ---------------------------------------------------------------------------------------------
# reading the folder


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{path}: not readable as JSON ({e})") from None


def _read_json_if(path: Path) -> Any:
    return _read_json(path) if path.is_file() else None


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path}: not readable ({e})") from None


@dataclass
class _Folder:
    path: Path
    config: dict | None
    tokenizer_config: dict | None
    tokenizer_json: dict | None

    @property
    def tokenizer_json_path(self) -> Path:
        return self.path / "tokenizer.json"


def _load_folder(folder: str | os.PathLike) -> _Folder:
    d = Path(folder)
    if not d.is_dir():
        raise TokenizerError(f"{d}: not a folder")
    tj = None
    if (d / "tokenizer.json").is_file():
        tj = _read_json(d / "tokenizer.json")
        if not isinstance(tj, dict):
            raise TokenizerError(f"{d / 'tokenizer.json'}: not a tokenizer (no JSON object)")
    config = _read_json_if(d / "config.json")
    tcfg = _read_json_if(d / "tokenizer_config.json")
    return _Folder(
        d,
        config if isinstance(config, dict) else None,
        tcfg if isinstance(tcfg, dict) else None,
        tj,
    )


# ---------------------------------------------------------------------------------------------
# tokenizer.ggml.pre from tokenizer.json's pre_tokenizer

# The contraction group as HF spells it and as llama.cpp spells it (no inline flags there).
_HF_CONTRACTIONS = "(?i:'s|'t|'re|'ve|'m|'ll|'d)"
_LCPP_CONTRACTIONS = "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"

# ByteLevel(use_regex=true) splits with GPT-2's regex; llama.cpp writes it without HF's
# trailing "|\s+" (its splitter treats the last whitespace run the same way).
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (
    _LCPP_CONTRACTIONS
    + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    _LCPP_CONTRACTIONS
    + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35 = (
    _LCPP_CONTRACTIONS
    + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+"
    + r"|\s+(?!\S)|\s+"
)
# o200k (gpt-4o, Llama 4) and Tekken (Mistral Nemo) as tokenizer.json spells them; llama.cpp
# rewrites their case classes with lookaheads but splits the same way.
_UPPER = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]"
_LOWER = r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]"
_GPT4O = (
    rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+{_LCPP_CONTRACTIONS}?"
    rf"|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*{_LCPP_CONTRACTIONS}?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN = (
    rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_DEEPSEEK3 = (
    r"""[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"""
    r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# (name, the regexes applied in order before byte-level encoding). Several llama.cpp names
# share one regex list (llama3/dbrx/smaug-bpe/falcon3..., gpt-2/phi-2/olmo/mpt...); the name
# here is the one llama.cpp gives the reference model of that family.
_PRE_TABLE: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("gpt-2", (_GPT2,)),
    ("starcoder", (r"\p{N}", _GPT2)),  # also smollm: told apart by the vocab, below
    ("llama-bpe", (_LLAMA3,)),
    ("qwen2", (_QWEN2,)),
    ("qwen35", (_QWEN35,)),
    ("gpt-4o", (_GPT4O,)),
    ("tekken", (_TEKKEN,)),
    ("deepseek-v3", (r"\p{N}{1,3}", "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+", _DEEPSEEK3)),
)


def _canonical_regex(rx: str) -> str:
    """One spelling for patterns that split alike: llama.cpp's contraction group, and
    escapes instead of raw CR/LF characters."""
    return (
        rx.replace(_HF_CONTRACTIONS, _LCPP_CONTRACTIONS).replace("\r", r"\r").replace("\n", r"\n")
    )


def _pre_steps(pt: Any) -> list[str] | None:
    """The regexes a pre_tokenizer applies in order, ending with "<bytes>" for byte-level
    encoding; None when a step is one llama.cpp has no equivalent for."""
    if not isinstance(pt, dict):
        return None
    kind = pt.get("type")
    if kind == "Sequence":
        steps: list[str] = []
        for sub in pt.get("pretokenizers") or []:
            s = _pre_steps(sub)
            if s is None:
                return None
            steps += s
        return steps
    if kind == "Split":
        pattern = pt.get("pattern") or {}
        rx = pattern.get("Regex") if isinstance(pattern, dict) else None
        if not isinstance(rx, str) or pt.get("behavior") != "Isolated" or pt.get("invert"):
            return None
        return [_canonical_regex(rx)]
    if kind == "Digits":
        return [r"\p{N}" if pt.get("individual_digits") else r"\p{N}+"]
    if kind == "ByteLevel":
        if pt.get("add_prefix_space"):
            return None
        return ([_GPT2] if pt.get("use_regex", True) else []) + ["<bytes>"]
    return None


def _looks_like_smollm(tokenizer_json: dict) -> bool:
    """SmolLM's vocab (chat tokens at ids 1 and 2) rather than StarCoder's: same pre-tokenizer."""
    added = {a.get("content"): a.get("id") for a in _added_tokens(tokenizer_json)}
    return added.get("<|im_start|>") == 1 and added.get("<|im_end|>") == 2


def _match_pre(tokenizer_json: dict) -> str | None:
    steps = _pre_steps(tokenizer_json.get("pre_tokenizer"))
    if not steps or steps[-1] != "<bytes>" or "<bytes>" in steps[:-1]:
        return None
    regexes = tuple(steps[:-1])
    for name, known in _PRE_TABLE:
        if regexes == known:
            if name == "starcoder" and _looks_like_smollm(tokenizer_json):
                return "smollm"
            return name
    return None


def detect_bpe_pre(tokenizer_json: dict) -> str:
    """The tokenizer.ggml.pre name for a byte-level BPE tokenizer.json (its parsed dict):
    the llama.cpp pre-tokenizer that splits text as its pre_tokenizer section does, or
    "default" (llama.cpp's fallback regexes) with a warning when none is known to."""
    name = _match_pre(tokenizer_json)
    if name is None:
        _warn_unknown_pre("tokenizer.json", stacklevel=3)
        return "default"
    return name


def _warn_unknown_pre(source: str, stacklevel: int) -> None:
    warnings.warn(
        f"{source}: pre-tokenizer not recognised, writing tokenizer.ggml.pre = 'default'; "
        "llama.cpp may split text differently from this tokenizer",
        stacklevel=stacklevel,
    )


# ---------------------------------------------------------------------------------------------
# vocab sources


@dataclass
class _Vocab:
    model: str  # tokenizer.ggml.model
    pre: str
    tokens: list[str]
    types: list[int]
    scores: list[float] | None = None
    load_merges: bool = False
    n_vocab: int | None = None  # special ids at or above this are dropped (None: no check)


def _added_tokens(tokenizer_json: dict) -> list[dict]:
    added = tokenizer_json.get("added_tokens") or []
    return [a for a in added if isinstance(a, dict)] if isinstance(added, list) else []


def _sentencepiece_vocab(f: _Folder, vocab_size: int | None, phi3: bool = False) -> _Vocab:
    """`phi3`: Phi-3's rules for added tokens: tokenizer_config's and tokenizer.json's,
    USER_DEFINED unless flagged special, texts as written (llama.cpp's Phi3MiniModel)."""
    path = f.path / "tokenizer.model"
    try:
        from sentencepiece import SentencePieceProcessor
    except ImportError:  # a declared dependency, but say so in one line if it is missing
        raise TokenizerError(f"{path}: reading it needs the sentencepiece package") from None
    sp = SentencePieceProcessor()
    try:
        sp.LoadFromFile(str(path))
    except Exception as e:  # sentencepiece raises RuntimeError/OSError with C++ text
        cause = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise TokenizerError(f"{path}: not a SentencePiece model ({cause})") from None

    n_sp = sp.vocab_size()
    n = vocab_size or n_sp
    tokens = [f"[PAD{i}]" for i in range(n)]
    scores = [-10000.0] * n
    types = [int(TokenType.UNUSED)] * n
    if n_sp > n:
        warnings.warn(
            f"{path}: {n_sp - n} pieces from id {n} are beyond vocab_size {n}, dropped",
            stacklevel=3,
        )
    for i in range(min(n, n_sp)):
        if sp.IsUnknown(i):
            t = TokenType.UNKNOWN
        elif sp.IsControl(i):
            t = TokenType.CONTROL
        elif sp.IsUnused(i):
            t = TokenType.UNUSED
        elif sp.IsByte(i):
            t = TokenType.BYTE
        else:  # user-defined pieces too: llama.cpp asks only the four questions above
            t = TokenType.NORMAL
        tokens[i], scores[i], types[i] = sp.IdToPiece(i), sp.GetScore(i), int(t)

    added_path = f.path / "added_tokens.json"
    added = _read_json_if(added_path)
    if added is not None:
        if not isinstance(added, dict):
            raise TokenizerError(f"{added_path}: expected an object of token: id")
        for text, tid in added.items():
            if not isinstance(tid, int) or tid < 0:
                raise TokenizerError(f"{added_path}: id of {text!r} is not a token id: {tid!r}")
            if tid >= n:
                log.warning("%s: ignoring %r, id %d is not below %d", added_path, text, tid, n)
                continue
            tokens[tid], scores[tid], types[tid] = text, -1000.0, int(TokenType.USER_DEFINED)

    decoder = (f.tokenizer_config or {}).get("added_tokens_decoder") or {}
    cfg_path = f.path / "tokenizer_config.json"
    if not isinstance(decoder, dict):
        raise TokenizerError(f"{cfg_path}: added_tokens_decoder is not an object")
    if phi3:
        entries = [(str(k), e) for k, e in decoder.items()]
        if f.tokenizer_json is not None:
            entries += [(str(a.get("id")), a) for a in _added_tokens(f.tokenizer_json)]
        for key, entry in entries:
            try:
                tid, text = int(key), entry["content"]
            except (ValueError, TypeError, KeyError):
                raise TokenizerError(f"{f.path}: bad added token entry {key!r}") from None
            if not 0 <= tid < n:
                raise TokenizerError(f"{f.path}: added token {text!r} has id {tid}, "
                                     f"not below vocab_size {n}")
            special = entry.get("special")
            types[tid] = int(TokenType.CONTROL if special else TokenType.USER_DEFINED)
            tokens[tid], scores[tid] = text, -1000.0
        return _Vocab("llama", "default", tokens, types, scores, load_merges=False, n_vocab=n)
    for key, entry in decoder.items():
        try:
            tid = int(key)
            text = entry["content"]
        except (ValueError, TypeError, KeyError):
            raise TokenizerError(f"{cfg_path}: bad added_tokens_decoder entry {key!r}") from None
        if tid < 0 or tid >= n:
            log.warning("%s: ignoring %r, id %d is not below %d", cfg_path, text, tid, n)
            continue
        if entry.get("special") or _looks_special(text):
            types[tid] = int(TokenType.CONTROL)
        else:
            text = text.replace(_SPM_SPACE, " ")
            types[tid] = int(TokenType.USER_DEFINED)
        tokens[tid], scores[tid] = text, -1000.0

    return _Vocab("llama", "default", tokens, types, scores, load_merges=False, n_vocab=n)


def _bpe_model(f: _Folder) -> dict:
    path = f.tokenizer_json_path
    model = f.tokenizer_json.get("model") if f.tokenizer_json else None
    if not isinstance(model, dict):
        raise TokenizerError(f"{path}: no tokenizer model in it")
    kind = model.get("type", "BPE" if "merges" in model else None)
    if kind != "BPE":
        raise TokenizerError(f"{path}: a {kind} tokenizer model, only BPE is supported")
    if not isinstance(model.get("vocab"), dict):
        raise TokenizerError(f"{path}: the BPE model has no vocab")
    for tok, tid in model["vocab"].items():
        if not isinstance(tid, int) or tid < 0:
            raise TokenizerError(f"{path}: vocab entry {tok!r} has no token id ({tid!r})")
    return model


def _is_llama_hf(tokenizer_json: dict) -> bool:
    """A LLaMA-style BPE tokenizer.json (byte fallback, Sequence decoder): the one
    llama.cpp's llama family converts as a "llama" vocab when tokenizer.model is missing."""
    model = tokenizer_json.get("model")
    if not isinstance(model, dict) or model.get("type") != "BPE":
        return False
    if model.get("ignore_merges", False) and not model.get("byte_fallback", True):
        return False  # LLaMA 3 style: byte-level
    decoder = tokenizer_json.get("decoder")
    return bool(model.get("byte_fallback", False)) and (
        isinstance(decoder, dict) and decoder.get("type") == "Sequence"
    )


def _content_ids(model: dict, added: list[dict]) -> dict[str, int]:
    """token text -> id over the model vocab and the added tokens (added ones win)."""
    ids = dict(model["vocab"])
    for a in added:
        if isinstance(a.get("content"), str) and isinstance(a.get("id"), int):
            ids[a["content"]] = a["id"]
    return ids


def _bpe_vocab(f: _Folder, vocab_size: int | None) -> _Vocab:
    path = f.tokenizer_json_path
    assert f.tokenizer_json is not None
    model = _bpe_model(f)
    added = _added_tokens(f.tokenizer_json)
    ids = _content_ids(model, added)
    n = vocab_size if vocab_size is not None else len(ids)
    if ids and max(ids.values()) >= n:
        raise TokenizerError(
            f"{path}: token id {max(ids.values())} is not below vocab_size {n} (config.json)"
        )
    text_of = {tid: text for text, tid in ids.items()}
    added_by_id = {a["id"]: a for a in added if isinstance(a.get("id"), int)}
    added_by_text = {a.get("content"): a for a in added}

    tokens: list[str] = []
    types: list[int] = []
    for i in range(n):
        text = text_of.get(i)
        if text is None:
            tokens.append(f"[PAD{i}]")
            types.append(int(TokenType.UNUSED))
            continue
        a = added_by_text.get(text)
        if a is None:
            types.append(int(TokenType.NORMAL))
        else:
            a = added_by_id.get(i, a)
            if a.get("special") or _looks_special(text):
                types.append(int(TokenType.CONTROL))
            else:
                text = text.replace(_SPM_SPACE, " ")
                types.append(int(TokenType.USER_DEFINED))
        tokens.append(text)

    pre = _match_pre(f.tokenizer_json)
    if pre is None:
        _warn_unknown_pre(str(path), stacklevel=4)
        pre = "default"
    return _Vocab("gpt2", pre, tokens, types, None, load_merges=True, n_vocab=None)


def _special_texts(tcfg: dict | None, specials_map: dict | None) -> set[str]:
    """The texts transformers counts as special (all_special_tokens) for this tokenizer:
    bos/eos/unk/sep/pad/cls/mask and the additional ones, with the LLaMA tokenizer's
    defaults for the first three."""
    merged = {**(specials_map or {}), **(tcfg or {})}
    defaults = {}
    if str(merged.get("tokenizer_class", "")).startswith(("LlamaTokenizer", "CodeLlamaTokenizer")):
        defaults = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}

    def text(v: Any) -> str | None:
        if isinstance(v, dict):
            v = v.get("content")
        return v if isinstance(v, str) and v else None

    names = [f"{k}_token" for k in _SPECIAL_KINDS]
    out = {t for k in names if (t := text(merged.get(k, defaults.get(k))))}
    out |= {t for v in merged.get("additional_special_tokens") or [] if (t := text(v))}
    return out


def _llama_hf_vocab(f: _Folder) -> _Vocab:
    assert f.tokenizer_json is not None
    model = _bpe_model(f)
    added = _added_tokens(f.tokenizer_json)
    ids = _content_ids(model, added)
    text_of = {tid: text for text, tid in ids.items()}
    n_base = len(model["vocab"])
    specials_map = _read_json_if(f.path / "special_tokens_map.json")
    if not isinstance(specials_map, dict):
        specials_map = None
    special_ids = {ids[t] for t in _special_texts(f.tokenizer_config, specials_map) if t in ids}
    byte_piece = re.compile(r"<0x[0-9A-Fa-f]{2}>")

    tokens: list[str] = []
    types: list[int] = []
    for i in range(n_base):
        if i not in text_of:
            raise TokenizerError(f"{f.tokenizer_json_path}: no token with id {i}")
        text = text_of[i]
        if byte_piece.fullmatch(text):
            t = TokenType.BYTE
        else:
            t = TokenType.CONTROL if i in special_ids else TokenType.NORMAL
        tokens.append(text)
        types.append(int(t))
    extra = sorted(
        (a["id"], a["content"])
        for a in added
        if isinstance(a.get("id"), int) and a["id"] >= n_base and isinstance(a.get("content"), str)
    )
    for tid, text in extra:
        tokens.append(text)
        types.append(int(TokenType.CONTROL if tid in special_ids else TokenType.USER_DEFINED))
    scores = [-1000.0] * len(tokens)
    return _Vocab("llama", "default", tokens, types, scores, load_merges=False, n_vocab=len(tokens))


# ---------------------------------------------------------------------------------------------
# special tokens, as gguf-py's SpecialVocab finds them


@dataclass
class _Specials:
    kinds: tuple[str, ...] = _SPECIAL_KINDS
    n_vocab: int | None = None
    merges: list[str] = field(default_factory=list)
    ids: dict[str, int] = field(default_factory=dict)
    add: dict[str, bool] = field(default_factory=dict)
    chat_template: str | list | None = None
    lowercase: bool | None = None
    strip_accents: bool | None = None

    def set_id(self, kind: str, tid: Any, source: str) -> None:
        if not isinstance(tid, int):
            return
        if tid < 0:
            raise TokenizerError(f"{source}: {kind} token id {tid} is negative")
        if self.n_vocab is not None and tid >= self.n_vocab:
            log.warning(
                "%s: %s token id %d is not below %d, skipped", source, kind, tid, self.n_vocab
            )
            return
        self.ids.setdefault(kind, tid)


def _merges_from_json(tj: dict, path: Path) -> list[str]:
    merges = (tj.get("model") or {}).get("merges") if isinstance(tj.get("model"), dict) else None
    if not isinstance(merges, list) or not merges:
        return []
    first = merges[0]
    if isinstance(first, str):
        return merges
    if isinstance(first, list) and len(first) == 2 and isinstance(first[0], str):
        # pairs (tokenizers >= 0.20): a space inside a part is written as U+0120, as GPT-2 bytes
        return [" ".join(part.replace(" ", "\u0120") for part in pair) for pair in merges]
    raise TokenizerError(f"{path}: merges are neither 'a b' strings nor [a, b] pairs")


def _merges_from_txt(path: Path) -> list[str] | None:
    if not path.is_file():
        return None
    lines = _read_text(path).splitlines()
    if lines and lines[0].strip().startswith("#"):
        lines = lines[1:]
    merges = []
    for line in lines:
        parts = line.strip().split(None, 3)
        if not parts:
            continue
        if len(parts) != 2:
            log.warning("%s: malformed merge %r ignored", path, line)
            continue
        merges.append(f"{parts[0]} {parts[1]}")
    return merges


def _template_special(entry: Any) -> Any:
    return entry.get("SpecialToken", {}).get("id") if isinstance(entry, dict) else None


def _read_post_processor(sv: _Specials, pp: dict, tcfg: dict | None, names: dict) -> None:
    """add_bos/add_eos/add_sep and missing special names from tokenizer.json's post-processor
    (a crude reading of simple templates, llama.cpp's rules)."""
    for proc in pp.get("processors", [pp]):
        if not isinstance(proc, dict):
            continue
        kind = proc.get("type")
        if kind == "ByteLevel":
            sv.add.setdefault("bos", False)
            sv.add.setdefault("eos", False)
        elif kind == "RobertaProcessing":
            sv.add.update(bos=True, eos=True, sep=True)
            if not names["cls"] and tcfg:
                names["cls"] = tcfg["cls_token"] = proc.get("cls", [names["bos"]])[0]
            if not names["sep"] and tcfg:
                names["sep"] = tcfg["sep_token"] = proc.get("sep", [names["eos"]])[0]
        elif kind == "TemplateProcessing":
            _read_template(sv, proc, tcfg, names)


def _read_template(sv: _Specials, proc: dict, tcfg: dict | None, names: dict) -> None:
    single = proc.get("single", []) or []
    pair = proc.get("pair", []) or []
    first = last = None
    if len(single) > 1:
        first = _template_special(single[0])
        if first:
            if not tcfg:
                names["bos"] = first
            elif first not in (names["bos"], names["cls"]):
                if not names["bos"]:
                    names["bos"] = tcfg["bos_token"] = first
                if not names["cls"]:
                    names["cls"] = tcfg["cls_token"] = first
            sv.add["bos"] = first in (names["bos"], names["cls"])
        last = _template_special(single[-1])
        if last:
            if not tcfg:
                names["eos"] = last
            elif last != names["eos"]:
                if "eot" not in sv.kinds:
                    sv.kinds += ("eot",)
                    tcfg["eot_token"] = names["eos"]
                elif "eom" not in sv.kinds:
                    sv.kinds += ("eom",)
                    tcfg["eom_token"] = names["eos"]
                names["eos"] = tcfg["eos_token"] = last
            sv.add["eos"] = last == names["eos"]
    if not pair:
        return
    start = 1 if first and _template_special(pair[0]) == first else 0
    stop = -1 if last and _template_special(pair[-1]) == last else None
    middle = pair[start:stop]
    if not middle:
        return
    a = middle[0].get("Sequence", {}).get("id") if isinstance(middle[0], dict) else None
    b = middle[-1].get("Sequence", {}).get("id") if isinstance(middle[-1], dict) else None
    middle = middle[1:-1]
    if a != "A" or b != "B" or not middle:
        return
    add_sep = False
    entry = _template_special(middle[0])
    if entry and entry in (names["sep"], names["eos"]) and not last:
        add_sep = True
    if len(middle) == 2:
        entry = _template_special(middle[1])
        if entry and entry in (names["sep"], names["eos"]):
            add_sep = True
    sv.add["sep"] = add_sep
    if add_sep and not names["sep"] and tcfg:
        tcfg["sep_token"] = names["eos"]


def _read_normalizer(sv: _Specials, norm: Any) -> None:
    if not isinstance(norm, dict):
        return
    kind = norm.get("type")
    if kind == "Lowercase":
        sv.lowercase = True
    elif kind == "StripAccents":
        sv.strip_accents = True
    elif kind == "BertNormalizer":
        if "lowercase" in norm:
            sv.lowercase = norm["lowercase"]
        if "strip_accents" in norm:
            sv.strip_accents = norm["strip_accents"]
    elif kind == "Sequence":
        for sub in norm.get("normalizers", []) or []:
            _read_normalizer(sv, sub)


def _chat_template_files(d: Path) -> str | list | None:
    jinja = d / "chat_template.jinja"
    if jinja.is_file():
        template: str | list = _read_text(jinja)
        more = list((d / "additional_chat_templates").glob("*.jinja"))
        if more:
            template = [{"name": "default", "template": template}]
            template += [{"name": p.stem, "template": _read_text(p)} for p in more]
        return template
    as_json = _read_json_if(d / "chat_template.json")
    return as_json.get("chat_template") if isinstance(as_json, dict) else None


def _special_vocab(
    f: _Folder,
    *,
    load_merges: bool,
    n_vocab: int | None,
    kinds: tuple[str, ...] = _SPECIAL_KINDS,
) -> _Specials:
    sv = _Specials(kinds=kinds, n_vocab=n_vocab)
    tj = f.tokenizer_json
    tcfg = copy.deepcopy(f.tokenizer_config)  # the post-processor reading fills names in
    cfg_path = f.path / "tokenizer_config.json"
    added: list[dict] = []
    if tj is not None:
        if load_merges:
            sv.merges = _merges_from_json(tj, f.tokenizer_json_path)
        _read_normalizer(sv, tj.get("normalizer"))
        added = _added_tokens(tj)
    if tj:
        c = tcfg or {}
        names = {k: c.get(f"{k}_token") for k in ("bos", "cls", "eos", "sep")}
        if not names["bos"] and names["cls"] and tcfg:
            names["bos"] = tcfg["bos_token"] = names["cls"]
        if not names["eos"] and names["sep"] and tcfg:
            names["eos"] = tcfg["eos_token"] = names["sep"]
        pp = tj.get("post_processor")
        if isinstance(pp, dict):
            _read_post_processor(sv, pp, tcfg, names)

    if tcfg:
        alt = _chat_template_files(f.path)
        template = tcfg.get("chat_template", alt)
        if template is None or isinstance(template, (str, list)):
            sv.chat_template = template
        else:
            log.warning("%s: chat_template is neither text nor a list, ignored", cfg_path)
        for kind in sv.kinds:
            add = tcfg.get(f"add_{kind}_token")
            if isinstance(add, bool):
                sv.add.setdefault(kind, add)
            entry = tcfg.get(f"{kind}_token")
            if isinstance(entry, dict):
                entry = entry.get("content")
            if not isinstance(entry, str):
                continue
            tid = next((a.get("id") for a in added if a.get("content") == entry), None)
            sv.set_id(kind, tid, str(cfg_path))

    config_path = f.path / "config.json"
    if f.config is not None:
        text_config = f.config.get("text_config")
        for kind in sv.kinds:
            tid = f.config.get(f"{kind}_token_id")
            if tid is None and isinstance(text_config, dict):
                tid = text_config.get(f"{kind}_token_id")
            sv.set_id(kind, tid, str(config_path))

    if load_merges and not sv.merges:
        sv.merges = _merges_from_txt(f.path / "merges.txt") or []
    return sv


# ---------------------------------------------------------------------------------------------
# writing


def _u32(x: int) -> Value:
    if not 0 <= x < 2**32:
        raise TokenizerError(f"token id {x} does not fit in uint32")
    return Value(ValueType.UINT32, int(x))


def _put_string(out: dict[str, Value], key: str, s: str) -> None:
    if s:  # llama.cpp's writer drops empty strings
        out[key] = Value(ValueType.STRING, s)


def _put_strings(out: dict[str, Value], key: str, items: Iterable[str]) -> None:
    items = list(items)
    if items:  # and empty arrays
        out[key] = Value(ValueType.ARRAY, items, ValueType.STRING)


def _put_chat_template(out: dict[str, Value], template: str | list | None) -> None:
    if template is None:
        out.pop(Keys.CHAT_TEMPLATE, None)
        return
    if isinstance(template, list):
        default = None
        names: list[str] = []
        for choice in template:
            if not isinstance(choice, dict):
                continue
            name = re.sub(r"[^A-Za-z0-9]", "_", str(choice.get("name", "")))
            text = choice.get("template")
            if not name or text is None:
                continue
            if name == "default":
                default = text
            else:
                if name not in names:
                    names.append(name)
                _put_string(out, CHAT_TEMPLATE_NAMED.format(name=name), text)
        _put_strings(out, CHAT_TEMPLATES, names)
        if default is None:
            return
        template = default
    _put_string(out, Keys.CHAT_TEMPLATE, template)


def _put_specials(out: dict[str, Value], sv: _Specials) -> None:
    """In SpecialVocab.add_to_gguf's order: merges, ids, add_* flags, template, normalizer."""
    _put_strings(out, Keys.MERGES, sv.merges)
    for kind, tid in sv.ids.items():
        if kind in _SPECIAL_ID_KEYS:
            out[_SPECIAL_ID_KEYS[kind]] = _u32(tid)
    for kind, flag in sv.add.items():
        if kind in _ADD_KEYS:
            out[_ADD_KEYS[kind]] = Value(ValueType.BOOL, bool(flag))
    _put_chat_template(out, sv.chat_template)
    if sv.lowercase is not None:
        out[NORMALIZER_LOWERCASE] = Value(ValueType.BOOL, bool(sv.lowercase))
    if sv.strip_accents is not None:
        out[NORMALIZER_STRIP_ACCENTS] = Value(ValueType.BOOL, bool(sv.strip_accents))


def _hf_arch(f: _Folder) -> str | None:
    archs = (f.config or {}).get("architectures")
    return archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else None


# how llama.cpp's converter of a family picks the vocab source (Arch.vocab)
SCHEMES = ("llama", "sentencepiece_or_bpe", "bpe", "sentencepiece", "phi3")


def tokenizer_metadata(
    folder: str | os.PathLike,
    vocab_size: int | None,
    scheme: str | None = None,
    spm_space_prefix: bool | None = None,
) -> dict[str, Value]:
    """Every tokenizer.* key llama.cpp's converter writes for this Hugging Face folder, in its
    order and with its types. `vocab_size` is config.json's vocab_size (None: the tokenizer's
    own size); the vocab is padded to it with `[PAD{i}]` unused tokens as llama.cpp does.

    `scheme` is the family's way to the vocab (SCHEMES; None: "llama" for config.json's
    llama-family architectures, else "sentencepiece_or_bpe"); `spm_space_prefix`, when set,
    is written as add_space_prefix after a SentencePiece vocab (Gemma: false).

    Raises TokenizerError (one line naming the folder or file) when there is no tokenizer
    or it cannot be read."""
    f = _load_folder(folder)
    has_spm = (f.path / "tokenizer.model").is_file()
    if scheme is None:
        scheme = "llama" if _hf_arch(f) in _LLAMA_FAMILY else "sentencepiece_or_bpe"
    if scheme not in SCHEMES:
        raise ValueError(f"unknown vocab scheme {scheme!r}")
    if scheme == "phi3" and str((f.tokenizer_config or {}).get("tokenizer_class")) == \
            "GPT2Tokenizer":
        scheme = "bpe"  # Phi-4
    if scheme in ("sentencepiece", "phi3") and not has_spm:
        raise TokenizerError(f"no tokenizer.model in {f.path} (this architecture's vocab is "
                             f"SentencePiece)")
    if scheme == "bpe":
        has_spm = False
        if f.tokenizer_json is None:
            raise TokenizerError(f"no tokenizer.json in {f.path} (this architecture's vocab "
                                 f"is byte-level BPE)")
    if not has_spm and f.tokenizer_json is None:
        raise TokenizerError(f"no tokenizer.model or tokenizer.json in {f.path}")
    llama_family = scheme == "llama"

    out: dict[str, Value] = {}
    if llama_family and f.tokenizer_config:
        prefix = f.tokenizer_config.get("add_prefix_space")
        if prefix is not None:
            out[Keys.ADD_SPACE_PREFIX] = Value(ValueType.BOOL, bool(prefix))

    if has_spm:
        vocab = _sentencepiece_vocab(f, vocab_size, phi3=scheme == "phi3")
    elif llama_family and _is_llama_hf(f.tokenizer_json):
        vocab = _llama_hf_vocab(f)
    else:
        vocab = _bpe_vocab(f, vocab_size)

    _put_string(out, Keys.TOKENIZER_MODEL, vocab.model)
    _put_string(out, Keys.TOKENIZER_PRE, vocab.pre)
    _put_strings(out, Keys.TOKENS, vocab.tokens)
    if vocab.scores is not None and vocab.scores:
        out[Keys.SCORES] = Value(
            ValueType.ARRAY, np.array(vocab.scores, np.float32), ValueType.FLOAT32
        )
    if vocab.types:
        out[Keys.TOKEN_TYPE] = Value(
            ValueType.ARRAY, np.array(vocab.types, np.int32), ValueType.INT32
        )
    _put_specials(out, _special_vocab(f, load_merges=vocab.load_merges, n_vocab=vocab.n_vocab))

    if llama_family:
        config_vocab = vocab_size if vocab_size is not None else 32000
        if config_vocab == _CODELLAMA_VOCAB:
            sv = _special_vocab(
                f, load_merges=False, n_vocab=None, kinds=("prefix", "suffix", "middle", "eot")
            )
            for kind, tid in _CODELLAMA_FIM:
                sv.set_id(kind, tid, str(f.path))
            _put_specials(out, sv)
        if config_vocab == _GRANITE_SMALL_VOCAB:
            out[Keys.ADD_BOS] = Value(ValueType.BOOL, False)
    if has_spm and spm_space_prefix is not None:
        out[Keys.ADD_SPACE_PREFIX] = Value(ValueType.BOOL, spm_space_prefix)
    return out


def embedding_vocab_rows(folder: str | os.PathLike, vocab_size: int | None) -> int:
    """The token rows llama.cpp's Gemma 3 converter keeps in the embedding: the
    SentencePiece vocab's size (config.json's vocab_size when set), else tokenizer.json's
    vocab and added tokens together."""
    f = _load_folder(folder)
    if (f.path / "tokenizer.model").is_file():
        return len(_sentencepiece_vocab(f, vocab_size).tokens)
    if f.tokenizer_json is None:
        raise TokenizerError(f"no tokenizer.model or tokenizer.json in {f.path}")
    return len(_bpe_model(f)["vocab"]) + len(_added_tokens(f.tokenizer_json))
