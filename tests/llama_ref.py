"""llama.cpp (llama-cpp-python) as the runner's oracle, compared so that float noise cannot
flip a test (see agreement.py).

- `reference(path, prompt, n)`: llama.cpp's greedy continuation and the logits that chose
  each of its tokens, decoding one token at a time as a chat does; and its own spread: the
  same tokens decoded again with flash attention on, which changes only the float order.
- `decode_logits(model, ids, n_prompt)`: ours on the same tokens, the same way.

How far ours may be from llama.cpp is stated in units of that spread (LLAMA_SPREADS), for
all logits and for the gaps that decide each greedy token.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from agreement import assert_same_top1_where_clear, decided, gap_change, margins

# Ours may sit up to this many times as far from llama.cpp as llama.cpp sits from itself
# when only its float order changes. Measured on SmolLM2 (2026-12-01, 3 prompts x 32
# tokens, decode path): ours / llama.cpp's spread was 0.5-0.9 on F32 weights and 0.9-1.2 on
# Q4_1, both over all logits and over the deciding gaps. Quantized weights spread far more
# (1.5 logits, against 0.03 for F32): both sides round activations to 8 bits, and a value
# within float noise of a rounding boundary lands one level apart.
LLAMA_SPREADS = 2.0


def _llama(path, n_ctx: int, flash_attn: bool = False):
    llama_cpp = pytest.importorskip("llama_cpp")
    return llama_cpp.Llama(str(path), n_ctx=n_ctx, logits_all=True, verbose=False,
                           n_threads=2, flash_attn=flash_attn)


@dataclass
class Reference:
    ids: list[int]  # the prompt, then llama.cpp's greedy continuation
    n_prompt: int
    logits: np.ndarray  # (n, n_vocab): the decode logits that chose each continuation token
    spread: float  # max |logit change| with flash attention on (same tokens, decoding)
    gap_spread: float  # the same for the gaps that decide each top-1 (agreement.gap_change)
    pieces: list[bytes]  # each continuation token's text, as llama.cpp detokenizes it

    @property
    def tokens(self) -> list[int]:
        return self.ids[self.n_prompt:]

    @property
    def noise(self) -> float:
        """The bound on |ours - llama.cpp| at any logit."""
        return LLAMA_SPREADS * self.spread

    @property
    def gap_noise(self) -> float:
        """The bound on how far ours moves a deciding gap: closer calls are near-ties."""
        return LLAMA_SPREADS * self.gap_spread

    def text(self, n: int | None = None) -> str:
        """The first `n` continuation tokens as text (a cut UTF-8 character left out)."""
        return b"".join(self.pieces[:n]).decode("utf-8", "ignore")

    def assert_agrees(self, ours_logits: np.ndarray, ours_text: str | None = None) -> int:
        """Our decode logits on the same tokens are within `noise` of llama.cpp's, pick the
        same token wherever llama.cpp's margin is above `gap_noise`, and our greedy text
        (if given) is llama.cpp's up to the first near-tie. Returns the tokens decided."""
        diff = float(np.abs(ours_logits - self.logits).max())
        assert diff <= self.noise, f"logits {diff:.3g} from llama.cpp's, bound {self.noise:.3g}"
        clear = np.flatnonzero(margins(self.logits) > self.gap_noise)
        picks = ours_logits.argmax(-1)
        assert (picks[clear] == np.asarray(self.tokens)[clear]).all(), "top-1 differs"
        n = decided(self.logits, self.gap_noise)
        if ours_text is not None:
            assert ours_text.startswith(self.text(n)), (ours_text, self.text(n), n)
        return n


def _decode(m, ids: list[int], n_prompt: int) -> np.ndarray:
    m.eval(ids[:n_prompt])
    for t in ids[n_prompt:-1]:
        m.eval([t])
    return np.array(m.scores[n_prompt - 1:len(ids) - 1], np.float64)


def reference(path, prompt: list[int], n_predict: int, n_ctx: int = 256) -> Reference:
    """llama.cpp's greedy continuation of `prompt` (stops at end of generation)."""
    ref = _llama(path, n_ctx)
    toks: list[int] = []
    for t in ref.generate(prompt, temp=0, top_k=1):
        if t == ref.token_eos() or len(toks) == n_predict:
            break
        toks.append(t)
    n0, ids = len(prompt), list(prompt) + toks
    # with logits_all, each evaluated position keeps its logits: the prompt's last row
    # chose the first token, each decode step the next
    logits = np.array(ref.scores[n0 - 1:n0 - 1 + len(toks)], np.float64)
    fa = _decode(_llama(path, n_ctx, flash_attn=True), ids, n0) if toks else logits
    spread = float(np.abs(fa - logits).max()) if toks else 0.0
    return Reference(ids, n0, logits, spread, gap_change(logits, fa),
                     [ref.detokenize([t]) for t in toks])


