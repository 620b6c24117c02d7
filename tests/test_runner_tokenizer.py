"""Tokenizer against llama.cpp: its own vocab test vectors, and llama-cpp-python (vocab-only
loads) as the oracle for encode / token_to_piece / llama_detokenize on varied text."""

from __future__ import annotations

import ctypes
import random
import time

import pytest

from gguflab.errors import UserError
from gguflab.gguf import GGUFReader, write_gguf
from gguflab.gguf.constants import ValueType
from gguflab.gguf.reader import Value
from gguflab.runner.tokenizer import StreamDecoder, Tokenizer

VOCABS = ["ggml-vocab-gpt-2.gguf", "ggml-vocab-llama-spm.gguf"]
# llama.cpp's vocab tests that ship in its tree (unpacked by `make test` beside the
# converter): the pre-tokenizers of the families people quantize today
ORACLE_VOCABS = ["ggml-vocab-llama-bpe.gguf", "ggml-vocab-qwen2.gguf", "ggml-vocab-phi-3.gguf",
                 "ggml-vocab-command-r.gguf", "ggml-vocab-starcoder.gguf",
                 "ggml-vocab-refact.gguf", "ggml-vocab-mpt.gguf"]
SEP = "\n__ggml_vocab_test__\n"


def read_vocab_tests(path) -> list[tuple[str, list[int]]]:
    """llama.cpp's test-tokenizer-0 reading: strings split on SEP (the last one ends at the
    final SEP), one line of ids per string."""
    raw = path.with_name(path.name + ".inp").read_bytes().decode("utf-8")
    strings, pos = [], 0
    while pos < len(raw):
        nxt = raw.find(SEP, pos)
        if nxt < 0:
            strings.append(raw[pos:])
            break
        strings.append(raw[pos:nxt])
        pos = nxt + len(SEP)
    lines = path.with_name(path.name + ".out").read_text().split("\n")
    assert len(lines) >= len(strings)
    return [(s, [int(x) for x in line.split()]) for s, line in zip(strings, lines)]


@pytest.fixture(scope="module", params=VOCABS + ORACLE_VOCABS)
def vocab_path(request, fixtures):
    if request.param in VOCABS:
        return fixtures / "vocab" / request.param
    from llama_converter import llama_cpp_src

    return llama_cpp_src() / "models" / request.param


_TOKS: dict[str, Tokenizer] = {}


def load(path) -> Tokenizer:
    key = str(path)
    if key not in _TOKS:
        _TOKS[key] = Tokenizer.from_gguf(GGUFReader(path))
    return _TOKS[key]


# -- llama.cpp's vocab tests ----------------------------------------------------------------


def test_vocab_fixture_ids(vocab_path):
    tok = load(vocab_path)
    tests = read_vocab_tests(vocab_path)
    assert len(tests) == 46
    bad = [(s, tok.encode(s, add_special=False), ids) for s, ids in tests
           if tok.encode(s, add_special=False) != ids]
    assert not bad


def test_vocab_fixture_roundtrip(vocab_path):
    tok = load(vocab_path)
    if vocab_path.name in ORACLE_VOCABS:  # decoded as llama.cpp decodes it (llama_detokenize)
        oracle = Oracle(pytest.importorskip("llama_cpp"), vocab_path)
        for _, ids in read_vocab_tests(vocab_path):
            assert tok.decode(ids).encode() == oracle.detokenize(ids, False), ids
        return
    for s, ids in read_vocab_tests(vocab_path):
        text = tok.decode(ids)
        if tok.vocab_type == "spm":
            assert text == s  # the space put in front by encode is dropped again
        else:  # gpt-2 cleans up tokenizer spaces (" ?" -> "?"), as llama.cpp does
            assert text == s.replace(" ?", "?")


# -- llama-cpp-python as the oracle ---------------------------------------------------------

