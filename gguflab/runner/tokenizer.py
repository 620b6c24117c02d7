"""Text <-> token ids from a GGUF file's `tokenizer.ggml.*` metadata, matching llama.cpp.

Two vocabulary kinds are supported, as llama.cpp names them:

* `llama`: SentencePiece. Spaces become U+2581, a space is put in front of every text run
  that starts the input or follows a special token (`add_space_prefix`), and the pieces are
  merged greedily by vocabulary score (best pair first, leftmost on ties). A piece that is
  not in the vocabulary falls back to its UTF-8 bytes (`<0xXX>` tokens).
* `gpt2`: byte-level BPE. The text is cut into words by the pre-tokenizer regexes that
  `tokenizer.ggml.pre` selects, each word's UTF-8 bytes are mapped to printable characters,
  and the word is merged pair by pair in `tokenizer.ggml.merges` rank order.

Before either, control / user-defined token texts are cut out of the input (user-defined
ones always, control ones only with `parse_special`), longest first.

Pre-tokenization follows llama.cpp rather than the Hugging Face regexes literally: llama.cpp
classifies code points with its own Unicode 15.1 tables (letters, numbers, punctuation,
symbols, marks, and a fixed white-space set) and runs the patterns over a "collapsed" copy of
the text in which every non-ASCII code point is replaced by one byte standing for its class.
We do the same with Python's `re` (ASCII mode) over the same collapsed text, which gives
llama.cpp's word boundaries exactly, including for its hand-written GPT-2 / LLaMA 3 / Qwen2
splitters (they agree with their patterns run this way).
"""

from __future__ import annotations

import codecs
import heapq
import os
import re
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from ..errors import UserError
from ..gguf.constants import Keys

# -- token attributes (llama.cpp's llama_token_attr bits) ---------------------------------

ATTR_UNDEFINED = 0
ATTR_UNKNOWN = 1 << 0
ATTR_UNUSED = 1 << 1
ATTR_NORMAL = 1 << 2
ATTR_CONTROL = 1 << 3
ATTR_USER_DEFINED = 1 << 4
ATTR_BYTE = 1 << 5
ATTR_LSTRIP = 1 << 7
ATTR_RSTRIP = 1 << 8

# tokenizer.ggml.token_type values -> attribute bits
_TYPE_ATTR = {
    1: ATTR_NORMAL,
    2: ATTR_UNKNOWN,
    3: ATTR_CONTROL,
    4: ATTR_USER_DEFINED,
    5: ATTR_UNUSED,
    6: ATTR_BYTE,
}

_SPECIAL_ATTRS = ATTR_CONTROL | ATTR_USER_DEFINED | ATTR_UNKNOWN
_HIDDEN_ATTRS = ATTR_CONTROL | ATTR_UNKNOWN  # pieces dropped unless special=True

_SPM_SPACE = "\u2581"
_C_SPACES = " \t\n\v\f\r"  # C isspace() in the "C" locale

# Token texts that llama.cpp recognises as end-of-turn / end-of-generation / FIM markers.
_EOT_TEXTS = frozenset({
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
    "<|end_of_text|>", "<EOT>", "_<EOT>", "[EOT]", "<\uff5cend\u2581of\u2581sentence\uff5c>",
    "<end_of_utterance>",
})
_EOM_TEXTS = frozenset({"<|eom_id|>"})
_FIM_TEXTS = {
    "pre": frozenset({"<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>",
                      "<\uff5cfim\u2581begin\uff5c>", "<PRE>", "\u2581<PRE>",
                      "<|code_prefix|>", "<|prefix|>"}),
    "suf": frozenset({"<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>",
                      "<\uff5cfim\u2581hole\uff5c>", "<SUF>", "\u2581<SUF>",
                      "<|code_suffix|>", "<|suffix|>"}),
    "mid": frozenset({"<|fim_middle|>", "<fim-middle>", "<fim_middle>",
                      "<\uff5cfim\u2581end\uff5c>", "<MID>", "\u2581<MID>",
                      "<|code_middle|>", "<|middle|>"}),
    "pad": frozenset({"<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"}),
    "rep": frozenset({"<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"}),
    "sep": frozenset({"<|file_sep|>"}),
}
_EOG_TEXTS = frozenset({
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
    "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
    "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
    "<\uff5cend\u2581of\u2581sentence\uff5c>", "[e~[",
})
_ALWAYS_SHOWN = frozenset({"<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"})
_MARKER_TEXTS = _EOT_TEXTS | _EOM_TEXTS | _EOG_TEXTS | _ALWAYS_SHOWN | frozenset().union(
    *_FIM_TEXTS.values())

