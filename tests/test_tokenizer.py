"""Byte and BPE tokenizers: exact round-trips, save/load. Run: pytest tests/test_tokenizer.py"""

import json
import string
import textwrap
from pathlib import Path

import pytest

from pipeline.config import ConfigError
from pipeline.tokenizer import BOS, EOS, PAD, Tokenizer, byte_tokenizer, train_bpe

TEXTS = [
    "",
    "hello world",
    "héllo wörld — ünïcödé 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 🎉👩‍👩‍👧 中文 العربية",
    "  leading spaces\n\ttabs\r\nwindows newlines\x00nul\x7f",
    "def f(x):\n    return x ** 2  # comment\n",
    "literal special <|eos|> inside text",
]
CORPUS = [Path(m.__file__).read_text() for m in (json, textwrap, string)]


@pytest.mark.parametrize("text", TEXTS)
def test_byte_round_trip(text):
    tok = byte_tokenizer()
    ids = tok.encode(text)
    assert tok.decode(ids, skip_special=False) == text
    if "<|" not in text:
        assert ids == list(text.encode("utf-8"))  # id b is byte b


def test_byte_specials_and_size():
    tok = byte_tokenizer()
    assert tok.vocab_size == 263 and tok.is_byte_level
    assert [tok.pad_id, tok.bos_id, tok.eos_id] == [256, 257, 258]
    assert tok.decode([tok.bos_id, 104, 105, tok.eos_id]) == "hi"
    assert tok.decode([tok.bos_id, 104, tok.eos_id], skip_special=False) == f"{BOS}h{EOS}"
    assert tok.encode(PAD) == [tok.pad_id]


def test_invalid_utf8_never_crashes():
    tok = byte_tokenizer()
    assert tok.decode([0xFF, 0xFE, 65, 0xC3]) == "\ufffd\ufffdA\ufffd"
    assert tok.decode([10_000, -1, 65]) == "A"  # ids outside the vocabulary are dropped
    bpe = train_bpe(iter(CORPUS), 300)
    bpe.decode(list(range(300)))


def test_fast_batch_path_matches_slow_path():
    tok = byte_tokenizer()
    fast = tok.encode_batch(TEXTS)
    assert [list(a) for a in fast] == [tok.encode(t) for t in TEXTS]


@pytest.mark.parametrize("text", TEXTS)
def test_bpe_round_trip(text):
    tok = train_bpe(iter(CORPUS), 300)
    assert tok.decode(tok.encode(text), skip_special=False) == text


def test_bpe_trains_saves_and_reloads(tmp_path):
    tok = train_bpe(iter(CORPUS), 300)
    assert tok.vocab_size == 300 and not tok.is_byte_level
    text = "def add(a, b):\n    return Point(a, b)\n"
    assert len(tok.encode(text)) < len(text.encode())  # merges learned something
    path = tok.save(tmp_path)
    assert path.name == "tokenizer.json"
    again = Tokenizer.load(tmp_path)
    assert again.encode(text) == tok.encode(text)
    assert [again.pad_id, again.bos_id, again.eos_id] == [tok.pad_id, tok.bos_id, tok.eos_id]
    assert [list(a) for a in again.encode_batch(TEXTS)] == [tok.encode(t) for t in TEXTS]


def test_missing_tokenizer_file(tmp_path):
    with pytest.raises(ConfigError, match="tokenizer file not found"):
        Tokenizer.load(tmp_path / "nope")