TEXTS = [
    "Hello world", " Hello world", "Hello World!", "  leading", "trailing  ", "tabs\tand\nnewlines\r\n\n",
    "1234567 and 3.14159, 42 1000000", "def f(x):\n    return x**2  # square\n\n\tpass",
    "I'm you're we've they'll it's He'd 'S 'LL 'Re", "héllo wörld ñ naïve", "日本語のテキスト 中文字符",
    "emoji 🦙🔥👍🏽 🩷 🫨 👩‍👩‍👧", "a  b   c    d", "\u00a0nbsp\u2003em\u3000ideographic",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n"
    "<|im_start|>assistant\n", "<s>hi</s> <unk>", "<|endoftext|>x<|endoftext|>", "a<|im_end|>b",
    "<fim_prefix>code<fim_suffix><reponame>", "Führer", "   ", "\n", "", "?!.,",
    "word ' word", "hello 's 're 've 'm 't 'd 'll", "x . y , z ? w !", "ied 4 ½ months",
    "ﬁ ligature Å Ω ℕ ⅷ ①", "\x00\x01\x1c\x1f ctrl", "مرحبا بالعالم", "Привет, мир!",
    "e\u0301 combining\u0308", "   \n\n   \t x", "__init__(self) -> None: ...", "$100 + 5% = <x>",
]


