"""Data pipeline: pure batches, process split, held-out documents, readers, tokenizer, cache."""

import itertools
import json
import math

import numpy as np
import pytest

from deepseek_jax.train import data, documents
from deepseek_jax.train import tokenizer as tokenizer_lib
from deepseek_jax.train.data import DataConfig, load_corpus


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    """40 small real documents (stdlib sources), each tagged with a unique marker line."""
    root = tmp_path_factory.mktemp("corpus")
    docs = itertools.islice(documents.iter_stdlib_documents(), 40)
    for i, text in enumerate(docs):
        (root / f"doc{i:02d}.py").write_text(f"# marker-{i:02d}-end\n{text[:8000]}")
    return root


def _cfg(path, tmp_path, **kw):
    return DataConfig(
        path=str(path), vocab_size=512, cache_dir=str(tmp_path / "cache"), progress=False, **kw
    )


# ------------------------------------------------------------------------------ batches


def test_batch_is_a_pure_function_of_seed_and_step():
    tokens = np.arange(5000, dtype=np.uint16)
    a = data.sample_batch(tokens, 0, 7, 8, 16)
    assert a.shape == (8, 17) and a.dtype == np.int32
    np.testing.assert_array_equal(a, data.sample_batch(tokens, 0, 7, 8, 16))
    assert not np.array_equal(a, data.sample_batch(tokens, 0, 8, 8, 16))
    assert not np.array_equal(a, data.sample_batch(tokens, 1, 7, 8, 16))
    np.testing.assert_array_equal(a[:, 1:], a[:, :-1] + 1)  # contiguous windows


@pytest.mark.parametrize("process_count", [1, 2, 4])
def test_process_rows_concatenate_to_the_global_batch(process_count):
    tokens = np.arange(5000, dtype=np.uint16)
    kw = lambda p: dict(process_index=p, process_count=process_count)  # noqa: E731
    whole = data.sample_batch(tokens, 3, 11, 8, 16)
    parts = [data.sample_batch(tokens, 3, 11, 8, 16, **kw(p)) for p in range(process_count)]
    np.testing.assert_array_equal(np.concatenate(parts), whole)
    whole_eval = list(data.eval_batches(tokens, 8, 16))
    for b, batch in enumerate(whole_eval):
        parts = [list(data.eval_batches(tokens, 8, 16, **kw(p)))[b] for p in range(process_count)]
        np.testing.assert_array_equal(np.concatenate(parts), batch)


def test_batch_rejects_indivisible_process_split():
    with pytest.raises(ValueError, match="not divisible by 3 processes"):
        data.sample_batch(np.arange(100), 0, 0, 8, 4, process_index=0, process_count=3)


def test_eval_batches_predict_each_token_once_in_a_fixed_order():
    tokens = np.arange(1000, dtype=np.uint16)
    batches = list(data.eval_batches(tokens, 4, 10))
    assert len(batches) == data.num_eval_batches(1000, 4, 10) == 24
    targets = np.concatenate([b[:, 1:].ravel() for b in batches])
    assert len(set(targets.tolist())) == targets.size  # no target twice
    first = list(data.eval_batches(tokens, 4, 10, max_batches=3))
    for x, y in zip(first, batches[:3], strict=True):
        np.testing.assert_array_equal(x, y)
    with pytest.raises(ValueError, match="cannot fill one batch"):
        data.num_eval_batches(30, 4, 10)


def test_unigram_entropy_matches_hand_computation():
    h = data.unigram_entropy(np.array([0, 0, 1, 2, 0, 0, 1, 2], np.uint16))
    assert h == pytest.approx(-(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25)))
    assert data.unigram_entropy(np.full(10, 5)) == 0.0


# ------------------------------------------------------------------------------ readers


def test_jsonl_reads_the_text_field(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "first doc", "id": 1}\n\n"a bare string"\n{"text": "third\\nline"}\n')
    assert list(documents.iter_path_documents(p)) == ["first doc", "a bare string", "third\nline"]
    p.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(ValueError, match=r"d.jsonl:2: expected an object with a string 'text'"):
        list(documents.iter_path_documents(p))
    p.write_text("{not json\n")
    with pytest.raises(ValueError, match=r"d.jsonl:1: not a JSON line"):
        list(documents.iter_path_documents(p))


def test_folder_reads_text_files_recursively_in_sorted_order(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / ".git").mkdir()
    (tmp_path / "a.txt").write_text("A")
    (tmp_path / "b" / "c.md").write_text("C")
    (tmp_path / "b" / "d.jsonl").write_text('{"text": "D1"}\n{"text": "D2"}\n')
    (tmp_path / "b" / "e.py").write_text("E = 1")
    (tmp_path / "b" / "skip.bin").write_text("not text")
    (tmp_path / ".git" / "x.txt").write_text("hidden")
    assert list(documents.iter_path_documents(tmp_path)) == ["A", "C", "D1", "D2", "E = 1"]


def test_stdlib_reader_skips_tests_site_packages_and_large_files(tmp_path):
    for rel, size in [
        ("a.py", 10),
        ("pkg/b.py", 10),
        ("test/t.py", 10),
        ("site-packages/s.py", 10),
        ("big.py", documents.STDLIB_MAX_FILE_BYTES + 1),
    ]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(rel[0] * size)
    assert list(documents.iter_stdlib_documents(tmp_path)) == ["a" * 10, "p" * 10]


