"""Tokenizers: a byte-level BPE trained locally with `tokenizers`, or plain bytes.

Both share one small interface (`encode`, `encode_batch`, `decode`, `vocab_size`, `eot_id`,
`save`). Documents are joined with an end-of-text id `eot_id`. The byte tokenizer has exactly
256 ids so it fits the `tiny` preset: it uses byte 0 (NUL, which text never holds; it is
dropped on encode) as its end-of-text id.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

EOT = "<|endoftext|>"
BYTE_VOCAB = 256


class Tokenizer(Protocol):
    vocab_size: int
    eot_id: int

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def save(self, path: Path) -> None: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255; id 0 (NUL) separates documents."""

    kind = "bytes"
    vocab_size = BYTE_VOCAB
    eot_id = 0

    def encode(self, text: str) -> list[int]:
        return list(text.replace("\x00", "").encode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(int(i) for i in ids if int(i) != self.eot_id).decode("utf-8", "replace")

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps({"kind": self.kind}))


class BPETokenizer:
    """Byte-level BPE (GPT-2 style pre-tokenizer, all 256 bytes in the alphabet)."""

    kind = "bpe"

    def __init__(self, tok: HFTokenizer):
        self._tok = tok
        # A literal "<|endoftext|>" inside a document is text, not a separator.
        self._tok.encode_special_tokens = True
        self.vocab_size = tok.get_vocab_size()
        self.eot_id = tok.token_to_id(EOT)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def save(self, path: Path) -> None:
        self._tok.save(str(path))


def train_bpe(texts: Iterable[str], vocab_size: int, *, progress: bool = False) -> BPETokenizer:
    """Trains a byte-level BPE with at most `vocab_size` ids (fewer if the text runs out)."""
    if vocab_size <= BYTE_VOCAB + 1:
        raise ValueError(
            f"BPE vocab_size must exceed {BYTE_VOCAB + 1} (256 bytes + end-of-text), got "
            f"{vocab_size}; use the byte-level tokenizer instead"
        )
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=progress,
    )
    tok.train_from_iterator(texts, trainer)
    return BPETokenizer(tok)


def load_tokenizer(path: Path) -> Tokenizer:
    """Loads what `Tokenizer.save` wrote."""
    data = json.loads(Path(path).read_text())
    if data.get("kind") == ByteTokenizer.kind:
        return ByteTokenizer()
    return BPETokenizer(HFTokenizer.from_file(str(path)))


def check_vocab(tokenizer: Tokenizer, model_vocab_size: int) -> None:
    """Raises if the model's embedding has fewer rows than the tokenizer has ids."""
    if model_vocab_size < tokenizer.vocab_size:
        raise ValueError(
            f"model vocab_size {model_vocab_size} is smaller than the tokenizer's "
            f"{tokenizer.vocab_size} ids; raise vocab_size or train a smaller tokenizer"
        )
