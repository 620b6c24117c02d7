"""Every fact of the GGUF format in one place: types, block sizes, value types, keys.

Nothing else in gguflab spells a type id, a block size or a metadata key as a literal.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import numpy as np

GGUF_MAGIC = b"GGUF"
GGUF_VERSIONS_READ = (2, 3)  # v1 used 32-bit counts and is long gone
GGUF_VERSION_WRITE = 3
DEFAULT_ALIGNMENT = 32
GGML_MAX_DIMS = 4
QK_K = 256  # super-block size of the K-quants
QUANTIZATION_VERSION = 2  # general.quantization_version written by llama.cpp since 2023


class GGMLType(IntEnum):
    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q8_1 = 9
    Q2_K = 10
    Q3_K = 11
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    Q8_K = 15
    IQ2_XXS = 16
    IQ2_XS = 17
    IQ3_XXS = 18
    IQ1_S = 19
    IQ4_NL = 20
    IQ3_S = 21
    IQ2_S = 22
    IQ4_XS = 23
    I8 = 24
    I16 = 25
    I32 = 26
    I64 = 27
    F64 = 28
    IQ1_M = 29
    BF16 = 30
    TQ1_0 = 34
    TQ2_0 = 35
    MXFP4 = 39
    NVFP4 = 40
    Q1_0 = 41
    Q2_0 = 42


# Ids that existed once and are no longer written by anyone (repacked Q4_0 variants).
REMOVED_TYPES = {
    4: "Q4_2",
    5: "Q4_3",
    31: "Q4_0_4_4",
    32: "Q4_0_4_8",
    33: "Q4_0_8_8",
    36: "IQ4_NL_4_4",
    37: "IQ4_NL_4_8",
    38: "IQ4_NL_8_8",
}


@dataclass(frozen=True)
class TypeInfo:
    """Layout of one ggml type: `block_size` elements are stored in `type_size` bytes."""

    type: GGMLType
    block_size: int
    type_size: int
    dtype: np.dtype | None  # numpy dtype of an element for the unquantized types

    @property
    def name(self) -> str:
        return self.type.name

    @property
    def quantized(self) -> bool:
        return self.block_size > 1

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.type_size / self.block_size

    def row_bytes(self, n: int) -> int:
        """Bytes of a row of `n` elements; `n` must be a multiple of the block size."""
        if n % self.block_size:
            raise ValueError(f"{self.name} needs rows of a multiple of {self.block_size}, got {n}")
        return n // self.block_size * self.type_size


def _t(t: GGMLType, block: int, size: int, dtype: str | None = None) -> TypeInfo:
    return TypeInfo(t, block, size, np.dtype(dtype) if dtype else None)


G = GGMLType
TYPES: dict[GGMLType, TypeInfo] = {
    info.type: info
    for info in (
        _t(G.F32, 1, 4, "<f4"),
        _t(G.F16, 1, 2, "<f2"),
        _t(G.BF16, 1, 2, "<u2"),  # bf16 has no numpy dtype: its raw 16-bit words
        _t(G.F64, 1, 8, "<f8"),
        _t(G.I8, 1, 1, "i1"),
        _t(G.I16, 1, 2, "<i2"),
        _t(G.I32, 1, 4, "<i4"),
        _t(G.I64, 1, 8, "<i8"),
        _t(G.Q4_0, 32, 2 + 16),
        _t(G.Q4_1, 32, 2 + 2 + 16),
        _t(G.Q5_0, 32, 2 + 4 + 16),
        _t(G.Q5_1, 32, 2 + 2 + 4 + 16),
        _t(G.Q8_0, 32, 2 + 32),
        _t(G.Q8_1, 32, 2 + 2 + 32),  # two fp16 (d, d*sum) + 32 int8
        _t(G.Q2_K, QK_K, 2 + 2 + QK_K // 16 + QK_K // 4),
        _t(G.Q3_K, QK_K, 2 + QK_K // 4 + QK_K // 8 + 12),
        _t(G.Q4_K, QK_K, 2 + 2 + QK_K // 2 + 12),
        _t(G.Q5_K, QK_K, 2 + 2 + QK_K // 2 + QK_K // 8 + 12),
        _t(G.Q6_K, QK_K, 2 + QK_K // 2 + QK_K // 4 + QK_K // 16),
        _t(G.Q8_K, QK_K, 4 + QK_K + QK_K // 8),
        _t(G.IQ2_XXS, QK_K, 2 + QK_K // 4),
        _t(G.IQ2_XS, QK_K, 2 + QK_K // 4 + QK_K // 32),
        _t(G.IQ3_XXS, QK_K, 2 + QK_K // 4 + QK_K // 8),
        _t(G.IQ1_S, QK_K, 2 + QK_K // 8 + QK_K // 16),
        _t(G.IQ4_NL, 32, 2 + 16),
        _t(G.IQ3_S, QK_K, 2 + QK_K // 4 + QK_K // 8 + QK_K // 32 + 4),
        _t(G.IQ2_S, QK_K, 2 + QK_K // 4 + QK_K // 16),
        _t(G.IQ4_XS, QK_K, 2 + 2 + QK_K // 2 + QK_K // 64),
        _t(G.IQ1_M, QK_K, QK_K // 8 + QK_K // 16 + QK_K // 32),
        _t(G.TQ1_0, QK_K, 2 + 4 * 13),
        _t(G.TQ2_0, QK_K, 2 + 64),
        _t(G.MXFP4, 32, 1 + 16),
        _t(G.NVFP4, 64, 4 + 32),
        _t(G.Q1_0, 128, 2 + 16),
        _t(G.Q2_0, 64, 2 + 16),
    )
}
del G


def type_info(t: int | GGMLType) -> TypeInfo:
    """The layout of type id `t`; ValueError naming it when it is unknown or retired."""
    try:
        return TYPES[GGMLType(t)]
    except ValueError:
        if t in REMOVED_TYPES:
            raise ValueError(
                f"tensor type {REMOVED_TYPES[t]} ({t}) was removed from GGUF; re-convert the model"
            ) from None
        raise ValueError(f"unknown tensor type id {t}") from None


def type_by_name(name: str) -> GGMLType:
    try:
        return GGMLType[name.upper()]
    except KeyError:
        raise ValueError(f"unknown tensor type {name!r}") from None


def tensor_bytes(t: int | GGMLType, shape: tuple[int, ...]) -> int:
    """Bytes of a tensor of numpy `shape` (rows last-axis contiguous) stored as `t`."""
    info = type_info(t)
    n_rows = 1
    for d in shape[:-1]:
        n_rows *= d
    return n_rows * info.row_bytes(shape[-1] if shape else 1)


class ValueType(IntEnum):
    """Metadata value types."""

    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


# numpy dtype of each fixed-size value type (little-endian, as written on disk)
VALUE_DTYPES: dict[ValueType, np.dtype] = {
    ValueType.UINT8: np.dtype("u1"),
    ValueType.INT8: np.dtype("i1"),
    ValueType.UINT16: np.dtype("<u2"),
    ValueType.INT16: np.dtype("<i2"),
    ValueType.UINT32: np.dtype("<u4"),
    ValueType.INT32: np.dtype("<i4"),
    ValueType.FLOAT32: np.dtype("<f4"),
    ValueType.BOOL: np.dtype("u1"),
    ValueType.UINT64: np.dtype("<u8"),
    ValueType.INT64: np.dtype("<i8"),
    ValueType.FLOAT64: np.dtype("<f8"),
}
INT_VALUE_TYPES = {
    ValueType.UINT8,
    ValueType.INT8,
    ValueType.UINT16,
    ValueType.INT16,
    ValueType.UINT32,
    ValueType.INT32,
    ValueType.UINT64,
    ValueType.INT64,
}
FLOAT_VALUE_TYPES = {ValueType.FLOAT32, ValueType.FLOAT64}


class LlamaFileType(IntEnum):
    """llama.cpp's `llama_ftype`: what `general.file_type` holds."""

    ALL_F32 = 0
    MOSTLY_F16 = 1
    MOSTLY_Q4_0 = 2
    MOSTLY_Q4_1 = 3
    MOSTLY_Q8_0 = 7
    MOSTLY_Q5_0 = 8
    MOSTLY_Q5_1 = 9
    MOSTLY_Q2_K = 10
    MOSTLY_Q3_K_S = 11
    MOSTLY_Q3_K_M = 12
    MOSTLY_Q3_K_L = 13
    MOSTLY_Q4_K_S = 14
    MOSTLY_Q4_K_M = 15
    MOSTLY_Q5_K_S = 16
    MOSTLY_Q5_K_M = 17
    MOSTLY_Q6_K = 18
    MOSTLY_IQ2_XXS = 19
    MOSTLY_IQ2_XS = 20
    MOSTLY_Q2_K_S = 21
    MOSTLY_IQ3_XS = 22
    MOSTLY_IQ3_XXS = 23
    MOSTLY_IQ1_S = 24
    MOSTLY_IQ4_NL = 25
    MOSTLY_IQ3_S = 26
    MOSTLY_IQ3_M = 27
    MOSTLY_IQ2_S = 28
    MOSTLY_IQ2_M = 29
    MOSTLY_IQ4_XS = 30
    MOSTLY_IQ1_M = 31
    MOSTLY_BF16 = 32
    MOSTLY_TQ1_0 = 36
    MOSTLY_TQ2_0 = 37
    MOSTLY_MXFP4_MOE = 38
    MOSTLY_NVFP4 = 39
    MOSTLY_Q1_0 = 40
    MOSTLY_Q2_0 = 41
    GUESSED = 1024


