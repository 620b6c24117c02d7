"""`gguflab convert` against llama.cpp's own converter (convert_hf_to_gguf.py from the llama.cpp
tree that llama-cpp-python vendors): the same Hugging Face folder gives the same file, byte
for byte: metadata keys in the same order with the same values, tensors in the same order,
types and bytes, the same padding."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import pytest
from hf_models import llama_config, random_weights, write_folder, write_smollm2_tokenizer
from llama_converter import convert_many, first_difference, llama_cpp_names, llama_cpp_src

from gguflab.convert.metadata import size_label, split_model_id, title_case
from gguflab.convert.pipeline import ConvertOptions, convert_model
from gguflab.errors import UserError
from gguflab.gguf import GGUFReader, Keys

QWEN25_CARD = """---
license: apache-2.0
license_link: https://huggingface.co/Qwen/Qwen2.5-0.5B-Instruct/blob/main/LICENSE
language:
- en
pipeline_tag: text-generation
base_model: Qwen/Qwen2.5-0.5B
tags:
- chat
library_name: transformers
---

# Qwen2.5-0.5B-Instruct

A model card body --- with dashes, which are not front matter.
"""

# Windows line ends, a folded multi-line value and a nested mapping llama.cpp ignores
LLAMA31_CARD = """---
language:
- en
- de
- fr
license: llama3.1
pipeline_tag: text-generation
tags:
- facebook
- meta
- pytorch
- llama
- llama-3
base_model: meta-llama/Meta-Llama-3.1-8B
extra_gated_prompt: >-
  A licence text that runs
  over several lines.
extra_gated_fields:
  First Name: text
  Country: country
---
Body.
""".replace("\n", "\r\n")

# every field llama.cpp reads from a card, in the shapes cards write them
EVERYTHING_CARD = """---
model_name: Everything Model
model_creator: Some Lab
version: v2.1
organization: some-lab
description: A model card that sets every field.
doi: 10.1234/abcd
repo_url: https://example.com/everything
license:
- mit
- apache-2.0
license_name: custom
base_model:
- https://huggingface.co/org-a/Base-Model-7B-v1.2
- https://example.com/other-model
- name: Custom Base
  organization: Custom Org
  repo_url: https://example.com/custom
