"""Data pipeline: documents -> tokenizer -> flat token arrays -> batches.

Design note. `documents.py` reads the text (by default the interpreter's standard library
sources) and holds out whole documents for evaluation. The tokenizer (a byte-level BPE trained
here, or raw bytes) is trained on the training documents only; it and both encoded splits are
cached under a key of (document contents, tokenizer kind, vocab size, split), so a second run
only reads and hashes the text. Training batch `step` is a pure function of `(seed, step)`:
a resumed run sees exactly the batches it would have seen, and each process takes its block
of rows of the same global batch.

Shape letters: B batch rows.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

import deepseek_jax.train.tokenizer as tokenizer_lib
from deepseek_jax.train.documents import read_documents, split_documents, stdlib_root
from deepseek_jax.train.tokenizer import Tokenizer

CACHE_VERSION = 1
_ENCODE_CHUNK_CHARS = 1 << 16
_ENCODE_GROUP = 256  # pieces per encode_batch call (one progress-bar update)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the text comes from and how it becomes tokens.

    Attributes:
      path: text file, folder or JSON-lines file; None means the standard library sources.
      vocab_size: BPE target size (the trained vocabulary may be smaller on little text).
        Unused when `byte_level` (256 ids).
      byte_level: raw UTF-8 bytes instead of a trained BPE.
      eval_fraction: share of documents held out for evaluation.
      max_bytes: stop reading after this much text (keeps the first run fast).
      bpe_sample_bytes: most training text the BPE trainer sees.
      cache_dir: where tokenizers and token arrays live; None means
        `$XDG_CACHE_HOME/deepseek_jax/data` (`~/.cache/...`).
      progress: show tqdm bars for steps that take more than a second.
    """

    path: str | None = None
    vocab_size: int = 4096
    byte_level: bool = False
    eval_fraction: float = 0.05
    max_bytes: int = 32 << 20
    bpe_sample_bytes: int = 16 << 20
    cache_dir: str | None = None
    progress: bool = True

    def __post_init__(self):
        if not 0.0 < self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must lie in (0, 1), got {self.eval_fraction}")
        if self.max_bytes <= 0 or self.bpe_sample_bytes <= 0:
            raise ValueError("max_bytes and bpe_sample_bytes must be positive")
        if not self.byte_level and self.vocab_size <= tokenizer_lib.BYTE_VOCAB + 1:
            raise ValueError(
                f"vocab_size {self.vocab_size} leaves no room for BPE merges; "
                "set byte_level=True for a 256-id byte tokenizer"
            )


# ---------------------------------------------------------------------------- encoding


def encode_documents(tok: Tokenizer, docs: list[str], *, progress: bool = False) -> np.ndarray:
    """Encodes documents into one flat array, each document followed by `tok.eot_id`.

    Returns:
      tokens[N], the narrowest of uint8/uint16/int32 that holds the vocabulary.
    """
    # Long documents are cut into pieces so that `encode_batch` spreads them over the cores.
    pieces = [(i, c) for i, d in enumerate(docs) for c in _chunks(d, _ENCODE_CHUNK_CHARS)]
    doc_of = [i for i, _ in pieces] + [-1]
    ends = {k for k in range(len(pieces)) if doc_of[k + 1] != doc_of[k]}
    dtype = _token_dtype(tok.vocab_size)
    eot = np.array([tok.eot_id], dtype)
    out: list[np.ndarray] = []
    with tqdm(
        total=sum(len(d) for d in docs),
        unit="char",
        unit_scale=True,
        delay=1.0,
        desc="encoding",
        disable=not progress,
    ) as bar:
        for start in range(0, len(pieces), _ENCODE_GROUP):
            group = [c for _, c in pieces[start : start + _ENCODE_GROUP]]
            for k, ids in enumerate(tok.encode_batch(group), start):
                out.append(np.asarray(ids, dtype))
                if k in ends:
                    out.append(eot)
            bar.update(sum(len(c) for c in group))
    return np.concatenate(out)


def _token_dtype(vocab_size: int) -> type[np.integer]:
    if vocab_size <= 1 << 8:
        return np.uint8
    return np.uint16 if vocab_size <= 1 << 16 else np.int32


def _chunks(text: str, size: int) -> Iterator[str]:
    """Pieces of at most `size` characters, ending after a newline where possible."""
    start = 0
    while len(text) - start > size:
        cut = text.rfind("\n", start, start + size) + 1 or start + size
        yield text[start:cut]
        start = cut
    yield text[start:]