# -- Unicode classes as llama.cpp sees them -------------------------------------------------

# llama.cpp's white-space set (the Unicode White_Space property)
_WHITESPACE = frozenset(
    [0x09, 0x0A, 0x0B, 0x0C, 0x0D, 0x20, 0x85, 0xA0, 0x1680, *range(0x2000, 0x200B),
     0x2028, 0x2029, 0x202F, 0x205F, 0x3000]
)

# llama.cpp classifies code points by Unicode 15.1. Code points assigned in Unicode 15.0 and
# 15.1 that an older `unicodedata` reports as unassigned, by major category.
_UNICODE_15_ADDITIONS = (
    "0CF3M 0ECEM 2FFC-2FFFS 31EFS 10EFD-10EFFM 1123F-11240L 11241M 11B00-11B09P 11F00-11F01M "
    "11F02L 11F03M 11F04-11F10L 11F12-11F33L 11F34-11F3AM 11F3E-11F42M 11F43-11F4FP "
    "11F50-11F59N 1342FL 13439-1343FC 13440M 13441-13446L 13447-13455M 1B132L 1B155L "
    "1D2C0-1D2D3N 1DF25-1DF2AL 1E030-1E06DL 1E08FM 1E4D0-1E4EBL 1E4EC-1E4EFM 1E4F0-1E4F9N "
    "1F6DCS 1F774-1F776S 1F77B-1F77FS 1F7D9S 1FA75-1FA77S 1FA87-1FA88S 1FAAD-1FAAFS "
    "1FABB-1FABDS 1FABFS 1FACE-1FACFS 1FADA-1FADBS 1FAE8S 1FAF7-1FAF8S 2B739L 2EBF0-2EE5DL "
    "31350-323AFL"
)


def _parse_additions(spec: str) -> list[tuple[int, int, str]]:
    out = []
    for item in spec.split():
        cat = item[-1]
        lo, _, hi = item[:-1].partition("-")
        out.append((int(lo, 16), int(hi or lo, 16), cat))
    return out


_ADDITIONS = _parse_additions(_UNICODE_15_ADDITIONS)

# one byte per class in the collapsed text (llama.cpp's choice of bytes)
_CLS_OTHER, _CLS_NUMBER, _CLS_LETTER, _CLS_PUNCT, _CLS_MARK, _CLS_SYMBOL = (
    "\xd0", "\xd1", "\xd2", "\xd3", "\xd4", "\xd5")
_CLS_SPACE = "\x0b"
_CLASS_OF_CATEGORY = {"N": _CLS_NUMBER, "L": _CLS_LETTER, "P": _CLS_PUNCT,
                      "M": _CLS_MARK, "S": _CLS_SYMBOL}


def _major_category(cp: int) -> str:
    cat = unicodedata.category(chr(cp))
    if cat == "Cn":
        for lo, hi, c in _ADDITIONS:
            if lo <= cp <= hi:
                return c
    return cat[0]


class _Collapse(dict):
    """str.translate table: ASCII stays, any other code point becomes its class byte."""

    def __missing__(self, cp: int) -> str:
        if cp in _WHITESPACE:
            v = _CLS_SPACE
        else:
            v = _CLASS_OF_CATEGORY.get(_major_category(cp), _CLS_OTHER)
        self[cp] = v
        return v


_COLLAPSE = _Collapse({i: chr(i) for i in range(128)})


def _collapse(text: str) -> str:
    return text.translate(_COLLAPSE)


# Pre-tokenizer patterns over collapsed text. \p{L} -> [A-Za-z\xd2], \p{N} -> [0-9\xd1],
# \p{P} -> [\xd3 + ASCII punctuation]; \s (ASCII mode) covers the \x0b stand-in.
_L = "A-Za-z" + _CLS_LETTER
_N = "0-9" + _CLS_NUMBER
_P = _CLS_PUNCT + r"!-#%-*,-/:-;?-@\[-\]_\{\}"

