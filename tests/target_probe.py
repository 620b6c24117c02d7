"""Every llvmlite kernel family on fixed inputs, saved to one .npz.

    python tests/target_probe.py OUT.npz WORKDIR

`test_cross_target.py` runs this under several JIT targets (`GGUFLAB_CPU`,
`GGUFLAB_OPTIMISE_FOR`) and compares the files bit for bit: the products of every weight
type (decode, 2-4 tokens, prompt tiles and their remainders), every quantizer and
dequantizer, the half conversions, and whole forward passes of a tiny model on the CPU and
on the host-emulated GPU (whose kernels are the device's, compiled for the host). Inputs
come from fixed seeds; the model files are written once into WORKDIR and reused.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from gguflab import quant
from gguflab.gguf import GGMLType
from gguflab.jit import f16_to_f32, f32_to_f16, host_cpu
from gguflab.runner.kernels import SUPPORTED_TYPES, matmul

N_IN, N_OUT = 512, 37  # K-quant rows (256 | N_IN); an odd row count leaves tile remainders
TOKENS = (1, 3, 9)  # one-token decode, the 2-4 token kernel, prompt tiles with a remainder
PROMPT, STEPS = [3, 17, 42, 99, 5, 8, 120, 64, 31], [7, 200, 13]
MIXES = ("F16", "Q8_0", "Q4_0", "Q4_K_M", "Q5_K_S", "Q2_K")


def _weight(t: GGMLType, wf: np.ndarray) -> np.ndarray:
    if t == GGMLType.F32:
        return wf
    if t == GGMLType.F16:
        return wf.astype(np.float16)
    qt = quant.get(t)
    row = qt.row_quantizer or qt.requires_imatrix  # (see `kernels`: not compiled here)
    return qt.quantize(wf, imatrix=_IMATRIX if qt.requires_imatrix else None, reference=row)


# importance weights for the types that llama.cpp quantizes only with one
_IMATRIX = np.random.default_rng(99).uniform(0.1, 2.0, N_IN).astype(np.float32)


def kernels(out: dict) -> None:
    rng = np.random.default_rng(1234)
    x = rng.standard_normal((max(TOKENS), N_IN)).astype(np.float32)
    x[:, 5] *= 30  # an outlier column, as real activations have
    wf = (rng.standard_normal((N_OUT, N_IN)) * 0.05).astype(np.float32)
    for t in SUPPORTED_TYPES:
        w = _weight(t, wf)
        for n in TOKENS:
            out[f"matmul/{t.name}/{n}"] = matmul(w, t, x[:n])
    for t, qt in quant.REGISTRY.items():
        # the quantizers built per block; the row kernels (weighted, i-quant) are big to
        # compile four times over, and test_cross_target pins their IR and flags instead
        row = qt.row_quantizer or qt.requires_imatrix
        q = _weight(t, x) if row else qt.quantize(x)
        if not row:
            out[f"quantize/{t.name}"] = q.view(np.uint8)
        out[f"dequantize/{t.name}"] = qt.dequantize(q)
    h = f32_to_f16(x * 1000)
    out["f32_to_f16"], out["f16_to_f32"] = h, f16_to_f32(h)


def _models(workdir: Path) -> dict[str, Path]:
    from gguflab.quant.mixes import parse_mix
    from gguflab.quant.pipeline import QuantizeOptions, quantize_model
    from gguflab.synth import SynthConfig, write_synthetic_llama

    src = workdir / "F16.gguf"
    if not src.exists():
        write_synthetic_llama(src, SynthConfig(n_layer=2, n_embd=256, n_ff=512, n_head=4,
                                               n_head_kv=2, n_vocab=256))
    paths = {"F16": src}
    for mix in MIXES[1:]:
        paths[mix] = p = workdir / f"{mix}.gguf"
        if not p.exists():
            for _ in quantize_model(src, p, parse_mix(mix), QuantizeOptions()):
                pass
    return paths


def forward_passes(out: dict, workdir: Path) -> None:
    """Prompt logits, then teacher-forced decode steps: on the CPU, and with every layer and
    the head on the host-emulated GPU."""
    from gguflab.runner.cuda.device import HostDevice
    from gguflab.runner.cuda.layers import GpuLayers, forward_offloaded
    from gguflab.runner.model import Model

    for mix, path in _models(workdir).items():
        m = Model(path)
        for where in ("cpu", "gpu"):
            gpu = GpuLayers(m, list(range(m.hp.n_layer)), 32, HostDevice(), output=True) \
                if where == "gpu" else None
            cache = m.new_cache(32)
            logits = [forward_offloaded(m, gpu, PROMPT, cache, all_logits=True)]
            logits += [forward_offloaded(m, gpu, [t], cache)[None] for t in STEPS]
            out[f"forward/{where}/{mix}"] = np.vstack(logits)
            if gpu is not None:
                gpu.close()


def main(argv: list[str]) -> None:
    out_path, workdir = argv[0], Path(argv[1])
    out: dict[str, np.ndarray] = {}
    kernels(out)
    forward_passes(out, workdir)
    cpu = host_cpu()
    np.savez(out_path, **out, _target=np.array(f"{cpu.name} {cpu.features}"))


if __name__ == "__main__":
    main(sys.argv[1:])