# ------------------------------------------------------------------------------ batches


def process_rows(batch_size: int, process_index: int = 0, process_count: int = 1) -> slice:
    """This process's contiguous block of rows of a global batch (process-major, as the
    mesh's `node` axis lays the batch out)."""
    if batch_size % process_count:
        raise ValueError(f"batch size {batch_size} is not divisible by {process_count} processes")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    rows = batch_size // process_count
    return slice(process_index * rows, (process_index + 1) * rows)


def sample_batch(
    tokens: np.ndarray,
    seed: int,
    step: int,
    batch_size: int,
    seq_len: int,
    *,
    process_index: int = 0,
    process_count: int = 1,
) -> np.ndarray:
    """Training batch `step`: random windows of `seq_len + 1` tokens, a pure function of
    (tokens, seed, step). Inputs are `ids[:, :-1]`, targets `ids[:, 1:]`.

    Returns:
      ids[B / process_count, T + 1] int32: this process's rows of the global batch.
    """
    n_offsets = len(tokens) - seq_len
    if n_offsets < 1:
        raise ValueError(f"{len(tokens)} training tokens cannot fill one window of {seq_len + 1}")
    rows = process_rows(batch_size, process_index, process_count)
    offsets_B = np.random.default_rng((seed, step)).integers(0, n_offsets, size=batch_size)
    return _windows(tokens, offsets_B[rows], seq_len)


