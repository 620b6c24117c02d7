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
from .arch import F32_TENSORS, Generated, HParams, permute_qk
from .checkpoints import Checkpoint, load_f32
from .families import load_hparams
from .metadata import general_keys, load_metadata
from .tokenizer import embedding_vocab_rows, tokenizer_metadata

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


@dataclass(frozen=True)
class Piece:
    """A checkpoint tensor, or a part of one (an index: the first rows), read as one step."""

    hf_name: str
    index: tuple = ()


@dataclass
class TensorJob:
    name: str
    shape: tuple[int, ...]  # numpy order
    src_dtype: str
    dst: GGMLType
    pieces: tuple[Piece, ...] = ()  # concatenated: a stack of experts is one per expert
    permute_heads: int = 0  # 0: as is; else n_head for the Q/K rotary permutation
    shift: float = 0.0  # added to every value, in the checkpoint's float type (Gemma's norms)
    data: np.ndarray | None = None  # generated tensors (rope factors)

    @property
    def hf_name(self) -> str:
        if not self.pieces:
            return "(generated)"
        first = self.pieces[0].hf_name
        return first if len(self.pieces) == 1 else f"{first} (+{len(self.pieces) - 1})"

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


def _dst_type(name: str, shape: tuple[int, ...], dst: GGMLType) -> GGMLType:
    """llama.cpp's choice: norms, biases, vectors and the expert router stay F32; Q8_0 needs
    rows of whole blocks, else F16."""
    if len(shape) <= 1 or name.endswith(("_norm.weight", *F32_TENSORS)) or \
            not name.endswith(".weight"):
        return GGMLType.F32
    if dst == GGMLType.Q8_0 and shape[-1] % 32:
        return GGMLType.F16
    return dst


def _check_source(hp: HParams, hf: str, name: str, info) -> None:
    if info.dtype not in _SRC_TYPES:
        raise UserError(f"{hf}: tensor type {info.dtype} cannot be converted")
    want = hp.expected_shape(name)
    if want is not None and tuple(info.shape) != want:
        raise UserError(f"{hf} has shape {list(info.shape)}, config.json implies {list(want)}")


def _expert_stacks(hp: HParams, ckpt: Checkpoint, layer: int, found: dict[tuple[int, str], str],
                   dst: GGMLType) -> list[TensorJob]:
    """A layer's experts as llama.cpp stacks them: one 3-D tensor per projection, expert 0
    first, read one expert at a time when written."""
    jobs = []
    for proj, gguf in hp.arch.experts.order:
        name = f"blk.{layer}.{gguf}.weight"
        names = [found[(x, proj)] for x in range(hp.n_expert)]
        infos = [ckpt.info(n) for n in names]
        for n, info in zip(names, infos):
            _check_source(hp, n, name, info)
            if info.dtype != infos[0].dtype:
                raise UserError(f"{n} is {info.dtype}, {names[0]} {infos[0].dtype}: the experts "
                                f"of a layer must have one type")
        shape = (hp.n_expert, *infos[0].shape)
        jobs.append(TensorJob(name, shape, infos[0].dtype, _dst_type(name, shape, dst),
                              tuple(Piece(n) for n in names)))
    return jobs


def plan_tensors(hp: HParams, ckpt: Checkpoint, outtype: str, generated: Generated | None = None,
                 vocab_rows: int | None = None) -> list[TensorJob]:
    """Every tensor of the output, in llama.cpp's order: the generated ones, then the
    checkpoint's (experts stacked where a layer's last one comes). `vocab_rows`: the rows of
    token_embd a family that cuts it to the tokenizer keeps."""
    arch, dst_type = hp.arch, OUTTYPES[outtype][0]
    jobs = [TensorJob(name, data.shape, "F32", GGMLType.F32, data=data)
            for name, data in (generated.tensors if generated else ())]
    seen = {j.name for j in jobs}
    stack = arch.experts
    experts: dict[int, dict[tuple[int, str], str]] = {}  # layer -> (expert, projection) -> HF
    for hf in llama_cpp_order(ckpt):
        hit = stack.match(hf) if stack else None
        if hit is not None:
            layer, x, proj = hit
            projections = [p for p, _ in stack.order]
            if x >= hp.n_expert or proj not in projections:
                raise UserError(f"{hf}: not one of {hp.n_expert} experts' "
                                f"{'/'.join(projections)} (config.json's expert count)")
            found = experts.setdefault(layer, {})
            found[(x, proj)] = hf
            if len(found) == hp.n_expert * len(projections):
                for j in _expert_stacks(hp, ckpt, layer, experts.pop(layer), dst_type):
                    if j.name in seen:
                        raise UserError(f"two checkpoint tensors map to {j.name}")
                    seen.add(j.name)
                    jobs.append(j)
            continue
        name = arch.gguf_name(hf)
        if name is None:
            continue
        info = ckpt.info(hf)
        _check_source(hp, hf, name, info)
        if name in seen:
            raise UserError(f"two checkpoint tensors map to {name}")
        seen.add(name)
        shape, index = tuple(info.shape), ()
        if arch.embedding_vocab_rows and name == "token_embd.weight" and \
                vocab_rows is not None and vocab_rows < shape[0]:
            shape, index = (vocab_rows, *shape[1:]), (slice(0, vocab_rows),)
        heads = 0
        if arch.permute_qk and name.split(".")[-2] in ("attn_q", "attn_k"):
            heads = hp.n_head if name.split(".")[-2] == "attn_q" else hp.n_head_kv
        shift = arch.norm_shift if hf.endswith("norm.weight") else 0.0
        jobs.append(TensorJob(name, shape, info.dtype, _dst_type(name, shape, dst_type),
                              (Piece(hf, index),), heads, shift))
    for layer, found in experts.items():
        n = hp.n_expert * len(stack.order)
        raise UserError(f"layer {layer}: the checkpoint has {len(found)} of its {n} expert "
                        f"tensors")
    missing = [n for n in ("token_embd.weight", "output_norm.weight") if n not in seen]
    per_layer = arch.moe_layer_tensors if hp.n_expert else arch.layer_tensors
    for i in range(hp.n_layer):
        missing += [f"blk.{i}.{s}.weight" for s in per_layer if f"blk.{i}.{s}.weight" not in seen]
    if missing:
        raise UserError(f"checkpoint lacks {len(missing)} tensors the config needs "
                        f"(first: {missing[0]})")
    return jobs