datasets:
- HuggingFaceTB/smollm-corpus
- https://huggingface.co/datasets/org/data
- plain-dataset-name
- 42
tags: single-tag
pipeline_tag: text-generation
language:
- en
- no
model_type: llama
extra:
\tindented: with a tab
---
"""

EVERYTHING_SAMPLING = {"temperature": 0.6, "top_p": 0.9, "top_k": 40, "min_p": 0.05,
                       "penalty_last_n": 64, "repetition_penalty": 1.1, "mirostat": 2,
                       "mirostat_tau": 5.0, "mirostat_eta": 0.1, "sequence": "edkypmxt",
                       "xtc_probability": 0.0, "xtc_threshold": 0.1, "do_sample": True}


def _twin(src: Path, dst: Path, weights: bool = True, **config) -> Path:
    """Another folder with `src`'s tokenizer and weights (hard links; no weights when not
    `weights`) and its config.json changed by `config`."""
    dst.mkdir()
    for f in src.iterdir():
        if f.name != "config.json" and (weights or f.suffix != ".safetensors"):
            try:
                os.link(f, dst / f.name)
            except OSError:
                shutil.copy(f, dst / f.name)
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(config)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _build_folders(root: Path, spm: Path, smollm2: str) -> dict[str, Path]:
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    f = {}
    cfg = llama_config()
    w = random_weights(cfg, seed=1)
    f["llama"] = write_folder(root / "tiny-llama", cfg, w, spm)
    # the same weights as a PyTorch .bin (llama.cpp keeps its state dict's order) and as two
    # safetensors shards (shard by shard, each sorted by name; lm_head is in the second)
    f["bin"] = _twin(f["llama"], root / "tiny-llama-bin", weights=False)
    torch.save({k: torch.from_numpy(v) for k, v in w.items()}, f["bin"] / "pytorch_model.bin")
    f["sharded"] = _twin(f["llama"], root / "tiny-llama-sharded", weights=False)
    names = list(w)
    shards = {"model-00001-of-00002.safetensors": names[:len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for fname, keys in shards.items():
        save_file({k: torch.from_numpy(w[k]) for k in keys}, str(f["sharded"] / fname))
    (f["sharded"] / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: s for s, ks in shards.items() for k in ks}}))
    cfg = llama_config(rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                     "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                     "original_max_position_embeddings": 64})
    f["llama3-rope"] = write_folder(root / "llama3-rope", cfg, random_weights(cfg, seed=6), spm)
    cfg = llama_config(n_embd=80, n_head=5, n_head_kv=1)  # rows of 80 stay F16, not Q8_0
    f["odd-widths"] = write_folder(root / "odd-widths", cfg, random_weights(cfg, seed=8), spm)
    cfg = llama_config("Qwen2ForCausalLM", tie=True, rope_theta=1000000.0)
    f["qwen2"] = write_folder(root / "tiny-qwen2", cfg, random_weights(cfg, seed=2, bias=True),
                              spm)
    cfg = llama_config("Qwen3ForCausalLM", tie=True, head_dim=32, rope_theta=1000000.0)
    f["qwen3"] = write_folder(root / "tiny-qwen3", cfg, random_weights(cfg, seed=5), spm)
    cfg = llama_config()
    w = random_weights(cfg, seed=3)
    f["bf16"] = write_folder(root / "bf16", cfg, w, spm)
    save_file({k: torch.from_numpy(v).to(torch.bfloat16) for k, v in w.items()},
              str(f["bf16"] / "model.safetensors"))
    f["f16"] = write_folder(root / "f16", cfg, w, spm)
    save_file({k: torch.from_numpy(v).to(torch.float16) for k, v in w.items()},
              str(f["f16"] / "model.safetensors"))

    # byte-level BPE: SmolLM2's tokenizer.json, rebuilt from its GGUF
    keys = {k: v for k, v in GGUFReader(smollm2).metadata.items() if k.startswith("tokenizer.")}
    cfg = llama_config(n_vocab=len(keys[Keys.TOKENS].value), tie=True, bos_token_id=1,
                       eos_token_id=2)
    f["bpe"] = write_folder(root / "SmolLM2-135M-Instruct", cfg, random_weights(cfg, seed=4))
    write_smollm2_tokenizer(f["bpe"], keys)

    # general.* metadata: folder names, config.json's _name_or_path, model cards
    f["qwen25"] = _twin(f["qwen2"], root / "Qwen2.5-0.5B-Instruct")
    (f["qwen25"] / "README.md").write_text(QWEN25_CARD)
    (f["qwen25"] / "generation_config.json").write_text(json.dumps({
        "bos_token_id": 151643, "do_sample": True, "eos_token_id": [151645, 151643],
        "repetition_penalty": 1.05, "temperature": 0.7, "top_p": 0.8, "top_k": 20}))
    f["llama31"] = _twin(f["llama"], root / "Meta-Llama-3.1-8B-Instruct")
    (f["llama31"] / "README.md").write_bytes(LLAMA31_CARD.encode())
    f["mistral"] = _twin(f["llama"], root / "Mistral-7B-v0.1",
                         architectures=["MistralForCausalLM"],
                         _name_or_path="mistralai/Mistral-7B-v0.1")
    f["name_or_path"] = _twin(f["llama"], root / "model",
                              _name_or_path="HuggingFaceTB/SmolLM2-360M-Instruct")
    f["path_no_card"] = _twin(f["llama"], root / "Yi-1.5-9B-Chat-16K",
                              _name_or_path="/home/me/models/Yi-1.5-9B-Chat-16K")
    (f["path_no_card"] / "README.md").write_text("# Yi\n\nNo front matter here.\n")
    f["everything"] = _twin(f["llama"], root / "everything-model")
    (f["everything"] / "README.md").write_text(EVERYTHING_CARD)
    (f["everything"] / "generation_config.json").write_text(json.dumps(EVERYTHING_SAMPLING))
    return f


# (id, folder, outtype, vocab only)
CASES = [
    ("llama-spm-f32", "llama", "f32", False),
    ("llama-spm-f16", "llama", "f16", False),
    ("llama-spm-bf16", "llama", "bf16", False),
    ("llama-spm-q8_0", "llama", "q8_0", False),
    ("llama-spm-vocab-only", "llama", "f16", True),
    ("pytorch-bin-f16", "bin", "f16", False),
    ("sharded-safetensors-f16", "sharded", "f16", False),
    ("llama3-rope-freqs-f16", "llama3-rope", "f16", False),
    ("odd-widths-q8_0-falls-back-to-f16", "odd-widths", "q8_0", False),
    ("qwen2-bias-tied-f32", "qwen2", "f32", False),
    ("qwen2-bias-tied-q8_0", "qwen2", "q8_0", False),
    ("qwen3-head-dim-q-k-norms-f16", "qwen3", "f16", False),
    ("bf16-checkpoint-auto", "bf16", "auto", False),
    ("bf16-checkpoint-q8_0", "bf16", "q8_0", False),
    ("f16-checkpoint-bf16", "f16", "bf16", False),
    ("bpe-smollm2-f16", "bpe", "f16", False),
    ("card-qwen2.5-generation-config", "qwen25", "f16", False),
    ("card-llama3.1-crlf", "llama31", "f16", False),
    ("mistral-name-or-path", "mistral", "f16", False),
    ("name-or-path-plain-folder", "name_or_path", "f16", False),
    ("path-name-or-path-no-front-matter", "path_no_card", "f16", False),
    ("card-every-field", "everything", "f16", False),
]


@pytest.fixture(scope="module")
def llama_cpp_outputs(module_tmp, fixtures, smollm2):
    """Every case's folder and llama.cpp's file for it, converted in one process."""
    llama_cpp_src()
    root = module_tmp("hf")
    folders = _build_folders(root, fixtures / "llama2-tokenizer.model", smollm2)
    out = module_tmp("llama-cpp")
    jobs = [(folders[f], t, out / f"{case}.gguf", *(["--vocab-only"] if vocab else []))
            for case, f, t, vocab in CASES]
    refs = convert_many(jobs)
    return {case: (folders[f], ref) for (case, f, _, _), ref in zip(CASES, refs)}


@pytest.mark.parametrize("case, outtype, vocab_only", [(c, t, v) for c, _, t, v in CASES],
                         ids=[c for c, _, _, _ in CASES])
def test_same_file_as_llama_cpp(llama_cpp_outputs, tmp_path, case, outtype, vocab_only):
    folder, ref = llama_cpp_outputs[case]
    ours = tmp_path / "ours.gguf"
    list(convert_model(folder, ours, ConvertOptions(outtype=outtype, vocab_only=vocab_only)))
    assert first_difference(ours, ref) is None, first_difference(ours, ref)


def test_card_keys_are_written(llama_cpp_outputs, tmp_path):
    """The model card cases say something: the keys they are about are there."""
    folder, _ = llama_cpp_outputs["card-qwen2.5-generation-config"]
    out = tmp_path / "q.gguf"
    list(convert_model(folder, out, ConvertOptions()))
    r = GGUFReader(out)
    assert r.get(Keys.NAME) == "Qwen2.5 0.5B Instruct"
    assert (r.get(Keys.BASENAME), r.get(Keys.FINETUNE)) == ("Qwen2.5", "0.5b-Instruct")
    assert r.get(Keys.LICENSE) == "apache-2.0" and r.get(Keys.LANGUAGES) == ["en"]
    assert r.get(Keys.TAGS) == ["chat", "text-generation"]
    assert r.get(Keys.BASE_MODEL.format(id=0, field="organization")) == "Qwen"
    assert r.get(Keys.SAMPLING_TOP_K) == 20
    assert abs(r.get(Keys.SAMPLING_PENALTY_REPEAT) - 1.05) < 1e-6


def test_bad_front_matter_is_one_clear_error(llama_cpp_outputs, tmp_path):
    folder, _ = llama_cpp_outputs["llama-spm-f16"]
    bad = _twin(folder, tmp_path / "bad-card")
    (bad / "README.md").write_text("---\nlicense: [mit\n---\n")
    with pytest.raises(UserError, match=r"README.md: the front matter is not valid YAML"):
        list(convert_model(bad, tmp_path / "out.gguf", ConvertOptions()))
    assert not list(tmp_path.glob("out.gguf*"))


# names: many more than files can afford, against llama.cpp's heuristics in one process

NAMES = [
    "tiny-llama", "SmolLM2-135M-Instruct", "Qwen2.5-0.5B-Instruct", "Meta-Llama-3.1-8B-Instruct",
    "Mistral-7B-v0.1", "meta-llama/Llama-2-7b-hf", "bloom-7b1", "Mixtral-8x7B-Instruct-v0.1",
    "Qwen3-30B-A3B", "gpt2-xl", "t5-small", "Phi-3-mini-4k-instruct", "Yi-1.5-9B-Chat-16K",
    "Llama-3.2-1B-Instruct-Q4_K_M", "TinyLlama-1.1B-Chat-v1.0", "model-iq4_xs", "MiniCPM-2B-bf16",
    "deepseek-coder-6.7b-instruct", "x-1_5b", "llama-7b-lora", "./local", "../up/name", "a b c",
    "iter3-model", "v2-model", "model--double-dash", "7B", "-", "", "zephyr-7b-beta",
    "org/Hermes-2-Pro-Mistral-7B", "gemma-2-9b-it", "CodeLlama-34b-Python-hf", "opt-125m",
]
COUNTS = [0, 4_500_000, 135_000_000, 7_000_000_000, -1_000_000]


def test_names_as_llama_cpp_reads_them():
    rng = random.Random(0)
    alphabet = "ab7B1.-_kmMxvqiQ/ "
    names = NAMES + ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 14)))
                     for _ in range(1500)]
    counts = COUNTS + [rng.randrange(1, 10 ** rng.randint(1, 13)) for _ in range(10)]
    sizes = [rng.randrange(1, 10 ** rng.randint(1, 15)) for _ in range(3000)]
    sizes += [999, 1000, 1001, 999_999, 10**6, 10**6 + 1, 10**9, 10**9 + 1, 10**12 + 1]
    want = llama_cpp_names(names, counts, sizes)
    for name, parts in zip(names, want["parts"]):
        for n, p in zip(counts, parts):
            assert list(split_model_id(name, n)) == p, (name, n)
    for name, title in zip(names, want["titles"]):
        assert title_case(name) == title, name
    assert [size_label(n) for n in sizes] == want["sizes"]