def decode_logits(model, ids: list[int], n_prompt: int, n_ctx: int = 256) -> np.ndarray:
    """Our logits that choose each token after the prompt, computed as generation computes
    them: the prompt as one batch, then one token at a time (teacher-forced)."""
    cache = model.new_cache(n_ctx)
    rows = [model.forward(ids[:n_prompt], cache)]
    rows += [model.forward([t], cache) for t in ids[n_prompt:-1]]
    return np.array(rows, np.float64)


def llama_logits(path, tokens: list[int], n_ctx: int = 64, flash_attn: bool = False
                 ) -> np.ndarray:
    """llama.cpp's logits at every position of `tokens`, evaluated as one batch."""
    m = _llama(path, n_ctx, flash_attn=flash_attn)
    m.eval(tokens)
    return np.array(m.scores[: len(tokens)], np.float64)


def assert_matches_llama_cpp(path, ours: np.ndarray, tokens: list[int]) -> tuple:
    """Our batch logits `ours` for `tokens` are llama.cpp's on the same file to within
    LLAMA_SPREADS of llama.cpp's own spread (flash attention on against off; at least 1e-4
    of the logits' scale, as a spread of 0 is luck), top-1 included where it is decided.
    Returns (llama.cpp's logits, the bound) for the checks that the difference matters."""
    ref = llama_logits(path, tokens)
    spread = float(np.abs(llama_logits(path, tokens, flash_attn=True) - ref).max())
    noise = max(LLAMA_SPREADS * spread, 1e-4 * float(np.abs(ref).max()))
    assert_same_top1_where_clear(ref, ours, noise)
    return ref, noise


def llama_perplexity(path, ids: list[int], n_ctx: int, bos_id: int) -> float:
    """llama-perplexity's protocol (chunks of n_ctx, BOS first, the second half scored) on
    llama.cpp's own logits."""
    from agreement import log_softmax

    ll = _llama(path, n_ctx)
    nll = []
    for i in range(len(ids) // n_ctx):
        chunk = ids[i * n_ctx:(i + 1) * n_ctx]
        chunk[0] = bos_id
        ll.reset()
        ll.eval(chunk)
        lp = log_softmax(np.array(ll.scores[:n_ctx]))
        nll += [-lp[j, ids[i * n_ctx + j + 1]] for j in range(n_ctx // 2, n_ctx - 1)]
    return float(np.exp(np.mean(nll)))


def assert_generation_matches_llama_cpp(path, prompt: str = "The capital of France is",
                                        n_predict: int = 12, n_ctx: int = 64) -> None:
    """The whole loop on one file, against llama.cpp: our greedy text is its text up to the
    first near-tie (with the decode logits within the bound), and our perplexity of a short
    text (llama-perplexity's protocol, two chunks of 32) within 0.5% of its."""
    from gguflab.catalog import default_eval_text
    from gguflab.runner.generate import Generation
    from gguflab.runner.model import Model
    from gguflab.runner.perplexity import perplexity
    from gguflab.runner.sampling import Sampler, SamplerParams
    from gguflab.runner.tokenizer import Tokenizer

    m = Model(path)
    tok = Tokenizer.from_gguf(m.reader)
    ids = tok.encode(prompt)
    ref = reference(path, ids, n_predict, n_ctx)
    ours = "".join(Generation.start(m, tok, n_ctx).stream(ids, Sampler(SamplerParams(temp=0)),
                                                            n_predict))
    ref.assert_agrees(decode_logits(m, ref.ids, ref.n_prompt, n_ctx), ours)
    text = tok.encode(open(default_eval_text(), encoding="utf-8").read(), add_special=True)
    text = list(text[:64])
    got = perplexity(m, text, 32, add_bos=True, bos_id=tok.bos_id).ppl
    want = llama_perplexity(path, text, 32, tok.bos_id)
    assert abs(got - want) / want < 5e-3, (got, want)
