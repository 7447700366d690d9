"""The model being fine-tuned: a local Hugging Face model directory (--model) with its tokenizer, or
by default a small Llama built from a config with the byte-level tokenizer (fully offline)."""
from __future__ import annotations

import os

import torch

from .data import ByteTokenizer

# Small enough for a few hundred steps in a few minutes on 2 CPU cores; Llama's shape otherwise
# (GQA, SwiGLU MLP, RMSNorm, RoPE), so every default target exists.
DEFAULT_LLAMA = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=False)


def default_model(seed: int):
    import transformers

    tok = ByteTokenizer()
    config = transformers.LlamaConfig(vocab_size=tok.vocab_size, bos_token_id=tok.bos_token_id,
                                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **DEFAULT_LLAMA)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return transformers.LlamaForCausalLM(config), tok


def _has_tokenizer(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer.model",
                                                                "tokenizer_config.json"))


def local_model(path: str, dtype: torch.dtype):
    """A causal LM and its tokenizer from a local directory; never downloads."""
    import transformers

    if not os.path.isdir(path):
        raise FileNotFoundError(f"--model: no such directory: {path}")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"--model: {path} has no config.json; expected a Hugging Face model directory "
                                f"(as written by save_pretrained)")
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    if _has_tokenizer(path):
        return model, transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    if model.config.vocab_size >= ByteTokenizer.vocab_size:
        return model, ByteTokenizer()  # e.g. the base model a previous default run saved
    raise ValueError(f"--model: {path} has no tokenizer files and a vocabulary of {model.config.vocab_size} "
                     f"(< {ByteTokenizer.vocab_size}, too small for byte tokens)")
