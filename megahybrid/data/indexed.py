"""Megatron indexed datasets (`PREFIX.bin` + `PREFIX.idx`), read and written with Megatron-Core's
own `megatron.core.datasets.indexed_dataset`, so files made by Megatron-LM's
`tools/preprocess_data.py` load here and ours load there.

As in Megatron's GPTDataset, each sequence of the index is one document; documents should end
with the end-of-document token (`preprocess_data.py --append-eod`; `megahybrid data prepare`
always appends it). The train/valid split is by whole documents.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from megahybrid.config import ConfigError


class DataError(ConfigError):
    """Missing, empty or unusable data: one line naming the path and the fix."""


def _megatron():
    # megatron.core's package __init__ imports its optimizer and FSDP code, which warn that
    # Transformer Engine / Apex (and on CPU, CUDA) are missing: irrelevant to .bin/.idx files.
    cpp_log = logging.getLogger("torch.utils.cpp_extension")
    level = cpp_log.level
    cpp_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from megatron.core.datasets import indexed_dataset
    finally:
        cpp_log.setLevel(level)
    return indexed_dataset


def write(prefix, documents: Iterable[np.ndarray], vocab_size: int) -> tuple[int, int]:
    """Write `documents` (arrays of token ids) to PREFIX.bin/.idx; returns (documents, tokens).

    Written under temporary names and renamed (.bin first, .idx last), so a killed writer never
    leaves a dataset that looks complete."""
    idx_mod = _megatron()
    prefix = str(prefix)
    tmp = f"{prefix}.tmp{os.getpid()}"
    dtype = idx_mod.DType.optimal_dtype(vocab_size)
    builder = idx_mod.IndexedDatasetBuilder(tmp + ".bin", dtype=dtype)
    n_docs = n_tokens = 0
    for doc in documents:
        builder.add_document(torch.from_numpy(np.asarray(doc)), [len(doc)])
        n_docs += 1
        n_tokens += len(doc)
    builder.finalize(tmp + ".idx")
    for ext in (".bin", ".idx"):
        with open(tmp + ext, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp + ext, prefix + ext)
    return n_docs, n_tokens


def exists(prefix) -> bool:
    return Path(f"{prefix}.bin").is_file() and Path(f"{prefix}.idx").is_file()


def open_dataset(prefix, field: str = "data.paths"):
    """Megatron's `IndexedDataset` for PREFIX, with one-line errors for missing or empty data."""
    prefix = str(prefix)
    if not exists(prefix):
        raise DataError(f"{field}={prefix!r}: no {prefix}.bin/.idx found; give the prefix of a "
                        f"Megatron indexed dataset (make one with `megahybrid data prepare FILES --out {prefix}`)")
    if os.path.getsize(prefix + ".bin") == 0:
        raise DataError(f"{field}={prefix!r}: the dataset is empty (0 tokens); prepare it from non-empty text")
    try:
        with warnings.catch_warnings():  # Megatron warns that it cannot tell the rank when logging
            warnings.simplefilter("ignore")
            ds = _megatron().IndexedDataset(prefix)
    except (AssertionError, ValueError, OSError) as err:
        raise DataError(f"{field}={prefix!r}: not a readable Megatron indexed dataset ({err}); "
                        "re-create it with `megahybrid data prepare`") from None
    if len(ds) == 0:
        raise DataError(f"{field}={prefix!r}: the dataset is empty (0 documents); prepare it from non-empty text")
    return ds


def split(n_docs: int, valid_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Document ids of the (train, valid) splits: floor(n * valid_fraction) documents, evenly
    spread (document i is held out when floor((i+1) f) > floor(i f)), the same for every run."""
    i = np.arange(n_docs)
    held = np.floor((i + 1) * valid_fraction) > np.floor(i * valid_fraction)
    return i[~held], i[held]
