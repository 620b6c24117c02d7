"""llama.cpp's quantization mixes: which ggml type each tensor gets for a target ftype.

This follows `llama_tensor_get_type` in llama.cpp's `llama-quant.cpp` rule for rule (the
arithmetic lives in the family modules): a tensor is quantized only if it is a 2-D+
`*weight` that is not a norm or one of the small special tensors; the output (and tied
token embedding) goes to Q6_K or Q8_0; attn_v / ffn_down / attn_output get more bits by
layer position and GQA; and a type whose block does not divide the row falls back.
The i-quant, ternary and MXFP4 mixes have their own rules (some depend on whether an
importance matrix is given), and `--tensor-type` patterns replace the rules for the tensors
they name (the first that matches wins; those tensors do not advance the counters).
Counters advance in llama.cpp's tensor order (non-layer tensors first, then by layer, then
by name), so the plan must be made in that order: `llama_order`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum

from ..errors import UserError
from ..gguf import GGMLType, LlamaFileType, type_info

G = GGMLType
F = LlamaFileType


@dataclass(frozen=True)
class Mix:
    """A target of `gguflab quantize`: a name, llama.cpp's ftype id and what it says of it."""

    name: str
    ftype: LlamaFileType
    default_type: GGMLType | None  # None for COPY
    hint: str
    alias_of: str | None = None


# The mixes gguflab lists in its menus (the TUI, sweeps): llama.cpp's legacy, K-quant and
# float files. Sizes and ppl deltas as llama.cpp measured them on Llama-3-8B (F16/BF16 on
# Mistral-7B).
MIXES: list[Mix] = [
    Mix("Q4_0", F.MOSTLY_Q4_0, G.Q4_0, " 4.34G, +0.4685 ppl @ Llama-3-8B"),
    Mix("Q4_1", F.MOSTLY_Q4_1, G.Q4_1, " 4.78G, +0.4511 ppl @ Llama-3-8B"),
    Mix("Q5_0", F.MOSTLY_Q5_0, G.Q5_0, " 5.21G, +0.1316 ppl @ Llama-3-8B"),
    Mix("Q5_1", F.MOSTLY_Q5_1, G.Q5_1, " 5.65G, +0.1062 ppl @ Llama-3-8B"),
    Mix("Q2_K", F.MOSTLY_Q2_K, G.Q2_K, " 2.96G, +3.5199 ppl @ Llama-3-8B"),
    Mix("Q2_K_S", F.MOSTLY_Q2_K_S, G.Q2_K, " 2.96G, +3.1836 ppl @ Llama-3-8B"),
    Mix("Q3_K", F.MOSTLY_Q3_K_M, G.Q3_K, "alias for Q3_K_M", alias_of="Q3_K_M"),
    Mix("Q3_K_S", F.MOSTLY_Q3_K_S, G.Q3_K, " 3.41G, +1.6321 ppl @ Llama-3-8B"),
    Mix("Q3_K_M", F.MOSTLY_Q3_K_M, G.Q3_K, " 3.74G, +0.6569 ppl @ Llama-3-8B"),
    Mix("Q3_K_L", F.MOSTLY_Q3_K_L, G.Q3_K, " 4.03G, +0.5562 ppl @ Llama-3-8B"),
    Mix("Q4_K", F.MOSTLY_Q4_K_M, G.Q4_K, "alias for Q4_K_M", alias_of="Q4_K_M"),
    Mix("Q4_K_S", F.MOSTLY_Q4_K_S, G.Q4_K, " 4.37G, +0.2689 ppl @ Llama-3-8B"),
    Mix("Q4_K_M", F.MOSTLY_Q4_K_M, G.Q4_K, " 4.58G, +0.1754 ppl @ Llama-3-8B"),
    Mix("Q5_K", F.MOSTLY_Q5_K_M, G.Q5_K, "alias for Q5_K_M", alias_of="Q5_K_M"),
    Mix("Q5_K_S", F.MOSTLY_Q5_K_S, G.Q5_K, " 5.21G, +0.1049 ppl @ Llama-3-8B"),
    Mix("Q5_K_M", F.MOSTLY_Q5_K_M, G.Q5_K, " 5.33G, +0.0569 ppl @ Llama-3-8B"),
    Mix("Q6_K", F.MOSTLY_Q6_K, G.Q6_K, " 6.14G, +0.0217 ppl @ Llama-3-8B"),
    Mix("Q8_0", F.MOSTLY_Q8_0, G.Q8_0, " 7.96G, +0.0026 ppl @ Llama-3-8B"),
    Mix("F16", F.MOSTLY_F16, G.F16, "14.00G, +0.0020 ppl @ Mistral-7B"),
    Mix("BF16", F.MOSTLY_BF16, G.BF16, "14.00G, -0.0050 ppl @ Mistral-7B"),
    Mix("F32", F.ALL_F32, G.F32, "26.00G              @ 7B"),
    Mix("COPY", F.ALL_F32, None, "only copy tensors, no quantizing"),
]

