"""`gguflab convert` for the families beyond LLaMA/Qwen2/Qwen3, against llama.cpp's own
converter (convert_hf_to_gguf.py, run once for every case): Mixtral (llama with stacked
experts), Qwen3-MoE, Gemma 2, Gemma 3 (text), Qwen2 with YaRN rope scaling, Phi-3 (fused
qkv / gate_up, LongRoPE factors) and Phi-4 (its GPT-2 tokenizer): the same file, byte for
byte; two of them from config.json files as transformers writes them (which llama.cpp reads
through AutoConfig). Then, on our F32 file of each family, our runner's logits against
llama.cpp's, within twice llama.cpp's own spread (flash attention on against off); and the
memory a stack of experts takes while written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from agreement import assert_same_top1_where_clear
from hf_models import llama_config, random_weights, write_folder, write_smollm2_tokenizer
from llama_converter import convert_many, first_difference, llama_cpp_src
from llama_ref import LLAMA_SPREADS

from gguflab.convert.pipeline import ConvertOptions, convert_model
from gguflab.errors import UserError
from gguflab.gguf import GGMLType, GGUFReader, Keys

TOKENS = [1, 504, 3458, 282, 4649, 314, 7042, 30, 378, 3458, 282, 8295, 314, 4110, 30, 378]


def mixtral_config(**kw) -> dict:
    return llama_config("MixtralForCausalLM", n_ff=96, num_local_experts=4,
                        num_experts_per_tok=2, rope_theta=1000000.0, **kw)


def qwen3moe_config(n_vocab: int) -> dict:
    return llama_config("Qwen3MoeForCausalLM", n_vocab=n_vocab, head_dim=32, num_experts=4,
                        num_experts_per_tok=2, moe_intermediate_size=64, norm_topk_prob=True,
                        decoder_sparse_step=1, mlp_only_layers=[], rope_theta=1000000.0,
                        bos_token_id=1, eos_token_id=2)


def gemma2_config() -> dict:
    return llama_config("Gemma2ForCausalLM", n_layer=4, head_dim=32, tie=True, rms_norm_eps=1e-6,
                        hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=32,
                        sliding_window=4, attn_logit_softcapping=50.0,
                        final_logit_softcapping=30.0, bos_token_id=1, eos_token_id=2)


def gemma3_config(**kw) -> dict:
    return llama_config("Gemma3ForCausalLM", n_layer=7, head_dim=32, tie=True, rms_norm_eps=1e-6,
                        hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=32,
                        sliding_window=4, sliding_window_pattern=6, rope_theta=1000000.0,
                        rope_local_base_freq=10000.0, final_logit_softcapping=None,
                        attn_logit_softcapping=None, bos_token_id=1, eos_token_id=2, **kw)


PHI3_TOKENIZER_CONFIG = {
    "bos_token": "<s>", "eos_token": "<|endoftext|>", "unk_token": "<unk>",
    "pad_token": "<|endoftext|>", "add_bos_token": False, "add_eos_token": False,
    "tokenizer_class": "LlamaTokenizer",
    "added_tokens_decoder": {
        "0": {"content": "<unk>", "special": True}, "1": {"content": "<s>", "special": True},
        "2": {"content": "</s>", "special": False},
        "32000": {"content": "<|endoftext|>", "special": True},
        "32001": {"content": "<|assistant|>", "special": True},
        "32005": {"content": "<|placeholder\u2581one|>", "special": False},
        "32007": {"content": "<|end|>", "special": True},
        "32010": {"content": "<|user|>", "special": True}},
    "chat_template": "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n"
                     "{% endfor %}<|assistant|>\n",
}


def phi3_config(**kw) -> dict:
    return llama_config("Phi3ForCausalLM", **{"n_vocab": 32064, "n_head_kv": 4,
                                              "original_max_position_embeddings": 256,
                                              "sliding_window": 2047, "rope_scaling": None,
                                              "bos_token_id": 1, "eos_token_id": 32000, **kw})


def _as(folder: Path, weights: dict, dtype: str) -> None:
    """Rewrite the folder's weights in a half-precision type (torch writes bf16)."""
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    t = {"bf16": torch.bfloat16, "f16": torch.float16}[dtype]
    save_file({k: torch.from_numpy(v).to(t) for k, v in weights.items()},
              str(folder / "model.safetensors"))


