"""llama.cpp's own reference quantizers, called in the libggml-base that llama-cpp-python
ships: the oracle for single rows of every type (`quantize_row_<t>_ref`,
`dequantize_row_<t>`)."""

from __future__ import annotations

import ctypes
import os
from functools import cache

import numpy as np
import pytest

from gguflab.gguf import GGMLType, type_info


@cache
def libggml() -> ctypes.CDLL:
    try:
        import llama_cpp
    except ImportError:
        pytest.skip("llama-cpp-python (the test oracle) is not installed")
    folder = os.path.join(os.path.dirname(llama_cpp.__file__), "lib")
    for name in ("libggml-base.so", "libggml-base.dylib", "ggml-base.dll"):
        path = os.path.join(folder, name)
        if os.path.exists(path):
            return ctypes.CDLL(path)
    pytest.skip(f"libggml-base not found in {folder}")


def ggml_name(t: GGMLType) -> str:
    """ggml's spelling in symbol names: q4_0, q4_K, iq2_xxs."""
    name = t.name.lower()
    return name[:-2] + "_K" if name.endswith("_k") else name


def ggml_quantize(t: GGMLType, x: np.ndarray) -> np.ndarray:
    """llama.cpp's reference quantizer on float32 rows `x` -> uint8 (rows, row_bytes)."""
    x = np.ascontiguousarray(x, np.float32)
    x2 = x.reshape(-1, x.shape[-1])
    info = type_info(t)
    out = np.zeros((x2.shape[0], info.row_bytes(x2.shape[1])), np.uint8)
    if t == GGMLType.F16:
        fn = libggml().ggml_fp32_to_fp16_row
    elif t == GGMLType.BF16:
        fn = libggml().ggml_fp32_to_bf16_row_ref
    else:
        fn = getattr(libggml(), f"quantize_row_{ggml_name(t)}_ref")
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    fn(x2.ctypes.data, out.ctypes.data, x2.size)
    return out.reshape(*x.shape[:-1], out.shape[-1])


def ggml_dequantize(t: GGMLType, q: np.ndarray, n_per_row: int) -> np.ndarray:
    """llama.cpp's dequantizer: uint8 rows -> float32 (rows, n_per_row)."""
    q = np.ascontiguousarray(q, np.uint8)
    q2 = q.reshape(-1, q.shape[-1])
    out = np.zeros((q2.shape[0], n_per_row), np.float32)
    if t == GGMLType.F16:
        fn = libggml().ggml_fp16_to_fp32_row
    elif t == GGMLType.BF16:
        fn = libggml().ggml_bf16_to_fp32_row
    else:
        fn = getattr(libggml(), f"dequantize_row_{ggml_name(t)}")
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    fn(q2.ctypes.data, out.ctypes.data, out.size)
    return out.reshape(*q.shape[:-1], n_per_row)


def sample_weights(n_rows: int, n_per_row: int, seed: int = 0) -> np.ndarray:
    """Weights that exercise the edge cases: normal rows, outliers, all-zero and constant
    blocks, tiny and huge magnitudes, negative-only and positive-only blocks."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n_rows, n_per_row)).astype(np.float32) * 0.02
    if n_rows >= 8:
        x[1, : n_per_row // 2] = 0.0
        x[2] = 1.0
        x[3] *= 1e-6
        x[4] = np.abs(x[4]) * 1000
        x[5] = -np.abs(x[5])
        x[6, ::7] = 3.0
        x[7] = rng.integers(-8, 8, n_per_row).astype(np.float32)
    return x


def llama_quantize(src: str, dst: str, ftype: int, *, allow_requantize: bool = False,
                   pure: bool = False, leave_output: bool = False, only_copy: bool = False,
                   output_tensor_type: int | None = None,
                   token_embedding_type: int | None = None, threads: int = 2) -> None:
    """llama.cpp's `llama_model_quantize` (what llama-quantize runs), via llama-cpp-python."""
    try:
        import llama_cpp
    except ImportError:
        pytest.skip("llama-cpp-python (the test oracle) is not installed")
    p = llama_cpp.llama_model_quantize_default_params()
    p.nthread = threads
    p.ftype = ftype
    p.allow_requantize = allow_requantize
    p.pure = pure
    p.quantize_output_tensor = not leave_output
    p.only_copy = only_copy
    if output_tensor_type is not None:
        p.output_tensor_type = output_tensor_type
    if token_embedding_type is not None:
        p.token_embedding_type = token_embedding_type
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(p))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize failed ({rc}) for {src} -> {dst}")