# The i-quant, ternary and MXFP4 mixes (their types are block types of their own; the
# default type is llama.cpp's `llama_ftype_get_default_type`).
IQ_MIXES: list[Mix] = [
    Mix("MXFP4_MOE", F.MOSTLY_MXFP4_MOE, G.MXFP4, " MXFP4 MoE"),
    Mix("IQ2_XXS", F.MOSTLY_IQ2_XXS, G.IQ2_XXS, " 2.06 bpw quantization"),
    Mix("IQ2_XS", F.MOSTLY_IQ2_XS, G.IQ2_XS, " 2.31 bpw quantization"),
    Mix("IQ2_S", F.MOSTLY_IQ2_S, G.IQ2_XS, " 2.5  bpw quantization"),
    Mix("IQ2_M", F.MOSTLY_IQ2_M, G.IQ2_S, " 2.7  bpw quantization"),
    Mix("IQ1_S", F.MOSTLY_IQ1_S, G.IQ1_S, " 1.56 bpw quantization"),
    Mix("IQ1_M", F.MOSTLY_IQ1_M, G.IQ1_M, " 1.75 bpw quantization"),
    Mix("TQ1_0", F.MOSTLY_TQ1_0, G.TQ1_0, " 1.69 bpw ternarization"),
    Mix("TQ2_0", F.MOSTLY_TQ2_0, G.TQ2_0, " 2.06 bpw ternarization"),
    Mix("IQ3_XXS", F.MOSTLY_IQ3_XXS, G.IQ3_XXS, " 3.06 bpw quantization"),
    Mix("IQ3_S", F.MOSTLY_IQ3_S, G.IQ3_S, " 3.44 bpw quantization"),
    Mix("IQ3_M", F.MOSTLY_IQ3_M, G.IQ3_S, " 3.66 bpw quantization mix"),
    Mix("IQ3_XS", F.MOSTLY_IQ3_XS, G.IQ3_S, " 3.3 bpw quantization"),
    Mix("IQ4_NL", F.MOSTLY_IQ4_NL, G.IQ4_NL, " 4.50 bpw non-linear quantization"),
    Mix("IQ4_XS", F.MOSTLY_IQ4_XS, G.IQ4_XS, " 4.25 bpw non-linear quantization"),
]

# Every target `llama-quantize` takes (but Q1_0, Q2_0 and NVFP4), in its --help order.
_ORDER = ("Q4_0 Q4_1 MXFP4_MOE Q5_0 Q5_1 IQ2_XXS IQ2_XS IQ2_S IQ2_M IQ1_S IQ1_M TQ1_0 TQ2_0 "
          "Q2_K Q2_K_S IQ3_XXS IQ3_S IQ3_M Q3_K IQ3_XS Q3_K_S Q3_K_M Q3_K_L IQ4_NL IQ4_XS Q4_K "
          "Q4_K_S Q4_K_M Q5_K Q5_K_S Q5_K_M Q6_K Q8_0 F16 BF16 F32 COPY").split()
_BY_NAME = {m.name.upper(): m for m in MIXES + IQ_MIXES}
ALL_MIXES: list[Mix] = [_BY_NAME[n] for n in _ORDER]


def parse_mix(text: str) -> Mix:
    """A mix by name (case-insensitive, as llama-quantize) or by ftype number."""
    m = _BY_NAME.get(text.strip().upper())
    if m is not None:
        return m
    if text.strip().isdigit():
        for m in ALL_MIXES:
            if m.ftype == int(text) and m.alias_of is None and m.name != "COPY":
                return m
    names = ", ".join(m.name for m in ALL_MIXES)
    raise UserError(f"unknown quantization type {text!r}; choose one of: {names}")


def is_mix_name(text: str) -> bool:
    try:
        parse_mix(text)
        return True
    except UserError:
        return False


