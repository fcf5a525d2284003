"""Text -> tokenizer + Megatron indexed dataset.

`megahybrid data prepare [FILES] --out PREFIX` tokenizes .txt files (one document per file) and
.jsonl files (one document per line, text under `--json-key`), or the embedded corpus when no file
is given, into PREFIX.bin/.idx; a tokenizer it trains is saved as PREFIX.tokenizer.json.
`megahybrid train` with no `data.paths` does the same for the embedded corpus inside its run dir.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Iterator, Optional

from megahybrid.data import corpus, indexed
from megahybrid.data import tokenizer as tokenization
from megahybrid.data.indexed import DataError

ENCODE_BATCH = 256
"""Documents encoded per `encode_batch` call: enough to keep both cores busy, little memory."""


def read_documents(paths: list[str], json_key: str = "text") -> Iterator[str]:
    """Documents of .txt (whole file) and .jsonl (one JSON object a line) files, in order."""
    for name in paths:
        path = Path(name)
        if not path.is_file():
            raise DataError(f"input {name!r}: no such file; give .txt or .jsonl files")
        if path.suffix == ".jsonl":
            with open(path, encoding="utf-8") as f:
                for line_no, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        text = json.loads(line)[json_key]
                    except (json.JSONDecodeError, KeyError, TypeError):
                        raise DataError(f"input {name}:{line_no}: not a JSON object with a string "
                                        f"{json_key!r} field; fix the line or pass --json-key") from None
                    if text:
                        yield str(text)
        else:
            text = path.read_text(encoding="utf-8", errors="replace")
            if text:
                yield text


def tokenize_to(prefix, texts: Iterator[str], tok, vocab_size: int) -> tuple[int, int]:
    """Encode `texts` (each + EOS) into PREFIX.bin/.idx; returns (documents, tokens)."""
    eos = tokenization.eos_id(tok)

    def encoded():
        batch = []
        for text in texts:
            batch.append(text)
            if len(batch) == ENCODE_BATCH:
                yield from tokenization.encode(tok, batch, eos)
                batch = []
        if batch:
            yield from tokenization.encode(tok, batch, eos)

    return indexed.write(prefix, encoded(), vocab_size)


def prepare(inputs: list[str], out: str, tokenizer: Optional[str], vocab_size: int,
            json_key: str = "text", corpus_bytes: Optional[int] = None) -> tuple[str, Path]:
    """Tokenizer (given, or trained on a sample) + dataset at `out`; returns (prefix, tokenizer path)."""
    Path(out).parent.mkdir(parents=True, exist_ok=True)

    def texts():
        return read_documents(inputs, json_key) if inputs else corpus.documents(corpus_bytes)

    if tokenizer:
        tok = tokenization.load(tokenizer, "--tokenizer")
        tok_path = Path(tokenizer)
    else:
        tok_path = Path(f"{out}.tokenizer.json")
        sample, used = [], 0
        if inputs:  # stream the first SAMPLE_BYTES of the user's files
            for text in texts():
                sample.append(text)
                used += len(text)
                if used >= tokenization.SAMPLE_BYTES:
                    break
        else:  # the embedded corpus fits in memory: sample it evenly
            sample = tokenization.sample(list(texts()))
        if not sample:
            raise DataError(f"inputs {inputs or corpus.NAME!r}: no text found; give non-empty .txt/.jsonl files")
        tok = tokenization.train(sample, vocab_size)
        tokenization.save(tok, tok_path)
    n_docs, n_tokens = tokenize_to(out, texts(), tok, max(vocab_size, tok.get_vocab_size()))
    if n_docs == 0:
        raise DataError(f"inputs {inputs!r}: no text found; give non-empty .txt/.jsonl files")
    return str(out), tok_path


def prepare_from_cli(args) -> int:
    """`megahybrid data prepare [FILES] --out PREFIX [--tokenizer T] [--vocab-size N] [--json-key K]`."""
    start = time.time()
    prefix, tok_path = prepare(args.inputs, args.out, args.tokenizer, args.vocab_size, args.json_key)
    ds = indexed.open_dataset(prefix, "--out")
    tok = tokenization.load(tok_path)
    print(f"wrote {prefix}.bin/.idx: {len(ds)} documents, {int(ds.sequence_lengths.sum())} tokens, "
          f"vocab {tok.get_vocab_size()}, {time.time() - start:.1f}s")
    print(f"train on it: megahybrid train data.paths=[{prefix}] data.tokenizer={tok_path} "
          f"model.vocab_size={tok.get_vocab_size()}")
    return 0


def prepare_run_data(config, run_dir: Path, log=print) -> list[str]:
    """The dataset prefixes a run trains on, preparing the embedded corpus if needed.

    - `data.tokenizer` given: it is copied to RUN/tokenizer.json (the run dir is self-contained).
    - no `data.paths`: the embedded corpus, tokenized into RUN/data/ with RUN/tokenizer.json,
      which is trained (vocabulary = model.vocab_size) unless it already exists. Both are reused
      when the run is resumed, and written atomically so a killed run never leaves half a file.
    - `data.paths` without a tokenizer: ids are checked against model.vocab_size as they are read.
    """
    d, vocab = config.data, config.model.vocab_size
    run_tok = run_dir / "tokenizer.json"
    tok = None
    if d.tokenizer:
        tok = tokenization.load(d.tokenizer)
        if Path(d.tokenizer).resolve() != run_tok.resolve():
            shutil.copyfile(d.tokenizer, f"{run_tok}.tmp")
            Path(f"{run_tok}.tmp").replace(run_tok)
    elif d.paths is None and run_tok.is_file():
        tok = tokenization.load(run_tok, "the run dir's tokenizer")
    elif d.paths is None:
        start = time.time()
        tok = tokenization.train(tokenization.sample(list(corpus.documents(d.corpus_bytes))), vocab)
        tokenization.save(tok, run_tok)
        log(f"trained a {tok.get_vocab_size()}-token byte-level BPE on the {corpus.NAME} corpus "
            f"-> {run_tok} ({time.time() - start:.1f}s)")
    if tok is not None:
        tokenization.check_vocab(tok, vocab)
        if tok.get_vocab_size() < vocab:
            log(f"note: model.vocab_size={vocab} is larger than the tokenizer's {tok.get_vocab_size()} "
                "tokens; the extra embedding rows stay unused (padding)")
    if d.paths is not None:
        return list(d.paths)
    prefix = run_dir / "data" / f"{corpus.NAME}-{d.corpus_bytes or 'all'}-{tokenization.file_hash(run_tok)}"
    if not indexed.exists(prefix):
        start = time.time()
        prefix.parent.mkdir(parents=True, exist_ok=True)
        n_docs, n_tokens = tokenize_to(prefix, corpus.documents(d.corpus_bytes), tok, vocab)
        log(f"tokenized {n_docs} documents of {corpus.root()} -> {n_tokens} tokens in {prefix}.bin "
            f"({time.time() - start:.1f}s)")
    return [str(prefix)]
