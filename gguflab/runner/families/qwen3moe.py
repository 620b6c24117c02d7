"""Qwen3-MoE: Qwen3's attention (q/k norms, NEOX RoPE) with a mixture-of-experts FFN in
every layer: a softmax router (`ffn_gate_inp`) picks `expert_used_count` of
`expert_count` experts per token, their weights renormalised to sum to one, and each
expert is a SwiGLU `expert_feed_forward_length` wide, stacked in 3-D
`ffn_{gate,up,down}_exps`."""

from . import Family

FAMILY = Family("qwen3moe", rope_neox=True, qk_norm=True)