def _sharded(folder: Path, weights: dict) -> None:
    """Two shards that split layer 0's experts: its stacks come where the second shard
    brings its last expert."""
    from safetensors.numpy import save_file

    (folder / "model.safetensors").unlink()
    names = sorted(weights)
    cut = next(i for i, n in enumerate(names) if ".experts.2." in n)
    shards = {"model-00001-of-00002.safetensors": names[:cut],
              "model-00002-of-00002.safetensors": names[cut:]}
    for fname, keys in shards.items():
        save_file({k: weights[k] for k in keys}, str(folder / fname))
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: s for s, ks in shards.items() for k in ks}}))


def _transformers_config(folder: Path, kind: str, arch: str, **kw) -> dict:
    """config.json as transformers writes it (model_type, rope_parameters, every default):
    llama.cpp's converter then reads it through AutoConfig."""
    transformers = pytest.importorskip("transformers")
    c = getattr(transformers, kind)(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                    num_key_value_heads=2, head_dim=32,
                                    max_position_embeddings=256, **kw)
    c.architectures = [arch]
    c.save_pretrained(folder)
    return json.loads((folder / "config.json").read_text())


def _build(root: Path, spm: Path, smollm2: str) -> dict[str, Path]:
    tok = {k: v for k, v in GGUFReader(smollm2).metadata.items() if k.startswith("tokenizer.")}
    n_bpe = len(tok[Keys.TOKENS].value)
    f: dict[str, Path] = {}

    cfg = mixtral_config()
    w = random_weights(cfg, seed=31)
    f["mixtral"] = write_folder(root / "tiny-mixtral", cfg, w, spm)
    f["mixtral-sharded"] = write_folder(root / "Mixtral-8x7B-Instruct-v0.1", cfg, w, spm)
    _sharded(f["mixtral-sharded"], w)

    cfg = qwen3moe_config(n_bpe)
    f["qwen3moe"] = write_folder(root / "Qwen3-30B-A3B", cfg, random_weights(cfg, seed=32))
    write_smollm2_tokenizer(f["qwen3moe"], tok)

    cfg = gemma2_config()
    w = random_weights(cfg, seed=33)
    f["gemma2"] = write_folder(root / "gemma-2-2b-it", cfg, w, spm)
    f["gemma2-bf16"] = write_folder(root / "gemma2-bf16", cfg, w, spm)
    _as(f["gemma2-bf16"], w, "bf16")

    cfg = gemma3_config(rope_scaling={"rope_type": "linear", "factor": 8.0})
    w = random_weights(cfg, seed=34)
    f["gemma3"] = write_folder(root / "gemma-3-1b-it", cfg, w, spm)
    f["gemma3-f16"] = write_folder(root / "gemma3-f16", cfg, w, spm)
    _as(f["gemma3-f16"], w, "f16")
    cfg = gemma3_config(n_vocab=n_bpe)  # no tokenizer.model: the BPE vocab
    f["gemma3-bpe"] = write_folder(root / "gemma3-bpe", cfg, random_weights(cfg, seed=35))
    write_smollm2_tokenizer(f["gemma3-bpe"], tok)

    d = root / "gemma3-transformers"
    cfg = _transformers_config(d, "Gemma3TextConfig", "Gemma3ForCausalLM", vocab_size=32000,
                               num_hidden_layers=7, sliding_window=4,
                               rope_scaling={"rope_type": "linear", "factor": 8.0})
    f["gemma3-hf"] = write_folder(d, cfg, random_weights(cfg, seed=40), spm)
    d = root / "qwen3moe-transformers"
    cfg = _transformers_config(d, "Qwen3MoeConfig", "Qwen3MoeForCausalLM", vocab_size=n_bpe,
                               num_hidden_layers=2, num_experts=4, num_experts_per_tok=2,
                               moe_intermediate_size=64)
    f["qwen3moe-hf"] = write_folder(d, cfg, random_weights(cfg, seed=41))
    write_smollm2_tokenizer(f["qwen3moe-hf"], tok)

    for name, scaling in (
            ("qwen2-yarn", {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}),
            ("qwen2-yarn-params", {"rope_type": "yarn", "factor": 2.0, "beta_fast": 32.0,
                                   "beta_slow": 1.0, "attention_factor": 1.1,
                                   "original_max_position_embeddings": 128})):
        cfg = llama_config("Qwen2ForCausalLM", tie=True, rope_theta=1000000.0,
                           rope_scaling=scaling)
        f[name] = write_folder(root / name, cfg, random_weights(cfg, seed=36, bias=True), spm)

    cfg = phi3_config()
    f["phi3"] = write_folder(root / "Phi-3-mini-4k-instruct", cfg, random_weights(cfg, seed=37),
                             spm, PHI3_TOKENIZER_CONFIG)
    rng = np.random.default_rng(0)
    # trained on 128 tokens: llama.cpp's 64-token context, padded to 256, takes the long factors
    longrope = {"type": "longrope", "long_factor": (1 + 3 * rng.random(8)).tolist(),
                "short_factor": (1 + 0.1 * rng.random(8)).tolist()}
    cfg = phi3_config(max_position_embeddings=1024, original_max_position_embeddings=128,
                      rope_scaling=longrope)
    f["phi3-longrope"] = write_folder(root / "Phi-3-mini-128k-instruct", cfg,
                                      random_weights(cfg, seed=38), spm, PHI3_TOKENIZER_CONFIG)
    cfg = phi3_config(n_vocab=n_bpe, sliding_window=None, eos_token_id=2)
    f["phi4"] = write_folder(root / "phi-4", cfg, random_weights(cfg, seed=39))
    write_smollm2_tokenizer(f["phi4"], tok)
    return f


