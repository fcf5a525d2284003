"""The embedded corpus: real text that every Python installation already has, so
`megahybrid train` needs no download.

Source: the Python standard library's own source files (`*.py` under
`sysconfig.get_paths()["stdlib"]`: code, comments, docstrings, and `pydoc_data/topics.py`, the
language reference as text). Licence: the PSF License Agreement (PSF-2.0), `LICENSE.txt` in
that same directory. Size: CPython 3.12.1 gives 685 files, 11.6 MB (3.1 M tokens with an
8k byte-level BPE); other Python versions give a slightly different corpus.

Excluded: third-party `site-packages`, the test suites (`test/`, `tests/`, `idle_test/`: large,
repetitive and partly deliberately malformed text) and files that are not valid UTF-8.
Documents are files, in sorted order of their path relative to the stdlib directory, so the
corpus and everything derived from it (tokenizer, splits, batches) is deterministic.
"""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path
from typing import Iterator, Optional

NAME = "python-stdlib"
LICENSE = "PSF-2.0 (Python Software Foundation License Agreement)"
SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__",
                       "lib-dynload"})


def root() -> Path:
    """The standard library directory the corpus is read from."""
    return Path(sysconfig.get_paths()["stdlib"])


def files() -> list[Path]:
    """The corpus files in their fixed order (sorted relative paths)."""
    base = root()
    found = []
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS and not d.startswith("config-")]
        found += [Path(dirpath, f) for f in filenames if f.endswith(".py")]
    return sorted(found, key=lambda p: p.relative_to(base).as_posix())


def documents(max_bytes: Optional[int] = None) -> Iterator[str]:
    """Yield the corpus documents (one per file) in order; with `max_bytes`, stop once that many
    UTF-8 bytes have been yielded (the last document is cut to fit)."""
    used = 0
    for path in files():
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            continue
        if max_bytes is not None and used + len(raw) > max_bytes:
            rest = raw[: max_bytes - used].decode("utf-8", errors="ignore")
            if rest:
                yield rest
            return
        used += len(raw)
        yield text