def ggml_type_name(t: GGMLType) -> str:
    """ggml's own spelling of a type: q4_K, iq2_xxs, f16."""
    n = t.name.lower()
    return n[:-2] + "_K" if n.endswith("_k") else n


# ggml_is_quantized: block types (the float and integer types are not)
def is_quantized(t: GGMLType) -> bool:
    return type_info(t).block_size > 1


class Category(Enum):
    TOKEN_EMBD = "token_embd"
    ATTENTION_Q = "attn_q"
    ATTENTION_V = "attn_v"
    ATTENTION_K = "attn_k"
    ATTENTION_QKV = "attn_qkv"
    ATTENTION_KV_B = "attn_kv_b"
    ATTENTION_OUTPUT = "attn_output"
    FFN_UP = "ffn_up"
    FFN_GATE = "ffn_gate"
    FFN_DOWN = "ffn_down"
    OUTPUT = "output"
    OTHER = "other"


def category(name: str) -> Category:
    if name == "output.weight":
        return Category.OUTPUT
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return Category.TOKEN_EMBD
    for needle, cat in (("attn_qkv.weight", Category.ATTENTION_QKV),
                        ("attn_kv_b.weight", Category.ATTENTION_KV_B),
                        ("attn_v.weight", Category.ATTENTION_V),
                        ("attn_k.weight", Category.ATTENTION_K),
                        ("attn_q.weight", Category.ATTENTION_Q),
                        ("attn_output.weight", Category.ATTENTION_OUTPUT),
                        ("ffn_up", Category.FFN_UP),
                        ("ffn_gate", Category.FFN_GATE),
                        ("ffn_down", Category.FFN_DOWN)):
        if needle in name:
            return cat
    return Category.OTHER


ATTN_V_LIKE = {Category.ATTENTION_V, Category.ATTENTION_QKV, Category.ATTENTION_KV_B}

# Tensors llama.cpp never quantizes: norms, routers, tiny or positional tensors.
NEVER_QUANTIZED = (
    "_norm.weight", "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup", "laurel",
    "per_layer_model_proj", "ssm_conv1d", "shortconv.conv.weight", "indexer.k_proj.weight",
    "indexer.q_proj.weight", "time_mix_first.weight", "time_mix_w0.weight",
    "time_mix_w1.weight", "time_mix_w2.weight", "time_mix_v0.weight", "time_mix_v1.weight",
    "time_mix_v2.weight", "time_mix_a0.weight", "time_mix_a1.weight", "time_mix_a2.weight",
    "time_mix_g1.weight", "time_mix_g2.weight", "time_mix_decay_w1.weight",
    "time_mix_decay_w2.weight", "time_mix_lerp_fused.weight", "attn_rel_b.weight",
    ".position_embd", "sam.pos_embd", "sam.neck.", "sam.net_", ".rel_pos", ".patch_embd",
    ".patch_merger", "a.rvq.codebook", "mm.a.code_embd",
)
NEVER_QUANTIZED_EXACT = ("position_embd.weight", "token_types.weight")


def n_dims(ne: tuple[int, ...]) -> int:
    """ggml_n_dims: trailing dimensions of size 1 do not count."""
    n = len(ne)
    while n > 1 and ne[n - 1] == 1:
        n -= 1
    return n


_LAYER = re.compile(r"blk\.\s*([+-]?\d+)")


def layer_of(name: str) -> int:
    """The N of `blk.N.`, or -1 (how llama.cpp's loader orders and counts tensors)."""
    m = _LAYER.match(name)
    return int(m.group(1)) if m else -1


def llama_order(name: str) -> tuple[int, bytes]:
    """Sort key of llama.cpp's weights map: layer (-1 first), then name bytewise."""
    return layer_of(name), name.encode()


@dataclass
class ModelFacts:
    """What the rules need to know of the model."""

    arch: str
    n_layer: int
    n_head: int
    n_head_kv: int
    n_expert: int = 0
    tensor_names: list[str] = field(default_factory=list)

    @property
    def n_gqa(self) -> int:
        return self.n_head // self.n_head_kv if self.n_head_kv else 0

    @property
    def is_70b(self) -> bool:
        """llama.cpp's LLM_TYPE_70B (attn_v gets Q5_K there): 80-layer LLaMA-2/3 with GQA."""
        if self.arch == "llama":
            return self.n_layer == 80 and self.n_head != self.n_head_kv
        return self.arch in ("qwen2",) and self.n_layer == 80

    @property
    def tied_embeddings(self) -> bool:
        return "output.weight" not in self.tensor_names


