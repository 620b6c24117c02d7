"""Phi-3 / Phi-4: NEOX RoPE over `rope.dimension_count` dims; Q, K and V fused in one
`attn_qkv` tensor and the FFN's gate and up in one `ffn_up` (gate rows first), which the
loader splits into row blocks (no copy); LongRoPE (the 128K models): per-pair
`rope_factors_long` / `rope_factors_short` picked by the context against
`rope.scaling.original_context_length`, cos and sin times `rope.scaling.attn_factor`.
llama.cpp runs Phi-3's sliding window as full attention, and so do we."""

from . import Family

FAMILY = Family("phi3", rope_neox=True)
