"""Gemma 3 (text): Gemma 2's layer (scaled embeddings, pre and post norms, GeGLU) with
q/k norms and no attention soft-cap; 5 local layers to 1 global (sliding window pattern
6), the local ones with their own RoPE base (`rope.freq_base_swa`, default 10000) and no
rope scaling; an output soft-cap only if the file sets one; the 27B (62 layers) scales q by
1/sqrt(n_embd / n_head)."""

from . import Family

FAMILY = Family("gemma3", rope_neox=True, qk_norm=True, embed_scale=True, gelu=True,
                post_norms=True, swa_pattern=6, swa_own_rope=True, big_model_layers=62)