# (id, folder, outtype)
CASES = [
    ("mixtral-f32", "mixtral", "f32"),
    ("mixtral-f16", "mixtral", "f16"),
    ("mixtral-q8_0", "mixtral", "q8_0"),
    ("mixtral-sharded-experts-f16", "mixtral-sharded", "f16"),
    ("qwen3moe-f32", "qwen3moe", "f32"),
    ("qwen3moe-f16", "qwen3moe", "f16"),
    ("qwen3moe-bf16", "qwen3moe", "bf16"),
    ("gemma2-f32", "gemma2", "f32"),
    ("gemma2-f16", "gemma2", "f16"),
    ("gemma2-bf16-checkpoint-auto", "gemma2-bf16", "auto"),
    ("gemma3-f32", "gemma3", "f32"),
    ("gemma3-f16", "gemma3", "f16"),
    ("gemma3-f16-checkpoint-f32", "gemma3-f16", "f32"),
    ("gemma3-bpe-f16", "gemma3-bpe", "f16"),
    ("gemma3-transformers-config-f16", "gemma3-hf", "f16"),
    ("qwen3moe-transformers-config-f16", "qwen3moe-hf", "f16"),
    ("qwen2-yarn-f16", "qwen2-yarn", "f16"),
    ("qwen2-yarn-params-f32", "qwen2-yarn-params", "f32"),
    ("phi3-f32", "phi3", "f32"),
    ("phi3-f16", "phi3", "f16"),
    ("phi3-longrope-f16", "phi3-longrope", "f16"),
    ("phi4-gpt2-tokenizer-bf16", "phi4", "bf16"),
]


@pytest.fixture(scope="module")
def folders(module_tmp, fixtures, smollm2) -> dict[str, Path]:
    return _build(module_tmp("hf"), fixtures / "llama2-tokenizer.model", smollm2)