def test_missing_or_empty_data_path_is_a_one_line_error(tmp_path):
    with pytest.raises(ValueError, match=r"data path .*nowhere does not exist"):
        load_corpus(_cfg(tmp_path / "nowhere", tmp_path))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "blank.txt").write_text("  \n")
    with pytest.raises(ValueError, match=r"data path .*empty holds no text") as e:
        load_corpus(_cfg(tmp_path / "empty", tmp_path))
    assert "\n" not in str(e.value)


def test_max_bytes_caps_what_is_read(tmp_path):
    (tmp_path / "big.txt").write_text("x" * 5000)
    with pytest.warns(UserWarning, match="max_bytes"):
        docs = documents.read_documents(tmp_path / "big.txt", max_bytes=1000)
    assert docs == ["x" * 1000]


# -------------------------------------------------------------------------------- split


def test_eval_split_holds_out_whole_documents(corpus_dir, tmp_path):
    docs = documents.read_documents(corpus_dir, 1 << 30)
    train, held = documents.split_documents(docs, 0.1)
    assert len(held) == 4 and len(train) == 36
    assert not set(train) & set(held) and sorted(train + held) == sorted(docs)
    corpus = load_corpus(_cfg(corpus_dir, tmp_path, eval_fraction=0.1))
    train_text = corpus.tokenizer.decode(corpus.train_tokens)
    eval_text = corpus.tokenizer.decode(corpus.eval_tokens)
    for d in held:
        marker = d.split("\n", 1)[0]
        assert marker in eval_text and marker not in train_text


def test_too_few_documents_hold_out_the_tail_at_a_line_boundary():
    text = "".join(f"line {i}\n" for i in range(100))
    train, held = documents.split_documents([text], 0.05)
    assert "".join(train + held) == text
    assert held[0].startswith("line ") and train[0].endswith("\n")
    assert 0.03 < len(held[0]) / len(text) < 0.07


# ---------------------------------------------------------------------------- tokenizer


def test_bpe_round_trips_text(corpus_dir, tmp_path):
    corpus = load_corpus(_cfg(corpus_dir, tmp_path))
    tok = corpus.tokenizer
    assert tok.vocab_size == 512 and corpus.train_tokens.dtype == np.uint16
    text = "def f(x):\n    return x  # héllo wörld — 漢字 🙂\t<|endoftext|>\n"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.eot_id not in ids  # a literal marker in text is text, not a separator
    assert len(ids) < len(text.encode())  # merges were learned
    assert (corpus.train_tokens == tok.eot_id).sum() == corpus.n_train_docs


def test_byte_tokenizer_fits_256_and_round_trips(corpus_dir, tmp_path):
    corpus = load_corpus(_cfg(corpus_dir, tmp_path, byte_level=True))
    tok = corpus.tokenizer
    assert tok.vocab_size == 256 and corpus.train_tokens.dtype == np.uint8
    text = "héllo\n漢字 🙂"
    assert tok.decode(tok.encode(text)) == text
    corpus.check_vocab(256)
    with pytest.raises(ValueError, match="model vocab_size 255 is smaller than the tokenizer's"):
        corpus.check_vocab(255)


def test_config_rejects_bpe_without_room_for_merges():
    with pytest.raises(ValueError, match="byte_level=True"):
        DataConfig(vocab_size=256)


# -------------------------------------------------------------------------------- cache


def test_second_load_reuses_the_cache(corpus_dir, tmp_path, monkeypatch):
    first = load_corpus(_cfg(corpus_dir, tmp_path))
    stamp = (first.cache_path / "tokenizer.json").stat().st_mtime_ns

    def fail(*args, **kwargs):
        raise AssertionError("rebuilt despite a cache")

    monkeypatch.setattr(tokenizer_lib, "train_bpe", fail)
    monkeypatch.setattr(data, "encode_documents", fail)
    second = load_corpus(_cfg(corpus_dir, tmp_path))
    assert second.cache_path == first.cache_path
    assert (second.cache_path / "tokenizer.json").stat().st_mtime_ns == stamp
    np.testing.assert_array_equal(second.train_tokens, first.train_tokens)
    np.testing.assert_array_equal(second.eval_tokens, first.eval_tokens)
    np.testing.assert_array_equal(second.batch(0, 3, 4, 32), first.batch(0, 3, 4, 32))


def test_cache_key_follows_the_text_and_the_vocab(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(30):
        (src / f"{i}.txt").write_text(f"document {i}: " + "the quick brown fox. " * 20)
    a = load_corpus(_cfg(src, tmp_path))
    b = load_corpus(
        DataConfig(path=str(src), vocab_size=300, cache_dir=str(tmp_path / "cache"), progress=False)
    )
    (src / "0.txt").write_text("changed")
    c = load_corpus(_cfg(src, tmp_path))
    assert len({a.cache_path, b.cache_path, c.cache_path}) == 3
    meta = json.loads((a.cache_path / "meta.json").read_text())
    assert meta["n_train_docs"] + meta["n_eval_docs"] == 30


def test_long_documents_are_encoded_in_pieces_without_loss(monkeypatch):
    monkeypatch.setattr(data, "_ENCODE_CHUNK_CHARS", 100)
    tok = tokenizer_lib.ByteTokenizer()
    docs = ["".join(f"line {i}\n" for i in range(200)), "short", "x" * 350]
    tokens = data.encode_documents(tok, docs)
    assert tokens.tolist() == [t for d in docs for t in [*d.encode(), tok.eot_id]]
