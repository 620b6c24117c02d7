"""Hugging Face checkpoints -> GGUF: checkpoint readers (safetensors, PyTorch zip without
torch), tensor-name maps and hyperparameters per architecture, tokenizer export."""
