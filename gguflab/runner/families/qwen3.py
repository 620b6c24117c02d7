"""Qwen3 (dense): NEOX RoPE, no biases, and an RMSNorm over each head of q and k
(`attn_q_norm.weight`, `attn_k_norm.weight`, head_dim wide) before RoPE; head_dim comes from
`attention.key_length`, not n_embd / n_head."""

from . import Family

FAMILY = Family("qwen3", rope_neox=True, qk_norm=True)