@dataclass
class MixOptions:
    """llama-quantize's switches that change the plan."""

    output_tensor_type: GGMLType | None = None
    token_embedding_type: GGMLType | None = None
    quantize_output_tensor: bool = True  # False = --leave-output-tensor
    pure: bool = False
    # --tensor-type REGEX=TYPE, in the order given: the first pattern found in a tensor's
    # name (re.search) decides its type
    tensor_types: list[tuple[str, GGMLType]] = field(default_factory=list)


def allows_quantization(name: str, ne: tuple[int, ...], mix: Mix, opts: MixOptions) -> bool:
    if mix.default_type is None:  # COPY
        return False
    if n_dims(ne) < 2:
        return False
    ok = name.rfind("weight") == len(name) - 6
    ok &= not any(s in name for s in NEVER_QUANTIZED)
    ok &= name not in NEVER_QUANTIZED_EXACT
    ok &= opts.quantize_output_tensor or name != "output.weight"
    return ok


# the types whose llama.cpp quantizer refuses to run without importance weights
IMATRIX_TYPES = (G.IQ3_XXS, G.IQ2_XXS, G.IQ2_XS, G.IQ2_S, G.IQ1_M, G.IQ1_S)


def requires_imatrix(name: str, dst: GGMLType, mix: Mix) -> bool:
    """llama.cpp's rule: tensors going to the lowest-bit i-quants (and the Q2_K tensors of a
    Q2_K_S file) need an importance matrix; the embeddings and the output never do."""
    if name in ("token_embd.weight", "per_layer_token_embd.weight", "output.weight"):
        return False
    if dst in IMATRIX_TYPES:
        return True
    return dst == G.Q2_K and mix.ftype == F.MOSTLY_Q2_K_S


def compile_tensor_types(pairs: list[tuple[str, GGMLType]]) -> list[tuple[re.Pattern, GGMLType]]:
    out = []
    for pattern, t in pairs:
        try:
            out.append((re.compile(pattern), GGMLType(t)))
        except re.error as e:
            raise UserError(f"--tensor-type: bad regular expression {pattern!r}: {e}") from None
    return out


# groups of ftypes the rules name together
_IQ2_LIKE = (F.MOSTLY_IQ2_XXS, F.MOSTLY_IQ2_XS, F.MOSTLY_IQ1_S, F.MOSTLY_IQ2_S, F.MOSTLY_IQ2_M,
             F.MOSTLY_IQ1_M)
_IQ2_S_M = (F.MOSTLY_IQ2_S, F.MOSTLY_IQ2_M)
_OUTPUT_Q5_K = (F.MOSTLY_IQ2_XXS, F.MOSTLY_IQ2_XS, F.MOSTLY_IQ3_XXS, F.MOSTLY_IQ1_S,
                F.MOSTLY_IQ2_S, F.MOSTLY_IQ2_M, F.MOSTLY_IQ1_M)
_MOE8_ATTN_OUT_Q5_K = (F.MOSTLY_Q2_K, F.MOSTLY_IQ3_XS, F.MOSTLY_IQ3_XXS, F.MOSTLY_Q3_K_S,
                       F.MOSTLY_Q3_K_M, F.MOSTLY_IQ4_NL, F.MOSTLY_Q4_K_S, F.MOSTLY_Q4_K_M,
                       F.MOSTLY_IQ3_S, F.MOSTLY_IQ3_M, F.MOSTLY_IQ4_XS)