@pytest.fixture(scope="module")
def llama_cpp_outputs(folders, module_tmp) -> dict[str, Path]:
    """llama.cpp's file for every case, converted in one process."""
    llama_cpp_src()
    out = module_tmp("llama-cpp")
    refs = convert_many([(folders[f], t, out / f"{case}.gguf") for case, f, t in CASES])
    return {case: ref for (case, _, _), ref in zip(CASES, refs)}


@pytest.fixture(scope="module")
def ours(folders, module_tmp):
    """Our conversion of a folder (once per folder and outtype)."""
    root, done = module_tmp("ours"), {}

    def convert(folder: str, outtype: str) -> Path:
        if (folder, outtype) not in done:
            out = root / f"{folder}-{outtype}.gguf"
            list(convert_model(folders[folder], out, ConvertOptions(outtype=outtype)))
            done[folder, outtype] = out
        return done[folder, outtype]

    return convert


@pytest.mark.parametrize("case, folder, outtype", CASES, ids=[c for c, _, _ in CASES])
def test_same_file_as_llama_cpp(llama_cpp_outputs, ours, case, folder, outtype):
    ref = llama_cpp_outputs[case]
    assert first_difference(ours(folder, outtype), ref) is None, first_difference(
        ours(folder, outtype), ref)


def _tensors(path: Path) -> dict:
    return {t.name: t for t in GGUFReader(path)}


def test_experts_are_stacked_in_order_router_stays_f32(folders, ours):
    """What the byte comparison takes on trust: expert e of the stack is HF's expert e, and
    the router and the norms stay F32 in an F16 file."""
    from safetensors.numpy import load_file

    for folder, layout in (("mixtral", ("block_sparse_moe.experts", "w1", "w2", "w3")),
                           ("qwen3moe", ("mlp.experts", "gate_proj", "down_proj", "up_proj"))):
        hf = load_file(folders[folder] / "model.safetensors")
        t = _tensors(ours(folder, "f16"))
        prefix, gate, down, up = layout
        for gguf, proj in (("ffn_gate_exps", gate), ("ffn_down_exps", down), ("ffn_up_exps", up)):
            stack = t[f"blk.1.{gguf}.weight"]
            assert stack.type == GGMLType.F16 and stack.shape[0] == 4
            for x in range(4):
                want = hf[f"model.layers.1.{prefix}.{x}.{proj}.weight"].astype(np.float16)
                np.testing.assert_array_equal(stack.data[x], want)
        assert t["blk.1.ffn_gate_inp.weight"].type == GGMLType.F32
        assert t["blk.1.ffn_norm.weight"].type == GGMLType.F32
    r = GGUFReader(ours("qwen3moe", "f16"))
    assert (r.get("qwen3moe.expert_count"), r.get("qwen3moe.expert_used_count"),
            r.get("qwen3moe.expert_feed_forward_length")) == (4, 2, 64)
    assert GGUFReader(ours("mixtral-sharded", "f16")).get(Keys.SIZE_LABEL) == "8x7B"
    assert GGUFReader(ours("mixtral", "f16")).get(Keys.SIZE_LABEL).startswith("4x")


def test_gemma_norms_are_one_plus_w_and_no_output(folders, ours):
    from safetensors.numpy import load_file

    hf = load_file(folders["gemma2"] / "model.safetensors")
    t = _tensors(ours("gemma2", "f32"))
    assert "output.weight" not in t
    for hf_name, gguf in (("input_layernorm", "attn_norm"),
                          ("post_attention_layernorm", "post_attention_norm"),
                          ("pre_feedforward_layernorm", "ffn_norm"),
                          ("post_feedforward_layernorm", "post_ffw_norm")):
        np.testing.assert_array_equal(t[f"blk.2.{gguf}.weight"].data,
                                      hf[f"model.layers.2.{hf_name}.weight"] + np.float32(1))
    r = GGUFReader(ours("gemma3", "f32"))
    assert r.get("gemma3.rope.freq_base") == 1e6 and r.get("gemma3.rope.freq_base_swa") == 1e4
    assert r.get("gemma3.attention.sliding_window") == 4