def _random_texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    pools = [range(0x20, 0x7F), range(0xA0, 0x250), range(0x370, 0x500), range(0x3040, 0x30FF),
             range(0x4E00, 0x4F00), range(0x1F300, 0x1FAFF), [0x20, 0x20, 0x0A, 0x09, 0x27, 0x0D],
             range(0x2000, 0x2070), range(0xE000, 0xE010), list(map(ord, "0123456789'sStTmMlL.,?! "))]
    out = ["".join(chr(rng.choice(rng.choice(pools))) for _ in range(rng.randint(1, 30)))
           for _ in range(n)]
    words = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<s>", "</s>", "<unk>", " ", "'s",
             "123", "\n", "ab", "X", "é", "🙂", "  "]
    out += ["".join(rng.choice(words) for _ in range(rng.randint(1, 10))) for _ in range(n // 3)]
    return out


@pytest.fixture(scope="module")
def llama_cpp():
    return pytest.importorskip("llama_cpp")


class Oracle:
    def __init__(self, llama_cpp, path):
        self.lc = llama_cpp
        self.llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
        self.vocab = llama_cpp.llama_model_get_vocab(self.llm.model)

    def tokenize(self, text: str, add_special: bool, parse_special: bool) -> list[int]:
        return self.llm.tokenize(text.encode(), add_bos=add_special, special=parse_special)

    def detokenize(self, ids: list[int], special: bool) -> bytes:
        """llama_detokenize(remove_special=False), what llama.cpp's own tools use."""
        arr = (self.lc.llama_token * max(1, len(ids)))(*ids)
        size = 64 + 8 * len(ids)
        while True:
            buf = ctypes.create_string_buffer(size)
            n = self.lc.llama_detokenize(self.vocab, arr, len(ids), buf, size, False, special)
            if n >= 0:
                return buf.raw[:n]
            size = -n

    def piece(self, token: int, special: bool) -> bytes:
        buf = ctypes.create_string_buffer(512)
        n = self.lc.llama_token_to_piece(self.vocab, token, buf, 512, 0, special)
        return buf.raw[:n]


def compare(tok: Tokenizer, oracle: Oracle, texts: list[str]) -> list:
    bad = []
    for s in texts:
        for add in (False, True):
            for parse in (False, True):
                want = oracle.tokenize(s, add, parse)
                got = tok.encode(s, add_special=add, parse_special=parse)
                if got != want:
                    bad.append(("encode", s, add, parse, got, want))
                    continue
                for special in (False, True):
                    if tok.decode_bytes(want, special) != oracle.detokenize(want, special):
                        bad.append(("decode", s, special))
    return bad


def _oracle_paths(fixtures, smollm2):
    return {"smollm2": smollm2, **{v: fixtures / "vocab" / v for v in VOCABS}}


@pytest.mark.parametrize("which", ["smollm2", *VOCABS])
def test_against_llama_cpp(which, fixtures, smollm2, llama_cpp):
    path = _oracle_paths(fixtures, smollm2)[which]
    tok, oracle = load(path), Oracle(llama_cpp, path)
    assert compare(tok, oracle, TEXTS + _random_texts(120, seed=len(which))) == []

    v, lc = oracle.vocab, llama_cpp
    assert tok.n_vocab == lc.llama_vocab_n_tokens(v)
    assert (tok.bos_id, tok.eos_id, tok.add_bos, tok.add_eos) == (
        lc.llama_vocab_bos(v), lc.llama_vocab_eos(v),
        lc.llama_vocab_get_add_bos(v), lc.llama_vocab_get_add_eos(v))
    eot = lc.llama_vocab_eot(v)
    assert tok.eot_id == (None if eot < 0 else eot)
    assert sorted(tok.eog_ids) == [i for i in range(tok.n_vocab) if lc.llama_vocab_is_eog(v, i)]
    assert all(tok.is_eog(i) for i in tok.eog_ids)


@pytest.mark.parametrize("which", ["smollm2", *VOCABS])
def test_pieces_against_llama_cpp(which, fixtures, smollm2, llama_cpp):
    path = _oracle_paths(fixtures, smollm2)[which]
    tok, oracle = load(path), Oracle(llama_cpp, path)
    ids = range(0, tok.n_vocab, 7) if tok.n_vocab > 40000 else range(tok.n_vocab)
    for special in (False, True):
        assert [tok.token_to_piece(i, special) for i in ids] == [
            oracle.piece(i, special) for i in ids]
    # llama-cpp-python's own detokenize: pieces joined, a space after BOS dropped
    for s in TEXTS[:20]:
        ids = oracle.tokenize(s, True, True)
        joined = b"".join(tok.token_to_piece(i) for i in ids)
        if ids and ids[0] == tok.bos_id and joined[:1] == b" ":
            joined = joined[1:]
        assert joined == oracle.llm.detokenize(ids)


def test_smollm2_examples(smollm2):
    tok = load(smollm2)
    assert tok.vocab_type == "bpe" and tok.pre == "smollm"
    chat = "<|im_start|>user\nHi<|im_end|>\n"
    ids = tok.encode(chat, add_special=True, parse_special=True)
    assert ids[0] == 1 and 2 in ids  # <|im_start|> ... <|im_end|> as single tokens
    assert 1 not in tok.encode(chat, parse_special=False)
    assert tok.decode(ids) == "user\nHi\n"
    assert tok.decode(ids, special=True) == chat
    assert tok.encode("1234567", add_special=False) == [
        tok.token_id(c) for c in "1234567"]  # smollm isolates every digit
    assert tok.is_eog(tok.eos_id) and tok.is_eog(tok.token_id("<|im_end|>"))
    assert not tok.is_eog(tok.token_id("<|im_start|>"))


# -- other pre-tokenizers: the gpt-2 vocabulary relabelled, llama.cpp on the same file -------

PRES = ["llama-bpe", "qwen2", "default", "smollm", "stablelm2", "olmo"]


def _relabel(src, dst, pre: str) -> None:
    meta = dict(GGUFReader(src).metadata)
    meta["tokenizer.ggml.pre"] = Value(ValueType.STRING, pre)
    write_gguf(dst, meta, [], overwrite=True)


@pytest.mark.parametrize("pre", PRES)
def test_pre_tokenizers_against_llama_cpp(pre, fixtures, tmp_path, llama_cpp):
    path = tmp_path / f"gpt2-{pre}.gguf"
    _relabel(fixtures / "vocab" / "ggml-vocab-gpt-2.gguf", path, pre)
    tok, oracle = Tokenizer.from_gguf(path), Oracle(llama_cpp, path)
    assert tok.pre == pre
    rng = random.Random(pre)
    alphabet = list(" \t\n\r'sStTrReEvVmMlLdD0123456789.,!?-_()[]$+<=>^~|`\"éÅ½①\u00a0"
                    "\u2003\u3000\u0301中🙂\x0b\x0c\x1c\x85")
    fuzz = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 25))) for _ in range(150)]
    assert compare(tok, oracle, TEXTS + fuzz) == []


# -- streaming ------------------------------------------------------------------------------

STREAM_TEXT = "Café naïve 日本語 🦙🔥 👩‍👩‍👧 ½ — done."


