"""Packed batches, blended datasets and stateless sampling.

A split of a dataset is a *stream*: its documents concatenated in stored order. Sample j of a
stream is the window of `seq_len + 1` tokens starting at token j * seq_len (inputs are the first
seq_len, labels the last seq_len). Every sample has a global index

    g = step * global_batch_size + (micro * world_size + rank) * micro_batch_size + row,

so one step's samples are the same for any data-parallel size, and a sample depends on nothing
but (seed, g): with several datasets, g picks dataset d with probability weight_d from a hash of
(seed, g); dataset d then serves window perm_{seed,d,epoch}[g mod n_d], a fresh permutation of
its n_d windows every epoch (epoch = g // n_d). No sampler state exists besides the step, so a
resumed run sees exactly the batches of an uninterrupted one.

With `data.pack` (default) each row also carries `seq_idx`: the document number of each token
within the row (0, 0, 0, 1, 1, 2, ...), which the model uses so that no attention, state or
convolution crosses a document. `data.pack=false` gives `seq_idx=None`: documents are simply
concatenated, each ending in its end-of-document token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from megahybrid.data import indexed
from megahybrid.data.indexed import DataError


@dataclass
class Batch:
    tokens: torch.Tensor
    """[B, T] int64 input ids."""
    labels: torch.Tensor
    """[B, T] int64 next-token targets."""
    seq_idx: Optional[torch.Tensor]
    """[B, T] int32 document number per token (non-decreasing per row), or None (no packing)."""

    def to(self, device) -> "Batch":
        seq_idx = None if self.seq_idx is None else self.seq_idx.to(device)
        return Batch(self.tokens.to(device), self.labels.to(device), seq_idx)


class Stream:
    """One split of one indexed dataset, as a concatenation of its documents."""

    def __init__(self, ds, doc_ids: np.ndarray, name: str):
        lengths = ds.sequence_lengths[doc_ids].astype(np.int64)
        keep = lengths > 0
        self.ds, self.name = ds, name
        self.doc_ids, self.lengths = doc_ids[keep], lengths[keep]
        self.ends = np.cumsum(self.lengths)
        self.n_tokens = int(self.ends[-1]) if len(self.ends) else 0

    def read(self, pos: int, length: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokens [pos, pos + length) of the stream and the stream document index of each."""
        tokens, docs = [], []
        k = int(np.searchsorted(self.ends, pos, side="right"))
        while length > 0:
            offset = pos - int(self.ends[k] - self.lengths[k])
            n = min(length, int(self.lengths[k]) - offset)
            tokens.append(np.asarray(self.ds.get(int(self.doc_ids[k]), offset=offset, length=n), dtype=np.int64))
            docs.append(np.full(n, k, dtype=np.int64))
            pos, length, k = pos + n, length - n, k + 1
        return np.concatenate(tokens), np.concatenate(docs)


class Sampler:
    """Rows of one split of one or more weighted datasets, each a pure function of (seed, g)."""

    def __init__(self, streams: list[Stream], weights: list[float], seq_len: int, seed: int,
                 shuffle: bool, pack: bool, vocab_size: int):
        self.streams, self.seq_len, self.seed = streams, seq_len, seed
        self.shuffle, self.pack, self.vocab_size = shuffle, pack, vocab_size
        w = np.asarray(weights, dtype=np.float64)
        self.cum_weights = np.cumsum(w / w.sum())
        self.n_windows = [(s.n_tokens - 1) // seq_len for s in streams]
        self._perms: dict[tuple[int, int], np.ndarray] = {}

    def _dataset(self, g: int) -> int:
        if len(self.streams) == 1:
            return 0
        u = np.random.default_rng((self.seed, g)).random()
        return min(int(np.searchsorted(self.cum_weights, u, side="right")), len(self.streams) - 1)

    def _window(self, d: int, g: int) -> int:
        n = self.n_windows[d]
        if not self.shuffle:
            return g % n
        epoch = g // n
        if (d, epoch) not in self._perms:
            if len(self._perms) > 2 * len(self.streams):
                self._perms.clear()
            self._perms[(d, epoch)] = np.random.default_rng((self.seed, d, epoch)).permutation(n)
        return int(self._perms[(d, epoch)][g % n])

    def row(self, g: int) -> tuple[np.ndarray, np.ndarray]:
        """Window g: seq_len + 1 tokens and their document numbers (starting at 0)."""
        d = self._dataset(g)
        stream = self.streams[d]
        tokens, docs = stream.read(self._window(d, g) * self.seq_len, self.seq_len + 1)
        top = int(tokens.max())
        if top >= self.vocab_size:
            raise DataError(f"data.paths: {stream.name!r} holds token id {top} >= model.vocab_size="
                            f"{self.vocab_size}; set model.vocab_size to the tokenizer's vocabulary size")
        return tokens, docs - docs[0]

    def batch(self, first: int, size: int) -> Batch:
        """Rows g = first .. first + size - 1."""
        rows = [self.row(g) for g in range(first, first + size)]
        tokens = torch.from_numpy(np.stack([t for t, _ in rows]))
        seq_idx = torch.from_numpy(np.stack([d[:-1] for _, d in rows]).astype(np.int32)) if self.pack else None
        return Batch(tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous(), seq_idx)


class Data:
    """Train and valid samplers over the blended datasets of `config.data`."""

    def __init__(self, config, prefixes: list[str], weights: Optional[list[float]] = None):
        t, d = config.train, config.data
        weights = weights or [1.0] * len(prefixes)
        if len(weights) != len(prefixes) or min(weights) < 0 or sum(weights) <= 0:
            raise DataError(f"data.weights={weights}: need one non-negative weight per path, not all zero")
        train, valid = [], []
        for i, prefix in enumerate(prefixes):
            field = f"data.paths[{i}]"
            ds = indexed.open_dataset(prefix, field)
            train_ids, valid_ids = indexed.split(len(ds), d.valid_fraction)
            stream = Stream(ds, train_ids, prefix)
            if stream.n_tokens < t.seq_len + 1:
                raise DataError(f"{field}={prefix!r}: {stream.n_tokens} training tokens, fewer than one "
                                f"sequence (train.seq_len + 1 = {t.seq_len + 1}); use more text or a smaller "
                                "train.seq_len")
            train.append(stream)
            valid.append(Stream(ds, valid_ids, prefix))
        self.global_batch, self.micro_batch = t.global_batch_size, t.micro_batch_size
        self.train = Sampler(train, weights, t.seq_len, t.seed, True, d.pack, config.model.vocab_size)
        usable = [(s, w) for s, w in zip(valid, weights) if s.n_tokens >= t.seq_len + 1 and w > 0]
        self.valid = None
        if usable:
            self.valid = Sampler([s for s, _ in usable], [w for _, w in usable], t.seq_len, t.seed,
                                 False, d.pack, config.model.vocab_size)
        self.train_tokens = sum(s.n_tokens for s in train)

    def train_batch(self, step: int, micro: int, rank: int = 0, world: int = 1) -> Batch:
        """Micro-batch `micro` of optimizer step `step` (0-based) for data-parallel `rank`."""
        first = step * self.global_batch + (micro * world + rank) * self.micro_batch
        return self.train.batch(first, self.micro_batch)

    def valid_batch(self, i: int, rank: int = 0, world: int = 1) -> Batch:
        """Validation micro-batch i: the same rows at every evaluation."""
        return self.valid.batch((i * world + rank) * self.micro_batch, self.micro_batch)