def parameter_counts(jobs: list[TensorJob]) -> tuple[int, int, int]:
    """(all parameters, the parameters of a model with one expert, expert count), as
    llama.cpp counts them for the size label ("8x7B")."""
    total = shared = expert = expert_sum = n_stacks = 0
    for j in jobs:
        n = int(np.prod(j.shape))
        total += n
        if "_exps." in j.name and len(j.shape) >= 3:
            count = j.shape[-2 if ".bias" in j.name else -3]
            expert += n // count
            expert_sum += count
            n_stacks += 1
        else:
            shared += n
    return total, shared + expert, expert_sum // n_stacks if n_stacks else 0


def general_metadata(folder: str, hp: HParams, jobs: list[TensorJob],
                     early: dict[str, Value] | None = None) -> dict[str, Value]:
    """general.architecture, the keys llama.cpp sets while making tensors (`early`),
    general.type, then what the model card, config.json, the folder's name and
    generation_config.json say the model is (name, size label, license ...)."""
    n_params, one_expert, n_expert = parameter_counts(jobs)
    return {Keys.ARCHITECTURE: Value(ValueType.STRING, hp.arch.gguf_arch),
            **(early or {}),
            Keys.TYPE: Value(ValueType.STRING, "model"),
            **general_keys(load_metadata(folder, hp.config, n_params, n_expert, one_expert))}


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
    arch = hp.arch
    tok = tokenizer_metadata(folder, hp.n_vocab, scheme=arch.vocab,
                             spm_space_prefix=arch.spm_space_prefix)
    with Checkpoint(folder) as ckpt:
        outtype = resolve_outtype(opts.outtype, ckpt)
        generated = arch.generated(hp) if arch.generated and not opts.vocab_only else Generated()
        rows = (embedding_vocab_rows(folder, hp.n_vocab)
                if arch.embedding_vocab_rows and not opts.vocab_only else None)
        jobs = [] if opts.vocab_only else plan_tensors(hp, ckpt, outtype, generated, rows)
        out = os.fspath(outfile) if outfile else default_outfile(folder, outtype)
        if not opts.dry_run:
            check_output_path(out, opts.overwrite)
        n_params = parameter_counts(jobs)[0]
        meta = general_metadata(folder, hp, jobs, generated.keys)
        meta.update(hp.metadata(int(OUTTYPES[outtype][1])))
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


def _shifted(src: np.ndarray, dtype: str, shift: float) -> tuple[np.ndarray, str]:
    """src + shift as llama.cpp's converter computes it (torch): in float16 for an F16
    checkpoint, else in float32 (BF16 widened first)."""
    if dtype == "F16":
        return np.asarray(src, np.float16) + np.float16(shift), "F16"
    return load_f32(src, dtype) + np.float32(shift), "F32"


def _write_tensor(w: GGUFWriter, ckpt: Checkpoint, j: TensorJob, threads, done: int,
                  total: int):
    if j.data is not None:
        w.write_tensor(j.name, get(j.dst).quantize(j.data.reshape(1, -1)))
        return
    qt = get(j.dst)
    itemsize = 4 if j.src_dtype == "F32" else 2
    w.begin_tensor(j.name)
    for piece in j.pieces:  # one at a time: memory bounded by the largest piece
        src, dtype = ckpt.load(piece.hf_name)[piece.index], j.src_dtype
        if j.permute_heads:
            src = permute_qk(src, j.permute_heads)
        if j.shift:
            src, dtype = _shifted(src, dtype, j.shift)
        if _SRC_TYPES[dtype] == j.dst:
            w.write_part(np.ascontiguousarray(src))  # same type: bytes as they are
            done += src.size * itemsize
            continue
        rows = src.reshape(-1, src.shape[-1]) if src.ndim > 1 else src.reshape(1, -1)
        slab = max(1, SLAB_ELEMENTS // rows.shape[1])
        for a in range(0, rows.shape[0], slab):
            part = rows[a:a + slab]
            w.write_part(qt.quantize(load_f32(np.ascontiguousarray(part), dtype), threads))
            done += part.size * itemsize
            if a + slab < rows.shape[0] or piece is not j.pieces[-1]:  # TensorDone follows
                yield Progress(0, 0, done, total)
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
