"""convert_model: a Hugging Face folder -> GGUF, one tensor (one slab of rows) at a time,
yielding events; named, typed and laid out as llama.cpp's converter does it."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from ..errors import UserError
from ..events import Event, Finished, Log, Progress, Started, TensorDone
from ..gguf import GGMLType, GGUFWriter, Keys, LlamaFileType, TensorSpec, Value, ValueType
from ..gguf.constants import QUANTIZATION_VERSION
from ..quant import get
from ..quant.pipeline import check_output_path
from .arch import HParams, gguf_name, llama3_rope_factors, load_hparams, permute_qk
from .checkpoints import Checkpoint, load_f32
from .metadata import general_keys, load_metadata
from .tokenizer import tokenizer_metadata

OUTTYPES = {"f32": (GGMLType.F32, LlamaFileType.ALL_F32),
            "f16": (GGMLType.F16, LlamaFileType.MOSTLY_F16),
            "bf16": (GGMLType.BF16, LlamaFileType.MOSTLY_BF16),
            "q8_0": (GGMLType.Q8_0, LlamaFileType.MOSTLY_Q8_0)}
SLAB_ELEMENTS = 1 << 24  # rows converted 64 MiB of float32 at a time
_SRC_TYPES = {"F32": GGMLType.F32, "F16": GGMLType.F16, "BF16": GGMLType.BF16}


@dataclass
class ConvertOptions:
    outtype: str = "f16"  # f32 | f16 | bf16 | q8_0 | auto
    vocab_only: bool = False
    dry_run: bool = False
    overwrite: bool = False
    threads: int | None = None


@dataclass
class TensorJob:
    hf_name: str
    name: str
    shape: tuple[int, ...]  # numpy order
    src_dtype: str
    dst: GGMLType
    permute_heads: int = 0  # 0: as is; else n_head for the Q/K rotary permutation
    data: np.ndarray | None = None  # generated tensors (rope_freqs)

    @property
    def spec(self) -> TensorSpec:
        return TensorSpec(self.name, self.shape, self.dst)


def resolve_outtype(outtype: str, ckpt: Checkpoint) -> str:
    outtype = outtype.lower()
    if outtype == "auto":  # as llama.cpp: bf16 stays bf16, anything else becomes f16
        first = next((ckpt.info(n).dtype for n in ckpt.names()
                      if len(ckpt.info(n).shape) > 1), "F16")
        return "bf16" if first == "BF16" else "f16"
    if outtype not in OUTTYPES:
        raise UserError(f"unknown --outtype {outtype!r}; choose f32, f16, bf16, q8_0 or auto")
    return outtype


def default_outfile(folder: str, outtype: str) -> str:
    return os.path.join(folder, f"ggml-model-{outtype}.gguf")


def llama_cpp_order(ckpt: Checkpoint) -> list[str]:
    """The order llama.cpp's converter writes tensors in: weight file by weight file (sorted
    by file name), a safetensors file's tensors sorted by name, a PyTorch file's in the order
    of its state dict."""
    order = []
    for path, names in ckpt.names_by_file():
        order += sorted(names) if path.endswith(".safetensors") else names
    return order


def plan_tensors(hp: HParams, ckpt: Checkpoint, outtype: str) -> list[TensorJob]:
    dst_type = OUTTYPES[outtype][0]
    jobs = []
    factors = llama3_rope_factors(hp)
    if factors is not None:
        jobs.append(TensorJob("(rope scaling)", "rope_freqs.weight", factors.shape, "F32",
                              GGMLType.F32, data=factors))
    seen = set()
    for hf in llama_cpp_order(ckpt):
        name = gguf_name(hf)
        if name is None:
            continue
        info = ckpt.info(hf)
        if info.dtype not in _SRC_TYPES:
            raise UserError(f"{hf}: tensor type {info.dtype} cannot be converted")
        want = hp.expected_shape(name)
        if want is not None and tuple(info.shape) != want:
            raise UserError(f"{hf} has shape {list(info.shape)}, config.json implies {list(want)}")
        if name in seen:
            raise UserError(f"two checkpoint tensors map to {name}")
        seen.add(name)
        # norms, biases and vectors stay F32 as llama.cpp keeps them
        if len(info.shape) <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight"):
            dst = GGMLType.F32
        elif dst_type == GGMLType.Q8_0 and info.shape[-1] % 32:
            dst = GGMLType.F16  # Q8_0 needs rows of whole blocks: llama.cpp falls back to F16
        else:
            dst = dst_type
        heads = 0
        if hp.arch.permute_qk and name.split(".")[-2] in ("attn_q", "attn_k"):
            heads = hp.n_head if name.split(".")[-2] == "attn_q" else hp.n_head_kv
        jobs.append(TensorJob(hf, name, tuple(info.shape), info.dtype, dst, heads))
    missing = [n for n in ("token_embd.weight", "output_norm.weight") if n not in seen]
    for i in range(hp.n_layer):
        missing += [f"blk.{i}.{s}.weight" for s in ("attn_q", "attn_k", "attn_v", "attn_output",
                                                      "ffn_gate", "ffn_up", "ffn_down",
                                                      "attn_norm", "ffn_norm")
                    if f"blk.{i}.{s}.weight" not in seen]
    if missing:
        raise UserError(f"checkpoint lacks {len(missing)} tensors the config needs "
                        f"(first: {missing[0]})")
    return jobs


def general_metadata(folder: str, hp: HParams, n_params: int) -> dict[str, Value]:
    """general.architecture, general.type, then what the model card, config.json, the folder's
    name and generation_config.json say the model is (name, size label, license ...)."""
    return {Keys.ARCHITECTURE: Value(ValueType.STRING, hp.arch.gguf_arch),
            Keys.TYPE: Value(ValueType.STRING, "model"),
            **general_keys(load_metadata(folder, hp.config, n_params))}


def convert_model(folder: str | os.PathLike, outfile: str | os.PathLike | None = None,
                  opts: ConvertOptions | None = None) -> Iterator[Event]:
    """Convert an HF folder, yielding Started, Log, TensorDone per tensor and Finished.
    Closing the generator early removes the partial output."""
    opts = opts or ConvertOptions()
    folder = os.fspath(folder)
    t0 = time.perf_counter()
    if not os.path.isdir(folder):
        raise UserError(f"{folder}: not a folder")
    hp = load_hparams(folder)
    tok = tokenizer_metadata(folder, hp.n_vocab)
    with Checkpoint(folder) as ckpt:
        outtype = resolve_outtype(opts.outtype, ckpt)
        jobs = [] if opts.vocab_only else plan_tensors(hp, ckpt, outtype)
        out = os.fspath(outfile) if outfile else default_outfile(folder, outtype)
        if not opts.dry_run:
            check_output_path(out, opts.overwrite)
        n_params = sum(int(np.prod(j.shape)) for j in jobs)
        meta = general_metadata(folder, hp, n_params)
        meta.update(hp.metadata())
        meta[Keys.FILE_TYPE] = Value(ValueType.UINT32, int(OUTTYPES[outtype][1]))
        meta.update(hp.late_metadata())
        meta[Keys.QUANTIZATION_VERSION] = Value(ValueType.UINT32, QUANTIZATION_VERSION)
        meta.update(tok)

        total_in = sum(int(np.prod(j.shape)) * (4 if j.src_dtype == "F32" else 2) for j in jobs)
        yield Started("convert", folder, None if opts.dry_run else out, len(jobs), total_in,
                      {"outtype": outtype, "arch": hp.arch.gguf_arch, "n_params": n_params,
                       "vocab_only": opts.vocab_only})
        if hp.tie_embeddings and not any(j.name == "output.weight" for j in jobs):
            yield Log("info", "tied embeddings: no output.weight (llama.cpp reuses token_embd)")
        if opts.dry_run:
            for i, j in enumerate(jobs, 1):
                yield _done(i, len(jobs), j, 0.0)
            yield Finished(None, _stats(jobs, time.perf_counter() - t0, 0))
            return
        done = 0
        with GGUFWriter(out, meta, [j.spec for j in jobs], overwrite=opts.overwrite) as w:
            for i, j in enumerate(jobs, 1):
                t = time.perf_counter()
                yield from _write_tensor(w, ckpt, j, opts.threads, done, total_in)
                done += int(np.prod(j.shape)) * (4 if j.src_dtype == "F32" else 2)
                yield _done(i, len(jobs), j, time.perf_counter() - t)
        yield Finished(out, _stats(jobs, time.perf_counter() - t0, os.path.getsize(out)))


def _write_tensor(w: GGUFWriter, ckpt: Checkpoint, j: TensorJob, threads, done: int,
                  total: int):
    if j.data is not None:
        w.write_tensor(j.name, get(j.dst).quantize(j.data.reshape(1, -1)))
        return
    src = ckpt.load(j.hf_name)
    if j.permute_heads:
        src = np.ascontiguousarray(permute_qk(src, j.permute_heads))
    if j.src_dtype == "F16" and j.dst == GGMLType.F16 or \
            j.src_dtype == "BF16" and j.dst == GGMLType.BF16 or \
            j.src_dtype == "F32" and j.dst == GGMLType.F32:
        w.write_tensor(j.name, np.ascontiguousarray(src))  # same type: bytes as they are
        return
    rows = src.reshape(-1, src.shape[-1]) if src.ndim > 1 else src.reshape(1, -1)
    slab = max(1, SLAB_ELEMENTS // rows.shape[1])
    qt = get(j.dst)
    w.begin_tensor(j.name)
    for a in range(0, rows.shape[0], slab):
        x = load_f32(np.ascontiguousarray(rows[a:a + slab]), j.src_dtype)
        w.write_part(qt.quantize(x, threads))
        if a + slab < rows.shape[0]:
            yield Progress(0, 0, done + int((a + slab) / rows.shape[0] * x.nbytes), total)
    w.end_tensor()


def _done(i: int, total: int, j: TensorJob, seconds: float) -> TensorDone:
    n = int(np.prod(j.shape))
    src_bytes = n * (4 if j.src_dtype == "F32" else 2)
    return TensorDone(index=i, total=total, name=j.name, shape=list(reversed(j.shape)),
                      src_type=j.src_dtype, dst_type=j.dst.name, bytes_in=src_bytes,
                      bytes_out=j.spec.nbytes, seconds=seconds,
                      converted=_SRC_TYPES.get(j.src_dtype) != j.dst)


def _stats(jobs: list[TensorJob], seconds: float, size: int) -> dict:
    n = sum(int(np.prod(j.shape)) for j in jobs)
    out = sum(j.spec.nbytes for j in jobs)
    return {"n_tensors": len(jobs), "n_params": n, "bytes": out, "seconds": seconds,
            "file_size": size, "bpw": 8 * out / n if n else 0.0}