class Planner:
    """Chooses each tensor's type. Call `choose` once per tensor in `llama_order`.
    `has_imatrix`: an importance matrix will be used (some rules depend on it)."""

    def __init__(self, facts: ModelFacts, mix: Mix, opts: MixOptions, has_imatrix: bool = False):
        self.facts, self.mix, self.opts = facts, mix, opts
        self.has_imatrix = has_imatrix
        self.patterns = compile_tensor_types(opts.tensor_types)
        self.n_attention_wv = sum(category(n) in ATTN_V_LIKE for n in facts.tensor_names)
        self.i_attention_wv = self.i_ffn_down = self.i_ffn_gate = self.i_ffn_up = 0
        self.n_fallback = 0
        self.fallback_notes: dict[str, str] = {}
        self.manual: dict[str, tuple[GGMLType, GGMLType]] = {}  # name -> (mix type, override)

    def _pattern_type(self, name: str) -> GGMLType | None:
        for pattern, t in self.patterns:
            if pattern.search(name):
                return t
        return None

    def choose(self, name: str, ne: tuple[int, ...], cur: GGMLType) -> GGMLType:
        opts, mix = self.opts, self.mix
        if not allows_quantization(name, ne, mix, opts):
            return cur
        cat = category(name)
        if opts.token_embedding_type is not None and cat == Category.TOKEN_EMBD:
            # the per-layer table follows it too, unless a --tensor-type names it
            if name != "per_layer_token_embd.weight" or self._pattern_type(name) is None:
                return opts.token_embedding_type
        if opts.output_tensor_type is not None and cat == Category.OUTPUT:
            return opts.output_tensor_type
        new = mix.default_type
        if is_quantized(new):
            manual = self._pattern_type(name) if self.patterns else None
            if manual is not None:
                if manual != new:
                    self.manual[name] = (new, manual)
                new = manual
            elif not opts.pure:
                new = self._by_mix(name, ne, new, cat)
            new = self._fallback(name, ne, new)
        return new

    def _by_mix(self, name: str, ne: tuple[int, ...], new: GGMLType, cat: Category) -> GGMLType:
        f, ft, imat = self.facts, self.mix.ftype, self.has_imatrix
        n_expert = f.n_expert

        def more_bits(i: int, n: int) -> bool:
            return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2

        def layer(i: int, n: int) -> tuple[int, int]:
            if n_expert > 1:  # expert tensors are not in layer order: read the layer off the name
                m = _LAYER.match(name)  # sscanf("blk.%d."): the dot after needs not match
                if not m:
                    raise UserError(f"failed to determine the layer of tensor {name}")
                i = int(m.group(1))
                if not 0 <= i < n:
                    raise UserError(f"bad layer {i} for tensor {name}; must be in [0, {n})")
            return i, n

        if cat == Category.OUTPUT or (f.tied_embeddings and cat == Category.TOKEN_EMBD):
            if self.opts.output_tensor_type is not None:
                return self.opts.output_tensor_type
            if ft == F.MOSTLY_MXFP4_MOE:
                return G.Q8_0
            if f.arch == "falcon" or ne[0] % type_info(new).block_size:
                return G.Q8_0
            if ft in _OUTPUT_Q5_K:
                return G.Q5_K
            return new if new == G.Q8_0 else G.Q6_K
        if ft == F.MOSTLY_MXFP4_MOE:  # expert tensors (3-D) in MXFP4, the rest in Q8_0
            is_expert = cat in (Category.FFN_UP, Category.FFN_GATE, Category.FFN_DOWN)
            three_d = len(ne) > 2 and ne[2] > 1
            return G.MXFP4 if three_d and (f.arch != "bailingmoe3" or is_expert) else G.Q8_0
        if cat == Category.TOKEN_EMBD:
            if ft in (F.MOSTLY_IQ2_XXS, F.MOSTLY_IQ2_XS, F.MOSTLY_IQ1_S, F.MOSTLY_IQ1_M):
                return G.Q2_K
            if ft in (*_IQ2_S_M, F.MOSTLY_IQ3_XXS):
                return G.IQ3_S
            if ft in (F.MOSTLY_TQ1_0, F.MOSTLY_TQ2_0, F.MOSTLY_Q2_0):
                return G.Q4_K
            return new
        if ft in _IQ2_LIKE:
            if cat in ATTN_V_LIKE:
                if f.n_gqa >= 4 or n_expert >= 4:
                    new = G.Q4_K
                else:
                    new = G.IQ3_S if ft in _IQ2_S_M else G.Q2_K
                self.i_attention_wv += 1
            elif n_expert == 8 and cat == Category.ATTENTION_K:
                new = G.Q4_K
            elif cat == Category.FFN_DOWN:
                if self.i_ffn_down < f.n_layer // 8:
                    new = G.IQ3_S if ft in _IQ2_S_M else G.Q2_K
                self.i_ffn_down += 1
            elif cat == Category.ATTENTION_OUTPUT:
                if n_expert == 8:
                    new = G.Q5_K
                elif ft in (F.MOSTLY_IQ1_S, F.MOSTLY_IQ1_M):
                    new = G.IQ2_XXS
                elif ft in _IQ2_S_M:
                    new = G.IQ3_S
            return new
        if cat in ATTN_V_LIKE:
            gqa4 = f.n_gqa >= 4
            if ft == F.MOSTLY_Q2_K:
                new = G.Q4_K if gqa4 else G.Q3_K
            elif ft == F.MOSTLY_Q2_K_S and gqa4:
                new = G.Q4_K
            elif ft == F.MOSTLY_IQ3_XXS:
                new = G.Q4_K if gqa4 else G.IQ3_S if not imat else G.IQ3_XXS
            elif ft in (F.MOSTLY_IQ3_XS, F.MOSTLY_IQ3_S) and gqa4:
                new = G.Q4_K
            elif ft == F.MOSTLY_IQ3_M:
                new = G.Q4_K
            elif ft == F.MOSTLY_Q3_K_M:
                new = G.Q5_K if self.i_attention_wv < 2 else G.Q4_K
            elif ft == F.MOSTLY_Q3_K_L:
                new = G.Q5_K
            elif ft in (F.MOSTLY_IQ4_NL, F.MOSTLY_IQ4_XS) and gqa4:
                new = G.Q5_K
            elif ft in (F.MOSTLY_Q4_K_M, F.MOSTLY_Q5_K_M) and more_bits(self.i_attention_wv,
                                                                       self.n_attention_wv):
                new = G.Q6_K
            elif ft == F.MOSTLY_Q4_K_S and self.i_attention_wv < 4:
                new = G.Q5_K
            if f.is_70b and new in (G.Q3_K, G.Q4_K):
                new = G.Q5_K  # 8 heads share attn_v in the 70B models: more bits cost little
            if n_expert == 8:
                new = G.Q8_0
            self.i_attention_wv += 1
        elif cat == Category.ATTENTION_K:
            if n_expert == 8:
                new = G.Q8_0
            elif ft == F.MOSTLY_IQ3_XS:
                new = G.IQ3_XXS
            elif ft == F.MOSTLY_IQ3_XXS:
                new = G.IQ2_S
        elif cat == Category.ATTENTION_Q:
            if ft == F.MOSTLY_IQ3_XS:
                new = G.IQ3_XXS
            elif ft == F.MOSTLY_IQ3_XXS:
                new = G.IQ2_S
        elif cat == Category.FFN_DOWN:
            i, n = layer(self.i_ffn_down, f.n_layer)
            if ft == F.MOSTLY_Q2_K:
                new = G.Q3_K
            elif ft == F.MOSTLY_Q2_K_S:
                if i < n // 8:
                    new = G.Q4_K
            elif ft == F.MOSTLY_IQ3_XXS and not imat:
                new = G.Q4_K if i < n // 8 else G.Q3_K
            elif ft == F.MOSTLY_Q3_K_M:
                new = (G.Q5_K if i < n // 16 else
                       G.Q4_K if f.arch != "falcon" or more_bits(i, n) else G.Q3_K)
            elif ft == F.MOSTLY_IQ3_M and (i < n // 8 or (n_expert == 8 and more_bits(i, n))):
                new = G.Q4_K
            elif ft == F.MOSTLY_Q3_K_L:
                new = G.Q4_K if f.arch == "falcon" else G.Q5_K
            elif ft == F.MOSTLY_Q4_K_M:
                if f.arch == "falcon":
                    new = G.Q6_K if i < n // 16 else G.Q5_K if more_bits(i, n) else G.Q4_K
                elif more_bits(i, n):
                    new = G.Q6_K
            elif i < n // 8 and ft in (F.MOSTLY_IQ4_NL, F.MOSTLY_IQ4_XS) and not imat:
                new = G.Q5_K
            elif ft == F.MOSTLY_Q5_K_M and more_bits(i, n):
                new = G.Q6_K
            elif ft == F.MOSTLY_Q4_K_S and f.arch != "falcon" and i < n // 8:
                new = G.Q5_K
            elif ft in (F.MOSTLY_Q4_0, F.MOSTLY_Q5_0) and imat and i < n // 8:
                # the first ffn_down layers go wrong in Q4_0/Q5_0 even with an imatrix
                new = G.Q4_1 if ft == F.MOSTLY_Q4_0 else G.Q5_1
            self.i_ffn_down += 1
        elif cat == Category.ATTENTION_OUTPUT:
            if f.arch != "falcon":
                if n_expert == 8:
                    if ft in _MOE8_ATTN_OUT_Q5_K:
                        new = G.Q5_K
                elif ft == F.MOSTLY_Q2_K:
                    new = G.Q3_K
                elif ft == F.MOSTLY_IQ3_XXS:
                    new = G.IQ3_S
                elif ft == F.MOSTLY_Q3_K_M:
                    new = G.Q4_K
                elif ft == F.MOSTLY_Q3_K_L:
                    new = G.Q5_K
                elif ft == F.MOSTLY_IQ3_M:
                    new = G.Q4_K
            elif ft == F.MOSTLY_Q3_K_L:
                new = G.Q4_K
        elif cat == Category.ATTENTION_QKV:
            if ft in (F.MOSTLY_Q3_K_M, F.MOSTLY_Q3_K_L, F.MOSTLY_IQ3_M):
                new = G.Q4_K
            elif ft == F.MOSTLY_Q4_K_M:
                new = G.Q5_K
            elif ft == F.MOSTLY_Q5_K_M:
                new = G.Q6_K
        elif cat in (Category.FFN_GATE, Category.FFN_UP):
            counter = "i_ffn_gate" if cat == Category.FFN_GATE else "i_ffn_up"
            i, n = layer(getattr(self, counter), f.n_layer)
            if ft == F.MOSTLY_IQ3_XS and n // 8 <= i < 7 * n // 8:
                new = G.IQ3_XXS
            setattr(self, counter, getattr(self, counter) + 1)
        return new

    # the type to use when the row length is not a multiple of the target's block
    FALLBACK = {G.Q2_K: G.Q4_0, G.Q3_K: G.Q4_0, G.Q2_0: G.Q4_0, G.TQ1_0: G.Q4_0,
                G.TQ2_0: G.Q4_0, G.Q4_K: G.Q5_0, G.Q5_K: G.Q5_1, G.Q6_K: G.Q8_0,
                **dict.fromkeys((G.IQ1_S, G.IQ1_M, G.IQ2_XXS, G.IQ2_XS, G.IQ2_S, G.IQ3_XXS,
                                 G.IQ3_S, G.IQ4_XS), G.IQ4_NL)}

    def _fallback(self, name: str, ne: tuple[int, ...], new: GGMLType) -> GGMLType:
        block = type_info(new).block_size
        if ne[0] % block == 0:
            return new
        self.n_fallback += 1
        if new in self.FALLBACK:
            out = self.FALLBACK[new]
        elif block <= 32:
            out = new
        else:
            raise UserError(f"no fallback type for {new.name} (tensor {name})")
        if ne[0] % type_info(out).block_size:
            out = G.F16
        self.fallback_notes[name] = (f"ncols {ne[0]} not divisible by {block} (required for "
                                     f"{new.name}): falling back to {out.name}")
        return out


def parse_tensor_type(text: str) -> tuple[str, GGMLType]:
    """--tensor-type NAME=TYPE as llama-quantize reads it: NAME (lowercased) is a regular
    expression searched for in each tensor name, TYPE a ggml type name (any case)."""
    name, sep, tname = text.partition("=")
    if not sep:
        raise UserError(f"--tensor-type: malformed tensor type {text!r}: expected NAME=TYPE")
    if not name:
        raise UserError(f"--tensor-type {text!r}: missing tensor name")
    if not tname:
        raise UserError(f"--tensor-type {text!r}: missing quantization type")
    try:
        t = GGMLType[tname.upper()]
    except KeyError:
        raise UserError(f"--tensor-type {text!r}: invalid quantization type {tname!r}") from None
    name = name.lower()
    compile_tensor_types([(name, t)])  # a bad pattern fails here, before any work
    return name, t


def parse_tensor_type_file(path: str) -> list[tuple[str, GGMLType]]:
    """--tensor-type-file: NAME=TYPE items separated by spaces or newlines."""
    try:
        with open(path, encoding="utf-8") as f:
            words = f.read().split()
    except OSError as e:
        raise UserError(f"--tensor-type-file: failed to open {path}: {e.strerror}") from None
    return [parse_tensor_type(w) for w in words]


def parse_prune_layers(text: str) -> list[int]:
    """--prune-layers 1,2,3: sorted, without duplicates."""
    out = set()
    for item in text.split(","):
        try:
            i = int(item.strip())
        except ValueError:
            i = -1
        if i < 0:
            raise UserError(f"--prune-layers: invalid layer id {item!r}")
        out.add(i)
    return sorted(out)
