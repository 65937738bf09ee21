"""Documents: where training text comes from, and which of it is held out.

The default corpus is the running interpreter's standard library sources (`*.py`, no tests,
no site-packages, no generated files over 1 MB): real code and prose on every machine with
Python, no download. User data is a text file, a folder of text files, or JSON lines with a
`text` field. The eval split holds out whole documents, never part of a token sequence.
"""

from __future__ import annotations

import json
import sysconfig
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np

TEXT_SUFFIXES = (".txt", ".md", ".py")
JSON_SUFFIXES = (".jsonl", ".json")
STDLIB_SKIP_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
)
STDLIB_MAX_FILE_BYTES = 1 << 20  # only generated tables are larger


def stdlib_root() -> Path:
    """The running interpreter's standard library folder."""
    return Path(sysconfig.get_paths()["stdlib"])


def iter_stdlib_documents(root: Path | None = None) -> Iterator[str]:
    """Yields stdlib `*.py` sources in sorted path order, skipping tests and large files."""
    root = stdlib_root() if root is None else Path(root)
    for p in sorted(root.rglob("*.py")):
        if STDLIB_SKIP_DIRS.intersection(p.relative_to(root).parts[:-1]):
            continue
        if p.stat().st_size > STDLIB_MAX_FILE_BYTES:
            continue
        yield p.read_text(encoding="utf-8", errors="replace")


def iter_path_documents(path: str | Path, max_chars: int | None = None) -> Iterator[str]:
    """Yields the documents under `path`: a file, or a folder searched recursively.

    A `.jsonl`/`.json` file holds one document per line (a JSON object with a string `text`
    field, or a JSON string); any other file is one document. A folder contributes its
    `*.txt, *.md, *.py, *.jsonl, *.json` files in sorted order, hidden entries skipped.
    A plain text file is read up to `max_chars` (+1, so a cut is detectable) characters.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise ValueError(f"data path {path} does not exist")
    if path.is_file():
        yield from _read_file(path, max_chars)
        return
    suffixes = TEXT_SUFFIXES + JSON_SUFFIXES
    for p in sorted(path.rglob("*")):
        hidden = any(part.startswith(".") for part in p.relative_to(path).parts)
        if p.is_file() and p.suffix.lower() in suffixes and not hidden:
            yield from _read_file(p, max_chars)


def _read_file(p: Path, max_chars: int | None) -> Iterator[str]:
    with p.open(encoding="utf-8", errors="replace") as f:
        if p.suffix.lower() not in JSON_SUFFIXES:
            yield f.read(-1 if max_chars is None else max_chars + 1)  # +1: see truncation
            return
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{p}:{lineno}: not a JSON line ({e.msg})") from None
            text = record.get("text") if isinstance(record, dict) else record
            if not isinstance(text, str):
                raise ValueError(f"{p}:{lineno}: expected an object with a string 'text' field")
            yield text


def read_documents(path: str | Path | None, max_bytes: int) -> list[str]:
    """Reads non-empty documents until `max_bytes` of UTF-8 text; raises if there are none."""
    source = iter_stdlib_documents() if path is None else iter_path_documents(path, max_bytes)
    docs, total = [], 0
    for text in source:
        if not text.strip():
            continue
        size = len(text.encode("utf-8"))
        if total + size > max_bytes:
            if total == 0:  # one huge document: keep its head
                docs.append(text.encode("utf-8")[:max_bytes].decode("utf-8", "ignore"))
            warnings.warn(f"data: stopped reading at max_bytes={max_bytes}", stacklevel=2)
            break
        docs.append(text)
        total += size
    if not docs:
        where = stdlib_root() if path is None else path
        kinds = ", ".join("*" + s for s in TEXT_SUFFIXES + JSON_SUFFIXES)
        raise ValueError(f"data path {where} holds no text (looked for {kinds})")
    return docs


# -------------------------------------------------------------------------------- split


def split_documents(docs: list[str], eval_fraction: float) -> tuple[list[str], list[str]]:
    """Holds out whole documents: a fixed pseudo-random `eval_fraction` of them.

    With fewer than `1 / eval_fraction` documents, the last `eval_fraction` of the text,
    cut at a line boundary, is held out instead.

    Returns:
      (train documents, eval documents), each in reading order.
    """
    n = len(docs)
    if n * eval_fraction >= 1.0:
        n_eval = min(round(n * eval_fraction), n - 1)
        held = set(np.random.default_rng(0).permutation(n)[:n_eval].tolist())
        return [d for i, d in enumerate(docs) if i not in held], [docs[i] for i in sorted(held)]
    text_len = sum(len(d) for d in docs)
    cut = int(text_len * (1.0 - eval_fraction))
    train, i = [], 0
    while cut >= len(docs[i]):
        cut -= len(docs[i])
        train.append(docs[i])
        i += 1
    doc = docs[i]
    line_end = doc.rfind("\n", 0, cut) + 1  # keep whole lines on each side when possible
    cut = line_end if line_end > 0 else cut
    head, tail = doc[:cut], doc[cut:]
    if head:
        train.append(head)
    evals = [tail, *docs[i + 1 :]]
    if not train or not tail.strip():
        raise ValueError(f"too little text to hold out {eval_fraction:.0%} for evaluation")
    return train, evals