class Keys:
    """Standard metadata keys. `{arch}` is filled with `general.architecture`."""

    # general
    ARCHITECTURE = "general.architecture"
    QUANTIZATION_VERSION = "general.quantization_version"
    ALIGNMENT = "general.alignment"
    FILE_TYPE = "general.file_type"
    NAME = "general.name"
    BASENAME = "general.basename"
    SIZE_LABEL = "general.size_label"
    FINETUNE = "general.finetune"
    AUTHOR = "general.author"
    VERSION = "general.version"
    ORGANIZATION = "general.organization"
    DESCRIPTION = "general.description"
    LICENSE = "general.license"
    LICENSE_NAME = "general.license.name"
    LICENSE_LINK = "general.license.link"
    QUANTIZED_BY = "general.quantized_by"
    URL = "general.url"
    DOI = "general.doi"
    UUID = "general.uuid"
    REPO_URL = "general.repo_url"
    SOURCE_URL = "general.source.url"
    SOURCE_DOI = "general.source.doi"
    SOURCE_UUID = "general.source.uuid"
    SOURCE_REPO_URL = "general.source.repo_url"
    BASE_MODEL_COUNT = "general.base_model.count"
    BASE_MODEL = "general.base_model.{id}.{field}"  # field: name, organization, repo_url ...
    DATASET_COUNT = "general.dataset.count"
    DATASET = "general.dataset.{id}.{field}"
    TAGS = "general.tags"
    LANGUAGES = "general.languages"
    TYPE = "general.type"
    # recommended sampler settings (from generation_config.json)
    SAMPLING_SEQUENCE = "general.sampling.sequence"
    SAMPLING_TOP_K = "general.sampling.top_k"
    SAMPLING_TOP_P = "general.sampling.top_p"
    SAMPLING_MIN_P = "general.sampling.min_p"
    SAMPLING_XTC_PROBABILITY = "general.sampling.xtc_probability"
    SAMPLING_XTC_THRESHOLD = "general.sampling.xtc_threshold"
    SAMPLING_TEMP = "general.sampling.temp"
    SAMPLING_PENALTY_LAST_N = "general.sampling.penalty_last_n"
    SAMPLING_PENALTY_REPEAT = "general.sampling.penalty_repeat"
    SAMPLING_MIROSTAT = "general.sampling.mirostat"
    SAMPLING_MIROSTAT_TAU = "general.sampling.mirostat_tau"
    SAMPLING_MIROSTAT_ETA = "general.sampling.mirostat_eta"
    # hyperparameters, per architecture
    CONTEXT_LENGTH = "{arch}.context_length"
    EMBEDDING_LENGTH = "{arch}.embedding_length"
    BLOCK_COUNT = "{arch}.block_count"
    FEED_FORWARD_LENGTH = "{arch}.feed_forward_length"
    VOCAB_SIZE = "{arch}.vocab_size"
    HEAD_COUNT = "{arch}.attention.head_count"
    HEAD_COUNT_KV = "{arch}.attention.head_count_kv"
    KEY_LENGTH = "{arch}.attention.key_length"
    VALUE_LENGTH = "{arch}.attention.value_length"
    LAYERNORM_RMS_EPS = "{arch}.attention.layer_norm_rms_epsilon"
    SLIDING_WINDOW = "{arch}.attention.sliding_window"
    SLIDING_WINDOW_PATTERN = "{arch}.attention.sliding_window_pattern"
    ROPE_FREQ_BASE_SWA = "{arch}.rope.freq_base_swa"
    ATTN_LOGIT_SOFTCAPPING = "{arch}.attn_logit_softcapping"
    FINAL_LOGIT_SOFTCAPPING = "{arch}.final_logit_softcapping"
    ROPE_DIMENSION_COUNT = "{arch}.rope.dimension_count"
    ROPE_FREQ_BASE = "{arch}.rope.freq_base"
    ROPE_SCALING_TYPE = "{arch}.rope.scaling.type"
    ROPE_SCALING_FACTOR = "{arch}.rope.scaling.factor"
    ROPE_SCALING_ORIG_CTX_LEN = "{arch}.rope.scaling.original_context_length"
    ROPE_SCALING_ATTN_FACTOR = "{arch}.rope.scaling.attn_factor"
    ROPE_SCALING_YARN_EXT_FACTOR = "{arch}.rope.scaling.yarn_ext_factor"
    ROPE_SCALING_YARN_ATTN_FACTOR = "{arch}.rope.scaling.yarn_attn_factor"
    ROPE_SCALING_YARN_BETA_FAST = "{arch}.rope.scaling.yarn_beta_fast"
    ROPE_SCALING_YARN_BETA_SLOW = "{arch}.rope.scaling.yarn_beta_slow"
    LAYERNORM_EPS = "{arch}.attention.layer_norm_epsilon"
    CAUSAL = "{arch}.attention.causal"
    EXPERT_COUNT = "{arch}.expert_count"
    EXPERT_USED_COUNT = "{arch}.expert_used_count"
    EXPERT_FEED_FORWARD_LENGTH = "{arch}.expert_feed_forward_length"
    EXPERT_SHARED_FEED_FORWARD_LENGTH = "{arch}.expert_shared_feed_forward_length"
    EXPERT_GROUP_COUNT = "{arch}.expert_group_count"
    EXPERT_GROUP_USED_COUNT = "{arch}.expert_group_used_count"
    EXPERT_GATING_FUNC = "{arch}.expert_gating_func"  # 1 softmax, 2 sigmoid, 4 sqrt(softplus)
    # tokenizer
    TOKENIZER_MODEL = "tokenizer.ggml.model"
    TOKENIZER_PRE = "tokenizer.ggml.pre"
    TOKENS = "tokenizer.ggml.tokens"
    TOKEN_TYPE = "tokenizer.ggml.token_type"
    SCORES = "tokenizer.ggml.scores"
    MERGES = "tokenizer.ggml.merges"
    BOS_ID = "tokenizer.ggml.bos_token_id"
    EOS_ID = "tokenizer.ggml.eos_token_id"
    EOT_ID = "tokenizer.ggml.eot_token_id"
    EOM_ID = "tokenizer.ggml.eom_token_id"
    MASK_ID = "tokenizer.ggml.mask_token_id"
    UNK_ID = "tokenizer.ggml.unknown_token_id"
    SEP_ID = "tokenizer.ggml.seperator_token_id"  # sic: llama.cpp's spelling
    PAD_ID = "tokenizer.ggml.padding_token_id"
    ADD_BOS = "tokenizer.ggml.add_bos_token"
    ADD_EOS = "tokenizer.ggml.add_eos_token"
    ADD_SEP = "tokenizer.ggml.add_sep_token"
    ADD_SPACE_PREFIX = "tokenizer.ggml.add_space_prefix"
    CHAT_TEMPLATE = "tokenizer.chat_template"
    CHAT_TEMPLATE_NAMED = "tokenizer.chat_template.{name}"
    CHAT_TEMPLATES = "tokenizer.chat_templates"
    NORMALIZER_LOWERCASE = "tokenizer.ggml.normalizer.lowercase"
    NORMALIZER_STRIP_ACCENTS = "tokenizer.ggml.normalizer.strip_accents"

    @staticmethod
    def arch(key: str, arch: str) -> str:
        return key.format(arch=arch)
