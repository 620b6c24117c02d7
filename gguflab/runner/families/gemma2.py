"""Gemma 2: embeddings times sqrt(n_embd); RMSNorm before and after attention and the FFN
(`post_attention_norm`, `post_ffw_norm`; the converter stores each norm weight + 1); a
GeGLU FFN (GELU, tanh form); attention logits soft-capped at 50 and output logits at 30
(`attn_logit_softcapping`, `final_logit_softcapping`); a 4096-token sliding window on every
other layer (0, 2, ...); q scaled by 1/sqrt(head_dim), or 1/sqrt(n_embd / n_head) for the
27B (46 layers), as llama.cpp does it; the output is the token embedding."""

from . import Family

FAMILY = Family("gemma2", rope_neox=True, embed_scale=True, gelu=True, post_norms=True,
                swa_pattern=2, swa_default=4096, attn_softcap=50.0, final_softcap=30.0,
                big_model_layers=46)
