"""The GGUF file format: constants, a validating memmap reader, a streaming atomic writer."""

from .constants import (
    DEFAULT_ALIGNMENT,
    QK_K,
    TYPES,
    GGMLType,
    Keys,
    LlamaFileType,
    TypeInfo,
    ValueType,
    tensor_bytes,
    type_by_name,
    type_info,
)
from .reader import GGUFError, GGUFReader, ReaderTensor, Value
from .writer import GGUFWriter, TensorSpec, infer_value, write_gguf

__all__ = [
    "DEFAULT_ALIGNMENT",
    "QK_K",
    "TYPES",
    "GGMLType",
    "Keys",
    "LlamaFileType",
    "TypeInfo",
    "ValueType",
    "tensor_bytes",
    "type_by_name",
    "type_info",
    "GGUFError",
    "GGUFReader",
    "ReaderTensor",
    "Value",
    "GGUFWriter",
    "TensorSpec",
    "infer_value",
    "write_gguf",
]
