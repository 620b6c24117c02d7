"""Memory while quantizing is bounded by the largest tensor, not by the model: quantizing
a model with 8x the layers must not raise the peak resident set noticeably."""

from __future__ import annotations

import subprocess
import sys

from gguflab.synth import SynthConfig, write_synthetic_llama

CODE = """
import resource, sys
from gguflab.quant.mixes import parse_mix
from gguflab.quant.pipeline import QuantizeOptions, quantize_model
for _ in quantize_model(sys.argv[1], sys.argv[2], parse_mix(sys.argv[3]),
                         QuantizeOptions(overwrite=True)):
    pass
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def peak_kib(src, dst, mix):
    r = subprocess.run([sys.executable, "-c", CODE, str(src), str(dst), mix],
                       capture_output=True, text=True, check=True)
    return int(r.stdout.split()[-1])


def test_peak_memory_does_not_grow_with_layers(tmp_path):
    base = dict(n_embd=1024, n_ff=2816, n_head=8, n_head_kv=2, n_vocab=4096)
    small = write_synthetic_llama(tmp_path / "small.gguf", SynthConfig(n_layer=2, **base))
    big = write_synthetic_llama(tmp_path / "big.gguf", SynthConfig(n_layer=16, **base))
    largest = 2816 * 1024 * 4  # bytes of the largest tensor as float32
    for mix in ("Q4_K_M", "BF16"):
        a = peak_kib(small, tmp_path / "a.gguf", mix)
        b = peak_kib(big, tmp_path / "b.gguf", mix)
        # 14 more layers are ~80 MB of F16 input: none of it may stay resident
        print(f"{mix}: peak {a / 1024:.0f} MiB with 2 layers, {b / 1024:.0f} MiB with 16")
        assert b - a < largest // 1024, (mix, a, b)