_RE_GPT2 = rf"'s|'t|'re|'ve|'m|'ll|'d| ?[{_L}]+| ?[{_N}]+| ?[^\s{_L}{_N}]+|\s+(?!\S)|\s+"
_CONTRACTIONS_CI = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_RE_LLAMA3 = (rf"{_CONTRACTIONS_CI}|[^\r\n{_L}{_N}]?[{_L}]+|[{_N}]{{1,3}}"
              rf"| ?[^\s{_L}{_N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_RE_QWEN2 = (rf"{_CONTRACTIONS_CI}|[^\r\n{_L}{_N}]?[{_L}]+|[{_N}]"
             rf"| ?[^\s{_L}{_N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

_PRE_REGEXES = {
    "default": (rf"[{_P}\$\+<=>\^~\|]+", _RE_GPT2, rf"[{_N}]+", "[0-9][0-9][0-9]"),
    "gpt2": (_RE_GPT2,),
    "llama3": (_RE_LLAMA3,),
    "starcoder": (rf"[{_N}]", _RE_GPT2),
    "qwen2": (_RE_QWEN2,),
}

# tokenizer.ggml.pre -> (regex family, clean_spaces, ignore_merges, add_bos default)
_PRE_TYPES: dict[str, tuple[str, bool, bool, bool]] = {"default": ("default", True, False, False)}
for _name in ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0",
              "lfm2", "jina-v5-nano"):
    _PRE_TYPES[_name] = ("llama3", True, True, True)
for _name in ("dbrx", "smaug-bpe"):
    _PRE_TYPES[_name] = ("llama3", True, False, False)
for _name in ("gpt-2", "gpt2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es",
              "jina-v2-de", "a.x-4.0", "mellum", "modern-bert", "mpt", "olmo", "jais", "exaone4"):
    _PRE_TYPES[_name] = ("gpt2", True, False, False)
for _name in ("trillion", "granite-docling"):
    _PRE_TYPES[_name] = ("gpt2", False, False, False)
for _name in ("starcoder", "refact", "codeshell", "exaone", "minerva-7b", "mellum2"):
    _PRE_TYPES[_name] = ("starcoder", True, False, False)
for _name in ("smollm", "command-r"):
    _PRE_TYPES[_name] = ("starcoder", False, False, False)
for _name in ("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "hunyuan", "solar-open"):
    _PRE_TYPES[_name] = ("qwen2", False, False, False)
for _name in ("megrez", "stablelm2"):
    _PRE_TYPES[_name] = ("qwen2", True, False, False)
del _name

_COMPILED: dict[str, tuple[re.Pattern[str], ...]] = {}


def _patterns(family: str) -> tuple[re.Pattern[str], ...]:
    pats = _COMPILED.get(family)
    if pats is None:
        pats = tuple(re.compile(p, re.ASCII) for p in _PRE_REGEXES[family])
        _COMPILED[family] = pats
    return pats


def _pre_split(text: str, patterns: Sequence[re.Pattern[str]]) -> list[str]:
    """Words of `text`: each pattern cuts every current piece into its matches and the text
    between them (llama.cpp's unicode_regex_split, without the byte mapping)."""
    collapsed = _collapse(text)
    spans = [(0, len(text))]
    for pat in patterns:
        out = []
        for start, end in spans:
            prev = start
            for m in pat.finditer(collapsed[start:end]):
                a, b = m.span()
                a += start
                b += start
                if a > prev:
                    out.append((prev, a))
                if b > a:
                    out.append((a, b))
                prev = b
            if prev < end:
                out.append((prev, end))
        spans = out
    return [text[a:b] for a, b in spans]


# -- GPT-2 byte <-> printable character map --------------------------------------------------


def _byte_chars() -> list[str]:
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: chr(b) for b in printable}
    n = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + n)
            n += 1
    return [table[b] for b in range(256)]


_BYTE_TO_CHAR = _byte_chars()
_CHAR_TO_BYTE = {c: b for b, c in enumerate(_BYTE_TO_CHAR)}
# latin-1 char (one per byte) -> GPT-2 printable char, for str.translate
_LATIN1_TO_BPE = {b: c for b, c in enumerate(_BYTE_TO_CHAR)}


def _raw_byte_char(b: int) -> str:
    """How a one-byte token text reads after our reader's decode: ASCII as is, any other
    byte (invalid UTF-8 on its own) as its surrogateescape stand-in."""
    return chr(b) if b < 0x80 else chr(0xDC00 + b)