@pytest.mark.parametrize("which", ["smollm2", *VOCABS])
def test_stream_decoder(which, fixtures, smollm2):
    tok = load(_oracle_paths(fixtures, smollm2)[which])
    ids = tok.encode(STREAM_TEXT, add_special=False)
    dec = StreamDecoder(tok)
    parts = [dec.push(i) for i in ids] + [dec.flush()]
    assert "" in parts[:-1]  # some character's bytes came in more than one token
    assert not any("\ufffd" in p for p in parts)
    whole = b"".join(tok.token_to_piece(i) for i in ids).decode("utf-8")
    assert "".join(parts) == whole
    assert whole.lstrip(" ") == STREAM_TEXT  # SentencePiece puts one space in front


def test_stream_decoder_invalid_bytes(fixtures):
    tok = load(fixtures / "vocab" / "ggml-vocab-llama-spm.gguf")
    byte = {b: tok.token_id(f"<0x{b:02X}>") for b in (0xE6, 0x97, 0x41)}
    dec = StreamDecoder(tok)
    assert dec.push(byte[0xE6]) == "" and dec.push(byte[0x97]) == ""
    assert dec.push(byte[0x41]) == "\ufffdA"  # a broken sequence, then 'A'
    assert dec.push(byte[0xE6]) == "" and dec.flush() == "\ufffd"


# -- errors ---------------------------------------------------------------------------------


def test_no_tokenizer_is_user_error(tmp_path):
    path = tmp_path / "bare.gguf"
    write_gguf(path, {"general.architecture": "llama"}, [])
    with pytest.raises(UserError, match="tokenizer"):
        Tokenizer.from_gguf(GGUFReader(path))


def test_unsupported_model_and_pre(tmp_path):
    path = tmp_path / "bert.gguf"
    write_gguf(path, {"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["a", "b"]}, [])
    with pytest.raises(UserError, match="'bert'"):
        Tokenizer.from_gguf(path)
    path = tmp_path / "pre.gguf"
    write_gguf(path, {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "klingon",
                      "tokenizer.ggml.tokens": ["a", "b", "ab"],
                      "tokenizer.ggml.merges": ["a b"]}, [])
    with pytest.raises(UserError, match="'klingon'"):
        Tokenizer.from_gguf(path)
    path = tmp_path / "nomerges.gguf"
    write_gguf(path, {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a"]}, [])
    with pytest.raises(UserError, match="merges"):
        Tokenizer.from_gguf(path)


def test_token_out_of_range(smollm2):
    tok = load(smollm2)
    with pytest.raises(ValueError):
        tok.token_to_piece(tok.n_vocab)


# -- speed ----------------------------------------------------------------------------------


def _english(n_bytes: int) -> str:
    rng = random.Random(0)
    words = ("the of and to in is was for that with as on by at from his her it an were which "
             "are this be or had not but have they one all their there been has when who will "
             "more no if out so said what up its about into than them can only other new some "
             "could time these two may then do first any my now such like our over man me even "
             "most made after also did many before must through back years where much your way "
             "well down should because each just those people Mr how too little state good very "
             "make world still own see men work long get here between both life being under never "
             "day same another know while last might us great old year off come since against go "
             "came right used take three").split()
    out, size = [], 0
    while size < n_bytes:
        sent = " ".join(rng.choice(words) for _ in range(rng.randint(5, 20)))
        sent = sent[0].upper() + sent[1:] + rng.choice([".", ".", "?", "!", ";", ","]) + " "
        if rng.random() < 0.1:
            sent += f"{rng.randint(1, 10**6)} "
        if rng.random() < 0.05:
            sent += "\n\n"
        out.append(sent)
        size += len(sent)
    return "".join(out)[:n_bytes]


@pytest.mark.parametrize("which", ["smollm2", "ggml-vocab-llama-spm.gguf"])
def test_encode_100kb_is_fast(which, fixtures, smollm2):
    tok = Tokenizer.from_gguf(_oracle_paths(fixtures, smollm2)[which])  # cold caches
    text = _english(100_000)
    t0 = time.perf_counter()
    ids = tok.encode(text, add_special=False)
    elapsed = time.perf_counter() - t0
    assert tok.decode(ids) == text
    assert elapsed < 20, f"{elapsed:.1f} s for 100 KB"
