"""Training text: the built-in corpus or a user's .txt/.jsonl file, tokenized into one stream of ids
from which fixed-length windows are drawn; the tail of the stream is held out for evaluation."""
from __future__ import annotations

import json
import os
from importlib import resources

import torch


class ByteTokenizer:
    """UTF-8 bytes are the tokens (ids 0-255) plus BOS, EOS and PAD: nothing to download or train."""

    bos_token_id, eos_token_id, pad_token_id = 256, 257, 258
    vocab_size = 259

    def encode(self, text: str) -> list:
        return [self.bos_token_id, *text.encode("utf-8"), self.eos_token_id]

    def decode(self, ids) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def builtin_texts() -> list:
    folder = resources.files("lora_ext") / "data"
    return [f.read_text(encoding="utf-8") for f in sorted(folder.iterdir(), key=lambda f: f.name)
            if f.name.endswith(".txt")]


def read_texts(path: str) -> list:
    """A .txt file (one text) or a .jsonl file (one JSON object with a 'text' field per line)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--data: no such file: {path}")
    if path.endswith(".txt"):
        with open(path, encoding="utf-8") as f:
            return [f.read()]
    if path.endswith(".jsonl"):
        texts = []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"--data {path}, line {n}: not valid JSON ({e})") from None
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise ValueError(f"--data {path}, line {n}: expected an object with a string 'text' field")
                texts.append(record["text"])
        return texts
    raise ValueError(f"--data must be a .txt or .jsonl file, got {path}")


def token_stream(texts: list, tokenizer) -> torch.Tensor:
    ids = []
    for text in texts:
        if isinstance(tokenizer, ByteTokenizer):
            ids.extend(tokenizer.encode(text))
        else:  # a Hugging Face tokenizer
            ids.extend(tokenizer(text)["input_ids"])
            if tokenizer.eos_token_id is not None:
                ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


class Windows:
    """Random training windows of seq_len tokens, and fixed evaluation windows from the held-out tail."""

    def __init__(self, stream: torch.Tensor, seq_len: int, eval_fraction: float = 0.1, seed: int = 0):
        n_eval = max(int(len(stream) * eval_fraction), seq_len + 1)
        if len(stream) - n_eval < seq_len + 1:
            raise ValueError(f"the text has {len(stream)} tokens: too few for --seq-len {seq_len} "
                             f"(need at least {2 * (seq_len + 1)}); use a shorter --seq-len or more text")
        self.train, self.held_out = stream[:-n_eval], stream[-n_eval:]
        self.seq_len = seq_len
        self.generator = torch.Generator().manual_seed(seed)

    def batch(self, batch_size: int) -> torch.Tensor:
        starts = torch.randint(0, len(self.train) - self.seq_len, (batch_size,), generator=self.generator)
        return torch.stack([self.train[s:s + self.seq_len] for s in starts.tolist()])

    def eval_batches(self, batch_size: int, max_batches: int = 4) -> list:
        starts = list(range(0, len(self.held_out) - self.seq_len, self.seq_len))[: batch_size * max_batches]
        rows = [self.held_out[s:s + self.seq_len] for s in starts]
        return [torch.stack(rows[i:i + batch_size]) for i in range(0, len(rows), batch_size)]