def test_unsupported_architecture_names_every_family(folders, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"architectures": ["GPTNeoXForCausalLM"]}))
    with pytest.raises(UserError, match="unsupported architecture GPTNeoXForCausalLM") as e:
        list(convert_model(bad, tmp_path / "out.gguf", ConvertOptions()))
    msg = str(e.value)
    assert "\n" not in msg
    for name in ("MixtralForCausalLM", "Qwen3MoeForCausalLM", "Gemma2ForCausalLM",
                 "Gemma3ForCausalLM", "Phi3ForCausalLM"):
        assert name in msg


def test_missing_expert_is_one_clear_error(folders, tmp_path):
    from safetensors.numpy import load_file, save_file

    src = folders["mixtral"]
    d = tmp_path / "broken-mixtral"
    d.mkdir()
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            (d / f.name).write_bytes(f.read_bytes())
    w = load_file(src / "model.safetensors")
    del w["model.layers.1.block_sparse_moe.experts.3.w2.weight"]
    save_file(w, str(d / "model.safetensors"))
    with pytest.raises(UserError, match=r"layer 1: the checkpoint has 11 of its 12 expert"):
        list(convert_model(d, tmp_path / "out.gguf", ConvertOptions()))
    assert not list(tmp_path.glob("out.gguf*"))


# our runner on the converted files


def _llama_logits(path: Path, flash_attn: bool = False) -> np.ndarray:
    llama_cpp = pytest.importorskip("llama_cpp")
    m = llama_cpp.Llama(str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=2,
                        flash_attn=flash_attn)
    m.eval(TOKENS)
    return np.array(m.scores[: len(TOKENS)], np.float64)


@pytest.mark.parametrize("folder", ["mixtral", "qwen3moe", "gemma2", "gemma3", "qwen2-yarn",
                                    "qwen2-yarn-params", "phi3", "phi3-longrope", "phi4"])
def test_runner_logits_match_llama_cpp_on_converted_file(ours, folder):
    from gguflab.runner.model import Model

    path = ours(folder, "f32")
    m = Model(str(path))
    got = m.forward(TOKENS, m.new_cache(64), all_logits=True)
    ref = _llama_logits(path)
    spread = np.abs(_llama_logits(path, flash_attn=True) - ref).max()
    noise = max(LLAMA_SPREADS * spread, 1e-4 * np.abs(ref).max())  # (a spread of 0 is luck)
    assert_same_top1_where_clear(ref, got, noise)


def test_stacking_reads_one_expert_at_a_time(fixtures, tmp_path):
    """Memory while writing a stack of experts is a few experts, never the whole stack:
    Python's allocation peak per tensor, from one TensorDone to the next."""
    import tracemalloc

    from gguflab.events import TensorDone

    cfg = mixtral_config(n_layer=1, tie=True) | {"intermediate_size": 1024,
                                                 "num_local_experts": 8}
    folder = write_folder(tmp_path / "big-experts", cfg, random_weights(cfg, seed=42),
                          fixtures / "llama2-tokenizer.model")
    expert = 1024 * 64 * 4  # one expert's F32 bytes; a stack is 8 of them
    peaks, base = {}, 0
    tracemalloc.start()
    try:
        for e in convert_model(folder, tmp_path / "out.gguf", ConvertOptions(outtype="f16")):
            if isinstance(e, TensorDone):
                now, peak = tracemalloc.get_traced_memory()
                peaks[e.name] = peak - base  # above what was held before the tensor
                base = now
                tracemalloc.reset_peak()
    finally:
        tracemalloc.stop()
    for name in ("ffn_gate_exps", "ffn_down_exps", "ffn_up_exps"):
        assert peaks[f"blk.0.{name}.weight"] < 3 * expert, peaks