def eval_batches(
    tokens: np.ndarray,
    batch_size: int,
    seq_len: int,
    *,
    max_batches: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[np.ndarray]:
    """Deterministic batches over the held-out tokens.

    Windows start every `seq_len` tokens, so each eval token is a target exactly once over
    the full pass; they are visited in a fixed shuffled order, so the first `max_batches`
    are a fair sample of the whole split. A last partial batch is dropped.

    Yields:
      ids[B / process_count, T + 1] int32: this process's rows.
    """
    n_batches = num_eval_batches(len(tokens), batch_size, seq_len)
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    rows = process_rows(batch_size, process_index, process_count)
    order = np.random.default_rng(0).permutation((len(tokens) - 1) // seq_len)
    for b in range(n_batches):
        starts_B = order[b * batch_size : (b + 1) * batch_size] * seq_len
        yield _windows(tokens, starts_B[rows], seq_len)


def num_eval_batches(n_tokens: int, batch_size: int, seq_len: int) -> int:
    """Full eval batches in `n_tokens` held-out tokens; raises if there is not one."""
    n = (n_tokens - 1) // seq_len // batch_size
    if n < 1:
        raise ValueError(
            f"the eval split ({n_tokens} tokens) cannot fill one batch of {batch_size} x "
            f"{seq_len + 1}; use more data, a larger eval_fraction or a smaller batch"
        )
    return n


def _windows(tokens: np.ndarray, starts_B: np.ndarray, seq_len: int) -> np.ndarray:
    return tokens[starts_B[:, None] + np.arange(seq_len + 1)].astype(np.int32)


def unigram_entropy(tokens: np.ndarray) -> float:
    """Entropy of the token frequencies, in nats per token: the loss of the best model that
    ignores context, the baseline a trained model must beat."""
    counts = np.bincount(np.asarray(tokens).ravel())
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


# ------------------------------------------------------------------------------- corpus


@dataclasses.dataclass(frozen=True, eq=False)
class Corpus:
    """A tokenized corpus with its train/eval split.

    Attributes:
      tokenizer: encodes and decodes text.
      train_tokens: tokens[N_train] of the training documents, each followed by eot.
      eval_tokens: tokens[N_eval] of the held-out documents.
      source: human-readable origin (path or "stdlib ...").
      cache_path: folder holding the tokenizer and both token arrays.
      n_train_docs, n_eval_docs, n_bytes: sizes of what was read.
    """

    tokenizer: Tokenizer
    train_tokens: np.ndarray
    eval_tokens: np.ndarray
    source: str
    cache_path: Path
    n_train_docs: int
    n_eval_docs: int
    n_bytes: int

    def batch(self, seed: int, step: int, batch_size: int, seq_len: int) -> np.ndarray:
        """Global training batch `step`: ids[B, T + 1] int32; see `sample_batch`."""
        return sample_batch(self.train_tokens, seed, step, batch_size, seq_len)

    def process_batch(
        self,
        seed: int,
        step: int,
        batch_size: int,
        seq_len: int,
        process_index: int,
        process_count: int,
    ) -> np.ndarray:
        """This process's rows ids[B / process_count, T + 1] of global batch `step`."""
        return sample_batch(
            self.train_tokens,
            seed,
            step,
            batch_size,
            seq_len,
            process_index=process_index,
            process_count=process_count,
        )

    def eval_batches(
        self,
        batch_size: int,
        seq_len: int,
        *,
        max_batches: int | None = None,
        process_index: int = 0,
        process_count: int = 1,
    ) -> Iterator[np.ndarray]:
        """Held-out batches ids[B / process_count, T + 1]; see `eval_batches`."""
        return eval_batches(
            self.eval_tokens,
            batch_size,
            seq_len,
            max_batches=max_batches,
            process_index=process_index,
            process_count=process_count,
        )

    def num_eval_batches(self, batch_size: int, seq_len: int) -> int:
        return num_eval_batches(len(self.eval_tokens), batch_size, seq_len)

    def unigram_entropy(self) -> float:
        """Unigram entropy of the training split, nats/token."""
        return unigram_entropy(self.train_tokens)

    def check_vocab(self, model_vocab_size: int) -> None:
        """Raises if a model with `model_vocab_size` embedding rows cannot take these ids."""
        tokenizer_lib.check_vocab(self.tokenizer, model_vocab_size)


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "deepseek_jax" / "data"


def load_corpus(cfg: DataConfig) -> Corpus:
    """Reads, splits and tokenizes the corpus, or loads all of it from the cache.

    The cache key covers the text itself, so edited data never meets a stale tokenizer.
    Concurrent builders (several processes on one host) each write a private folder and
    rename it into place; the first to finish wins.
    """
    docs = read_documents(cfg.path, cfg.max_bytes)
    train_docs, eval_docs = split_documents(docs, cfg.eval_fraction)
    cache_dir = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()
    path = cache_dir / _cache_name(cfg, docs)
    if not (path / "meta.json").exists():
        _build_cache(cfg, train_docs, eval_docs, path)
    meta = json.loads((path / "meta.json").read_text())
    source = f"stdlib {stdlib_root()}" if cfg.path is None else str(cfg.path)
    return Corpus(
        tokenizer=tokenizer_lib.load_tokenizer(path / "tokenizer.json"),
        train_tokens=np.load(path / "train.npy"),
        eval_tokens=np.load(path / "eval.npy"),
        source=source,
        cache_path=path,
        n_train_docs=meta["n_train_docs"],
        n_eval_docs=meta["n_eval_docs"],
        n_bytes=meta["n_bytes"],
    )


def _cache_name(cfg: DataConfig, docs: Iterable[str]) -> str:
    h = hashlib.sha256()
    kind = "bytes" if cfg.byte_level else f"bpe{cfg.vocab_size}"
    h.update(f"v{CACHE_VERSION} {kind} {cfg.eval_fraction} {cfg.bpe_sample_bytes}\n".encode())
    for d in docs:
        b = d.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return f"{kind}-{h.hexdigest()[:16]}"


def _build_cache(cfg: DataConfig, train_docs: list[str], eval_docs: list[str], path: Path):
    if cfg.byte_level:
        tok: Tokenizer = tokenizer_lib.ByteTokenizer()
    else:
        tok = tokenizer_lib.train_bpe(
            _sample(train_docs, cfg.bpe_sample_bytes), cfg.vocab_size, progress=cfg.progress
        )
    tmp = path.with_name(f"{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    try:
        tok.save(tmp / "tokenizer.json")
        np.save(tmp / "train.npy", encode_documents(tok, train_docs, progress=cfg.progress))
        np.save(tmp / "eval.npy", encode_documents(tok, eval_docs, progress=cfg.progress))
        meta = {
            "n_train_docs": len(train_docs),
            "n_eval_docs": len(eval_docs),
            "n_bytes": sum(len(d.encode("utf-8")) for d in train_docs + eval_docs),
        }
        (tmp / "meta.json").write_text(json.dumps(meta))
        tmp.rename(path)
    except OSError:
        if not (path / "meta.json").exists():  # not a lost race: a real failure
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _sample(docs: list[str], max_chars: int) -> list[str]:
    """A fixed pseudo-random subset of documents, about `max_chars` in all."""
    if sum(len(d) for d in docs) <= max_chars:
        return docs
    out, total = [], 0
    for i in np.random.default_rng(1).permutation(len(docs)):
        if total >= max_chars:
            break
        out.append(docs[i])
        total += len(docs[i])
    return out
