"""Byte-level BPE tokenizer (Hugging Face `tokenizers`), trained on a bounded sample of the text.

Byte-level means every byte has a token, so any text encodes without unknown tokens; the
vocabulary holds the 256 byte tokens, one end-of-document token and learned merges. Training
reads at most `SAMPLE_BYTES` of text (about a second on 2 cores); any `tokenizer.json`, e.g. a
published model's, can be loaded instead.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterable

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from megahybrid.config import ConfigError

EOS = "<|endoftext|>"
EOS_NAMES = (EOS, "</s>", "<|end_of_text|>", "<eos>", "<|eot_id|>", "[SEP]")
"""End-of-document tokens looked for, in order, in a given tokenizer.json."""
SAMPLE_BYTES = 2_000_000
"""Text the BPE is trained on: ~1 s for an 8k vocabulary on 2 cores (measured on the stdlib
corpus), and enough that the learned merges barely change with more."""


def sample(texts: list[str], max_bytes: int = SAMPLE_BYTES) -> list[str]:
    """About `max_bytes` of `texts`, taken evenly spread (every k-th document), so the sample
    covers the whole corpus rather than its first files."""
    total = sum(len(t) for t in texts)
    stride = max(1, total // max_bytes) if max_bytes else 1
    return texts[::stride]


def train(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE with `vocab_size` tokens (including the 256 bytes and EOS)."""
    if vocab_size < 257:
        raise ConfigError(f"vocab_size={vocab_size}: a byte-level BPE needs at least 257 tokens "
                          "(256 bytes + end-of-document); raise it (e.g. 4096)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return tok


def save(tok: Tokenizer, path: Path) -> None:
    """Write `tokenizer.json` atomically (temp file, fsync, rename)."""
    tmp = Path(f"{path}.tmp{os.getpid()}")
    tok.save(str(tmp))
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load(path, field: str = "data.tokenizer") -> Tokenizer:
    """Load a tokenizer.json; a missing or unreadable file is a one-line ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{field}={str(path)!r}: no such file; give a tokenizer.json, or leave it "
                          "unset to train a BPE on the corpus")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises plain Exception subclasses with long messages
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"{field}={str(path)!r}: not a valid tokenizer.json ({first})") from None


def eos_id(tok: Tokenizer, field: str = "data.tokenizer") -> int:
    """The id of the end-of-document token appended to every document."""
    for name in EOS_NAMES:
        token_id = tok.token_to_id(name)
        if token_id is not None:
            return token_id
    raise ConfigError(f"{field}: the tokenizer has none of the end-of-document tokens {list(EOS_NAMES)}; "
                      "use a tokenizer with one of them, or leave data.tokenizer unset")


def check_vocab(tok: Tokenizer, vocab_size: int, field: str = "data.tokenizer") -> None:
    """The model's embedding must have a row for every token id (a larger, padded model vocabulary
    is fine, as in Megatron's padded vocab)."""
    n = tok.get_vocab_size()
    if n > vocab_size:
        raise ConfigError(f"model.vocab_size={vocab_size}: smaller than the tokenizer's {n} tokens "
                          f"({field}); set model.vocab_size={n} or use a tokenizer with at most "
                          f"{vocab_size} tokens")


def encode(tok: Tokenizer, texts: list[str], eos: int) -> list[np.ndarray]:
    """Token ids of each text, each followed by `eos` (Megatron's `--append-eod`)."""
    return [np.array([*enc.ids, eos], dtype=np.int64) for enc in tok.encode_batch_fast(texts)]


def file_hash(path: Path) -> str:
    """Short content hash: names derived files (a dataset tokenized with this tokenizer)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]