def _aslist(seq: Any) -> list:
    return seq.tolist() if hasattr(seq, "tolist") else list(seq)


def _text_bytes(s: str) -> bytes:
    return s.encode("utf-8", "surrogateescape")


def _utf8(s: str) -> bytes:
    """UTF-8 of user text; lone surrogates (a str that came from bad bytes) kept as bytes."""
    try:
        return s.encode("utf-8")
    except UnicodeEncodeError:
        return s.encode("utf-8", "surrogatepass")


class Tokenizer:
    """A GGUF vocabulary: encode text to ids and ids back to bytes / text like llama.cpp."""

    n_vocab: int
    bos_id: int | None
    eos_id: int | None
    eot_id: int | None
    eom_id: int | None
    unk_id: int | None
    pad_id: int | None
    add_bos: bool
    add_eos: bool

    def __init__(
        self,
        model: str,
        tokens: Sequence[str],
        *,
        token_types: Sequence[int] | None = None,
        scores: Sequence[float] | None = None,
        merges: Sequence[str] | None = None,
        pre: str | None = None,
        metadata: dict[str, Any] | None = None,
    ):
        meta = metadata or {}
        self.model = model
        if model == "llama":
            self.vocab_type = "spm"
            bos, eos, unk = 1, 2, 0
            add_bos, add_space_prefix, clean_spaces = True, True, False
            self.pre = "default"
        elif model == "gpt2":
            self.vocab_type = "bpe"
            if merges is None:
                raise UserError("tokenizer.ggml.model is 'gpt2' but tokenizer.ggml.merges is missing")
            self.pre = pre or "default"
            spec = _PRE_TYPES.get(self.pre)
            if spec is None:
                raise UserError(
                    f"unsupported pre-tokenizer tokenizer.ggml.pre = {self.pre!r} "
                    f"(supported: {', '.join(sorted(_PRE_TYPES))})"
                )
            family, clean_spaces, self._ignore_merges, add_bos = spec
            self._patterns = _patterns(family)
            bos, eos, unk = 11, 11, None
            add_space_prefix = False
        else:
            raise UserError(
                f"unsupported tokenizer model tokenizer.ggml.model = {model!r} "
                "(supported: 'llama' SentencePiece, 'gpt2' byte-level BPE)"
            )
        n = len(tokens)
        if n == 0:
            raise UserError("tokenizer.ggml.tokens is empty")
        self.n_vocab = n
        self.add_space_prefix = bool(meta.get(Keys.ADD_SPACE_PREFIX, add_space_prefix))
        self.clean_spaces = clean_spaces

        # texts, ids, scores, attributes
        texts = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(tokens)]
        self._texts = texts
        self._ids = {t: i for i, t in enumerate(texts)}
        if scores is not None and len(scores) < n:
            raise UserError(f"tokenizer.ggml.scores has {len(scores)} entries for {n} tokens")
        self._scores = [0.0] * n if scores is None else [float(s) for s in _aslist(scores)[:n]]
        if token_types is None:
            attrs = [ATTR_NORMAL] * n
        else:
            if len(token_types) < n:
                raise UserError(
                    f"tokenizer.ggml.token_type has {len(token_types)} entries for {n} tokens")
            attrs = [_TYPE_ATTR.get(int(t), ATTR_UNDEFINED) for t in _aslist(token_types)[:n]]
        self._attrs = attrs

        self._ranks: dict[tuple[str, str], int] = {}
        if merges is not None:
            # "left right", split at the first space after the first character; the first
            # of repeated merges ranks (a reversed comprehension: later ones are overwritten)
            cut = [m.find(" ", 1) for m in merges]
            self._ranks = {(m[:c], m[c + 1:]) if c >= 0 else ("", ""): i
                           for i, m, c in zip(range(len(cut) - 1, -1, -1), merges[::-1],
                                              cut[::-1])}

        # special ids: defaults, then metadata (out-of-range values ignored)
        def in_range(v: Any) -> bool:
            return v is not None and 0 <= int(v) < n

        def from_meta(key: str, default: int | None) -> int | None:
            default = default if in_range(default) else None
            v = meta.get(key)
            return int(v) if in_range(v) else default

        self.bos_id = from_meta(Keys.BOS_ID, bos)
        self.eos_id = from_meta(Keys.EOS_ID, eos)
        self.eot_id = from_meta(Keys.EOT_ID, None)
        self.eom_id = from_meta(Keys.EOM_ID, None)
        self.unk_id = from_meta(Keys.UNK_ID, unk)
        self.pad_id = from_meta(Keys.PAD_ID, None)
        fim = {k: from_meta(f"tokenizer.ggml.fim_{k}_token_id", None)
               for k in ("pre", "suf", "mid", "pad", "rep", "sep")}
        for k, old in (("pre", "prefix"), ("suf", "suffix"), ("mid", "middle")):
            fim[k] = from_meta(f"tokenizer.ggml.{old}_token_id", fim[k])
        self.add_bos = bool(meta.get(Keys.ADD_BOS, add_bos))
        self.add_eos = bool(meta.get(Keys.ADD_EOS, False))

        # Recognise end-of-turn and FIM markers by their text and make them control tokens.
        # (llama.cpp walks a hash map here, so which of several candidates wins is unspecified;
        # we take the lowest id.)
        def mark_control(i: int) -> None:
            attrs[i] |= ATTR_CONTROL

        # (only the ids of the marker texts are walked: a vocabulary has 50K-250K tokens)
        marked = [i for i, t in enumerate(texts) if t in _MARKER_TEXTS]
        for i in marked:
            t = texts[i]
            if self.eot_id is None and t in _EOT_TEXTS:
                self.eot_id = i
                mark_control(i)
            if self.eom_id is None and t in _EOM_TEXTS:
                self.eom_id = i
                mark_control(i)
            for k, names in _FIM_TEXTS.items():
                if fim[k] is None and t in names:
                    fim[k] = i
                    mark_control(i)
        self.fim_ids = fim

        eog = {fim[k] for k in ("pad", "rep", "sep") if fim[k] is not None}
        for i in marked:
            t = texts[i]
            if t in _EOG_TEXTS:
                eog.add(i)
                mark_control(i)
            if t in _ALWAYS_SHOWN:
                attrs[i] = ATTR_USER_DEFINED
        for extra in (self.eos_id, self.eot_id, self.eom_id):
            if extra is not None:
                eog.add(extra)
        eog_text = {texts[i]: i for i in sorted(eog)}
        if "<|end|>" in eog_text and (
            ("<|return|>" in eog_text and "<|call|>" in eog_text)
            or ("<|calls|>" in eog_text and "<|flush|>" in eog_text)
        ):
            end = eog_text["<|end|>"]
            eog.discard(end)
            attrs[end] = ATTR_USER_DEFINED
        if "</s>" in eog_text and ("<|tool_response>" in eog_text or "<|plamo:eos|>" in eog_text):
            s = eog_text["</s>"]
            eog.discard(s)
            attrs[s] = ATTR_NORMAL
        self._eog = frozenset(eog)

        # special tokens cut out of the text before tokenizing, longest (in bytes) first
        special = [i for i in range(n) if attrs[i] & _SPECIAL_ATTRS]
        special.sort(key=lambda i: -len(_text_bytes(texts[i])))
        self._special = special

        self._pieces: list[bytes | None] = [None] * n  # token_to_piece(special=True), lazily

        name = str(meta.get(Keys.NAME, "") or "").lower()
        if "phi-3" in name or "phi3" in name:
            for i in special:
                attrs[i] |= ATTR_RSTRIP
            for t, on in (("</s>", True), ("<unk>", False), ("<s>", False),
                          ("<|endoftext|>", False)):
                i = self._ids.get(t)
                if i is not None:
                    attrs[i] = attrs[i] | ATTR_RSTRIP if on else attrs[i] & ~ATTR_RSTRIP

        self._bpe_cache: dict[str, tuple[int, ...]] = {}

    # -- construction ----------------------------------------------------------------------

    @classmethod
    def from_gguf(cls, reader: Any) -> Tokenizer:
        """The tokenizer of a GGUF file: a `GGUFReader`, or a path to open."""
        if isinstance(reader, (str, os.PathLike)):
            from ..gguf import GGUFReader

            with GGUFReader(reader) as r:
                return cls.from_gguf(r)
        where = getattr(reader, "path", "GGUF file")
        model = reader.get(Keys.TOKENIZER_MODEL)
        if model is None:
            raise UserError(f"{where}: no tokenizer in this file (no {Keys.TOKENIZER_MODEL})")
        tokens = reader.get(Keys.TOKENS)
        if tokens is None:
            raise UserError(f"{where}: no vocabulary in this file (no {Keys.TOKENS})")
        if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
            raise UserError(f"{where}: {Keys.TOKENS} is not an array of strings")
        merges = reader.get(Keys.MERGES)
        if merges is not None and (
                not isinstance(merges, list) or not all(isinstance(m, str) for m in merges)):
            raise UserError(f"{where}: {Keys.MERGES} is not an array of strings")
        meta = {
            k: reader.get(k)
            for k in (Keys.BOS_ID, Keys.EOS_ID, Keys.EOT_ID, Keys.EOM_ID, Keys.UNK_ID,
                      Keys.PAD_ID, Keys.ADD_BOS, Keys.ADD_EOS, Keys.ADD_SPACE_PREFIX, Keys.NAME,
                      "tokenizer.ggml.fim_pre_token_id", "tokenizer.ggml.fim_suf_token_id",
                      "tokenizer.ggml.fim_mid_token_id", "tokenizer.ggml.fim_pad_token_id",
                      "tokenizer.ggml.fim_rep_token_id", "tokenizer.ggml.fim_sep_token_id",
                      "tokenizer.ggml.prefix_token_id", "tokenizer.ggml.suffix_token_id",
                      "tokenizer.ggml.middle_token_id")
        }
        try:
            return cls(
                str(model),
                tokens,
                token_types=reader.get(Keys.TOKEN_TYPE),
                scores=reader.get(Keys.SCORES),
                merges=merges,
                pre=reader.get(Keys.TOKENIZER_PRE),
                metadata={k: v for k, v in meta.items() if v is not None},
            )
        except UserError as e:
            raise UserError(f"{where}: {e}") from None

    # -- queries ---------------------------------------------------------------------------

    def token_text(self, token: int) -> str:
        """The vocabulary entry as stored (e.g. 'Ġthe', '▁the', '<0x0A>')."""
        return self._texts[token]

    def token_attr(self, token: int) -> int:
        return self._attrs[token]

    def is_control(self, token: int) -> bool:
        return bool(self._attrs[token] & ATTR_CONTROL)

    def is_eog(self, token: int) -> bool:
        """End of generation: eos, eot, eom and the other end markers llama.cpp knows."""
        return token in self._eog

    @property
    def eog_ids(self) -> frozenset[int]:
        return self._eog

    def token_id(self, text: str) -> int | None:
        return self._ids.get(text)

    # -- encoding --------------------------------------------------------------------------

    def encode(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        """Token ids of `text` (llama_tokenize). `add_special`: BOS/EOS as the model asks;
        `parse_special`: control-token texts in `text` become those tokens."""
        out: list[int] = []
        frags = self._partition(text, parse_special) if text else []
        if self.vocab_type == "spm":
            if add_special and self.add_bos:
                out.append(self._need(self.bos_id, "BOS"))
            prev_special = True
            for frag in frags:
                if isinstance(frag, int):
                    out.append(frag)
                    prev_special = True
                    continue
                if self.add_space_prefix and prev_special:
                    frag = " " + frag
                self._spm(frag.replace(" ", _SPM_SPACE), out)
                prev_special = False
        else:
            if add_special and self.add_bos:
                out.append(self._need(self.bos_id, "BOS"))
            for frag in frags:
                if isinstance(frag, int):
                    out.append(frag)
                else:
                    self._bpe(frag, out)
        if add_special and self.add_eos:
            out.append(self._need(self.eos_id, "EOS"))
        return out

    @staticmethod
    def _need(token: int | None, what: str) -> int:
        if token is None:
            raise UserError(f"the model asks for a {what} token but its vocabulary has none")
        return token

    def _partition(self, text: str, parse_special: bool) -> list[str | int]:
        """Cut special-token texts out of `text`: a list of raw strings and token ids."""
        frags: list[str | int] = [text]
        attrs, texts = self._attrs, self._texts
        for tid in self._special:
            attr = attrs[tid]
            if not parse_special and attr & _HIDDEN_ATTRS:
                continue
            st = texts[tid]
            if st not in text:
                continue
            new: list[str | int] = []
            for frag in frags:
                if isinstance(frag, int) or st not in frag:
                    new.append(frag)
                    continue
                pos = 0
                while True:
                    m = frag.find(st, pos)
                    if m < 0:
                        break
                    left = frag[pos:m]
                    if attr & ATTR_LSTRIP:
                        left = left.rstrip(_C_SPACES)
                    if left:
                        new.append(left)
                    new.append(tid)
                    pos = m + len(st)
                    if attr & ATTR_RSTRIP:
                        while pos < len(frag) and frag[pos] in _C_SPACES:
                            pos += 1
                if pos < len(frag):
                    new.append(frag[pos:])
            frags = new
        return frags

    def _byte_token(self, b: int) -> int | None:
        """SentencePiece byte fallback: <0xXX>, else a token that is the byte itself."""
        tid = self._ids.get(f"<0x{b:02X}>")
        if tid is None:
            tid = self._ids.get(_raw_byte_char(b))
        return tid

    def _spm(self, text: str, out: list[int]) -> None:
        """SentencePiece over one escaped text run: merge the best-scoring adjacent pair that
        is a vocabulary entry until none is left (ties: leftmost)."""
        n = len(text)
        if n == 0:
            return
        ids, scores = self._ids, self._scores

        def rank(left: str, right: str) -> float | None:  # best score first
            tid = ids.get(left + right)
            return None if tid is None else -scores[tid]

        syms = list(text)
        nxt = merge_pairs(syms, rank)
        i = 0
        while i != -1:
            s = syms[i]
            tid = ids.get(s)
            if tid is not None:
                out.append(tid)
            else:
                for byte in _utf8(s):
                    bt = self._byte_token(byte)
                    if bt is None:
                        bt = self.unk_id  # llama.cpp fails here; a vocabulary without bytes
                    if bt is not None:
                        out.append(bt)
            i = nxt[i]

    def _bpe(self, text: str, out: list[int]) -> None:
        cache = self._bpe_cache
        for word in _pre_split(text, self._patterns):
            ids = cache.get(word)
            if ids is None:
                ids = self._bpe_word(_utf8(word).decode("latin-1").translate(_LATIN1_TO_BPE))
                if len(cache) < 200_000:
                    cache[word] = ids
            out.extend(ids)

    def _bpe_word(self, word: str) -> tuple[int, ...]:
        """Byte-level BPE of one pre-tokenized word (already mapped to printable chars):
        apply the lowest-rank merge first (ties: leftmost) until no pair has a rank."""
        ids = self._ids
        if self._ignore_merges:
            tid = ids.get(word)
            if tid is not None:
                return (tid,)
        syms = list(word)
        ranks = self._ranks
        merge_pairs(syms, lambda left, right: ranks.get((left, right)))
        res = []
        for s in syms:
            if not s:
                continue
            tid = ids.get(s)
            if tid is not None:
                res.append(tid)
                continue
            for byte in _utf8(s):  # no such token: single-byte tokens where they exist
                bt = ids.get(_raw_byte_char(byte))
                if bt is not None:
                    res.append(bt)
        return tuple(res)

    # -- decoding --------------------------------------------------------------------------

    def _piece(self, token: int) -> bytes:
        p = self._pieces[token]
        if p is None:
            text = self._texts[token]
            attr = self._attrs[token]
            if attr & _SPECIAL_ATTRS:
                p = _text_bytes(text)
            elif attr & ATTR_NORMAL:
                if self.vocab_type == "spm":
                    p = _text_bytes(text.replace(_SPM_SPACE, " "))
                else:
                    p = self._bpe_decode(text)
            elif attr & ATTR_BYTE:
                p = bytes([int(text[3:5], 16)])
            else:
                p = b""
            self._pieces[token] = p
        return p

    @staticmethod
    def _bpe_decode(text: str) -> bytes:
        out = bytearray()
        for ch in text:
            b = _CHAR_TO_BYTE.get(ch)
            if b is not None:
                out.append(b)
            else:  # not a byte-level character: llama.cpp writes a marker
                out += b"[UNK_BYTE_0x" + _text_bytes(ch).hex().encode() + _text_bytes(text) + b"]"
        return bytes(out)

    def token_to_piece(self, token: int, special: bool = False) -> bytes:
        """The bytes of one token (may be part of a UTF-8 character). Control and unknown
        tokens give b'' unless `special`."""
        if not 0 <= token < self.n_vocab:
            raise ValueError(f"token id {token} out of range (vocabulary has {self.n_vocab})")
        if not special and self._attrs[token] & _HIDDEN_ATTRS:
            return b""
        return self._piece(token)

    def decode_bytes(self, tokens: Iterable[int], special: bool = False) -> bytes:
        """llama_detokenize(remove_special=False, unparse_special=special), as bytes."""
        buf = bytearray()
        first = True
        for t in tokens:
            p = self.token_to_piece(int(t), special)
            if first and self.add_space_prefix and p[:1] == b" ":
                p = p[1:]  # the space SentencePiece put in front of the text
            first = False
            buf += p
        if self.clean_spaces:
            buf = _clean_spaces(buf)
        return bytes(buf)

    def decode(self, tokens: Iterable[int], special: bool = False) -> str:
        """Text of `tokens` (llama.cpp's detokenize; invalid UTF-8 becomes U+FFFD)."""
        return self.decode_bytes(tokens, special).decode("utf-8", "replace")


def _clean_spaces(text: bytearray) -> bytearray:
    """llama.cpp's clean-up of tokenizer spaces: ' ?' ' !' ' .' ' ,' lose the space,
    " ' " becomes "'", and " 's" " 'm" " 're" " 've" lose the space."""
    t = text
    n = len(t)
    # pass 1: space before ? ! . ,
    total = 1 if n else 0
    for i in range(1, n):
        x = t[i]
        if t[i - 1] == 0x20 and x in b"?!.,":
            total -= 1
        t[total] = x
        total += 1
    # pass 2: a lone apostrophe between spaces
    n = total
    total = 1 if n else 0
    i = 1
    while i < n:
        x = t[i]
        if x == 0x27 and i + 1 < n and t[i - 1] == 0x20 and t[i + 1] == 0x20:
            total -= 1
            i += 1
            t[i] = 0
        t[total] = x
        total += 1
        i += 1
    # pass 3: contractions
    n = total
    total = 1 if n else 0
    for i in range(1, n):
        x = t[i]
        if t[i - 1] == 0x20 and x == 0x27 and i + 1 < n:
            x1 = t[i + 1]
            if x1 in b"sm":
                total -= 1
            elif x1 not in b"td" and i + 2 < n:
                x2 = t[i + 2]
                if (x1, x2) in ((0x72, 0x65), (0x76, 0x65)):  # 're 've
                    total -= 1
        t[total] = x
        total += 1
    del t[total:]
    return t


class StreamDecoder:
    """Text of tokens as they arrive: each push returns what became valid UTF-8, holding back
    a character whose bytes are not all there yet (invalid bytes become U+FFFD)."""

    def __init__(self, tok: Tokenizer, special: bool = False):
        self.tok = tok
        self.special = special
        self._dec = codecs.getincrementaldecoder("utf-8")("replace")

    def push(self, token: int) -> str:
        return self._dec.decode(self.tok.token_to_piece(token, self.special))

    def flush(self) -> str:
        out = self._dec.decode(b"", final=True)
        self._dec.reset()
        return out


def merge_pairs(syms: list[str], rank: Callable[[str, str], float | None]) -> list[int]:
    """The merge loop of both SentencePiece and BPE: join the adjacent pair of symbols with
    the lowest rank (ties: leftmost) until no pair has one. `syms` is changed in place (a
    merged-away symbol becomes ""); returns each symbol's next one (-1: the last)."""
    n = len(syms)
    nxt = [*range(1, n), -1] if n else []
    prv = list(range(-1, n - 1))
    heap = []
    for i in range(n - 1):
        r = rank(syms[i], syms[i + 1])
        if r is not None:
            heap.append((r, i, i + 1, syms[i] + syms[i + 1]))
    heapq.heapify(heap)
    pop, push = heapq.heappop, heapq.heappush
    while heap:
        _, left, right, text = pop(heap)
        a, b = syms[left], syms[right]
        if not a or not b or a + b != text:
            continue  # one side changed since this pair was queued
        syms[left] = text
        syms[right] = ""
        after = nxt[right]
        nxt[left] = after
        if after >= 0:
            prv[after] = left
        before = prv[left]
        if before >= 0:
            r = rank(syms[before], text)
            if r is not None:
                push(heap, (r, before, left, syms[before] + text))
        if after >= 0:
            r = rank(text, syms[after])
            if r is not None:
                push(heap, (r, left, after, text + syms[after]))
    return nxt