def ggml_gelu_table() -> np.ndarray:
    """ggml's CPU GELU table (fp16 bits of GELU at every fp16 input), as ggml_cpu_init
    fills it in the libggml-cpu llama-cpp-python ships."""
    try:
        import llama_cpp
    except ImportError:
        pytest.skip("llama-cpp-python (the test oracle) is not installed")
    lib = ctypes.CDLL(os.path.join(os.path.dirname(llama_cpp.__file__), "lib",
                                   "libggml-cpu.so"))
    lib.ggml_cpu_init()
    # when another libggml-cpu was loaded RTLD_GLOBAL first (the tool build's, by other
    # tests), this one's init fills that one's table, as the dynamic linker binds its
    # references: read the table the global scope names, as the init wrote it
    table = ctypes.c_uint16 * 65536
    try:
        return np.ctypeslib.as_array(table.in_dll(ctypes.CDLL(None), "ggml_table_gelu_f16"))
    except ValueError:
        return np.ctypeslib.as_array(table.in_dll(lib, "ggml_table_gelu_f16"))


def ggml_quantize_chunk(t: GGMLType, x: np.ndarray, imatrix: np.ndarray | None = None
                        ) -> np.ndarray:
    """llama.cpp's `ggml_quantize_chunk` (what llama-quantize calls for every tensor) on
    float32 rows, with one importance weight per column or none."""
    lib = libggml()
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    lib.ggml_quantize_init(int(t))
    x = np.ascontiguousarray(x, np.float32)
    x2 = x.reshape(-1, x.shape[-1])
    out = np.zeros((x2.shape[0], type_info(t).row_bytes(x2.shape[1])), np.uint8)
    fn = lib.ggml_quantize_chunk
    fn.restype = ctypes.c_size_t
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                   ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    w = None if imatrix is None else np.ascontiguousarray(imatrix, np.float32)
    fn(int(t), x2.ctypes.data, out.ctypes.data, 0, x2.shape[0], x2.shape[1],
       None if w is None else w.ctypes.data)
    return out.reshape(*x.shape[:-1], out.shape[-1])


# -- the CPU backend's products: llama.cpp's rounding of activations and its dot products --


class _TraitsCpu(ctypes.Structure):
    _fields_ = [("from_float", ctypes.c_void_p), ("vec_dot", ctypes.c_void_p),
                ("vec_dot_type", ctypes.c_int), ("nrows", ctypes.c_int64)]


_FROM_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)
_VEC_DOT = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.POINTER(ctypes.c_float), ctypes.c_size_t,
                            ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t,
                            ctypes.c_int)


@cache
def libggml_cpu() -> ctypes.CDLL:
    base = libggml()
    path = os.path.join(os.path.dirname(base._name), "libggml-cpu.so")
    if not os.path.exists(path):
        pytest.skip(f"libggml-cpu not found next to {base._name}")
    lib = ctypes.CDLL(path)
    lib.ggml_cpu_init.restype = None
    lib.ggml_cpu_init()  # the fp16 tables the conversions use
    lib.ggml_get_type_traits_cpu.restype = ctypes.POINTER(_TraitsCpu)
    lib.ggml_get_type_traits_cpu.argtypes = [ctypes.c_int]
    return lib


def ggml_vec_dot_type(t: GGMLType) -> GGMLType:
    """The type llama.cpp's CPU backend rounds a product's activations to for weight `t`."""
    return GGMLType(libggml_cpu().ggml_get_type_traits_cpu(int(t)).contents.vec_dot_type)


def ggml_from_float(t: GGMLType, x: np.ndarray) -> np.ndarray:
    """Rows of x as the CPU backend's `from_float` of type `t` writes them (uint8 rows)."""
    x = np.ascontiguousarray(x, np.float32).reshape(-1, x.shape[-1])
    info = type_info(t)
    out = np.zeros((x.shape[0], info.row_bytes(x.shape[1])), np.uint8)
    fn = _FROM_FLOAT(libggml_cpu().ggml_get_type_traits_cpu(int(t)).contents.from_float)
    for r in range(x.shape[0]):
        fn(x[r].ctypes.data, out[r].ctypes.data, x.shape[1])
    return out


def ggml_cpu_matmul(t: GGMLType, w: np.ndarray, x: np.ndarray) -> np.ndarray:
    """x @ W.T as llama.cpp's CPU backend computes it, one dot product at a time: x rounded
    by the vec_dot_type's `from_float`, then the type's `vec_dot` on each row pair. `w`: raw
    rows (uint8, or float16 for F16 / float32 for F32)."""
    traits = libggml_cpu().ggml_get_type_traits_cpu(int(t)).contents
    x = np.ascontiguousarray(x, np.float32).reshape(-1, x.shape[-1])
    n = x.shape[1]
    vdt = GGMLType(traits.vec_dot_type)
    xr = x if vdt == GGMLType.F32 else ggml_from_float(vdt, x)
    w = np.ascontiguousarray(w)
    dot = _VEC_DOT(traits.vec_dot)
    y = np.zeros((x.shape[0], w.shape[0]), np.float32)
    s = ctypes.c_float()
    for i in range(x.shape[0]):
        for r in range(w.shape[0]):
            dot(n, ctypes.byref(s), 0, w[r].ctypes.data, 0, xr[i].ctypes.data, 0, 1)
            y[i, r] = s.value
    return y
