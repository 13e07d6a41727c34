"""Corpus → documents → cached token files → step-indexed batches.

Sources: the embedded default (`stdlib`: the `.py` files of the running interpreter's standard
library, so a first run needs no download), a text file, a folder, a glob, or a JSONL file with a
text field. Documents are split into train and validation deterministically, tokenized once into
flat token files (numpy memmaps) under `data.cache_dir`, keyed by a hash of the content and the
tokenizer. The batch for step s is a pure function of (seed, s), so a resumed run needs only s.
"""

from __future__ import annotations

import ast
import contextlib
import glob
import hashlib
import importlib
import io
import itertools
import json
import os
import shutil
import sysconfig
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.config import Config, ConfigError, DataConfig
from pipeline.tokenizer import SPECIAL_TOKENS, Tokenizer, build_tokenizer, token_dtype

CACHE_VERSION = 2


def stdlib_files() -> list[Path]:
    """The interpreter's standard-library `.py` files (no site-packages), sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(
        p for p in root.rglob("*.py") if not {"site-packages", "dist-packages"} & set(p.parts)
    )


def python_functions(path: Path):
    """(the file's source lines, a function's `ast` node) for every function of a Python file;
    nothing for a file that is not UTF-8 or does not parse."""
    try:
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source)
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return
    lines = source.splitlines()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield lines, node


def read_documents(cfg: DataConfig) -> list[str]:
    """The corpus as a list of documents (a file each, or a JSONL line each)."""
    source = cfg.source
    table = _table_source(Path(source))
    if source == "stdlib":
        docs = _read_files(stdlib_files(), cfg.max_docs)
    elif table is not None:
        docs = list(itertools.islice(_table_texts(table, cfg.text_field), cfg.max_docs))
    elif Path(source).is_file() and source.endswith(JSONL_SUFFIXES):
        docs = _read_jsonl(Path(source), cfg.text_field, cfg.max_docs)
    elif Path(source).is_file():
        docs = _read_files([Path(source)], cfg.max_docs)
    elif Path(source).is_dir():
        files = sorted(p for p in Path(source).rglob("*") if p.is_file() and not _hidden(p))
        docs = _read_files(files, cfg.max_docs)
    elif glob.has_magic(source):
        files = sorted(Path(p) for p in glob.glob(source, recursive=True) if Path(p).is_file())
        if not files:
            raise ConfigError(f"data.source: no files match the glob {source!r}")
        docs = _read_files(files, cfg.max_docs)
    else:
        raise ConfigError(f"data.source: path not found: {source}")
    if not docs:
        raise ConfigError(
            f"data.source: the corpus {source!r} is empty (no non-empty text documents)"
        )
    return docs


def _hidden(path: Path) -> bool:
    return any(part.startswith(".") for part in path.parts)


def _read_files(files: list[Path], limit: int | None) -> list[str]:
    docs = []
    for path in files:
        raw = path.read_bytes()
        if not raw.strip() or b"\0" in raw:
            continue  # empty or binary
        try:
            docs.append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            continue  # not UTF-8 text: a few stdlib test files use legacy encodings on purpose
        if limit is not None and len(docs) >= limit:
            break
    return docs


JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")
TABLE_SUFFIXES = (".parquet", ".arrow")


def _open_text(path: Path):
    """A text stream over a .jsonl, .jsonl.gz or .jsonl.zst file, decompressed as it is read."""
    if path.name.endswith(".gz"):
        import gzip

        return gzip.open(path, "rt", encoding="utf-8")
    if path.name.endswith(".zst"):
        zstd = _optional("zstandard", "a .jsonl.zst source")
        return io.TextIOWrapper(zstd.ZstdDecompressor().stream_reader(path.open("rb")), "utf-8")
    return path.open(encoding="utf-8")


def _optional(module: str, what: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(
            f"data.source: {what} needs the {module} package: pip install -e '.[data]'"
        ) from None


def _table_source(path: Path) -> list[Path] | None:
    """The Parquet / Arrow files of a source (a file, a folder of them, or a folder written by
    `datasets.save_to_disk`); None when the source is not one."""
    if path.is_file():
        return [path] if path.name.endswith(TABLE_SUFFIXES) else None
    if not path.is_dir():
        return None
    files = sorted(p for p in path.rglob("*") if p.is_file() and not _hidden(p))
    tables = [p for p in files if p.name.endswith(TABLE_SUFFIXES)]
    return tables if tables and len(tables) == len([p for p in files if _data_file(p)]) else None


def _data_file(path: Path) -> bool:
    # a save_to_disk folder also holds dataset_info.json and state.json
    return path.name not in ("dataset_info.json", "state.json", "dataset_dict.json")


def _table_texts(files: list[Path], text_field: str):
    """The non-empty strings of column `text_field`, a record batch at a time (bounded memory)."""
    pa = _optional("pyarrow", "a Parquet or Arrow source")
    for path in files:
        for batch in _record_batches(pa, path, text_field):
            if text_field not in batch.schema.names:
                raise ConfigError(
                    f"{path}: no column {text_field!r} (data.text_field); it has "
                    + ", ".join(batch.schema.names)
                )
            for text in batch.column(text_field).to_pylist():
                if not isinstance(text, str):
                    raise ConfigError(f"{path}: column {text_field!r} holds {type(text).__name__}")
                if text:
                    yield text


def _record_batches(pa, path: Path, text_field: str):
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        parquet = pq.ParquetFile(path)
        names = parquet.schema_arrow.names
        yield from parquet.iter_batches(columns=[text_field] if text_field in names else None)
        return
    with path.open("rb") as f:  # Arrow IPC: the stream format (datasets) or the file format
        try:
            reader = pa.ipc.open_stream(f)
        except pa.ArrowInvalid:
            f.seek(0)
            file = pa.ipc.open_file(f)
            yield from (file.get_batch(i) for i in range(file.num_record_batches))
            return
        yield from reader


def _read_jsonl(path: Path, text_field: str, limit: int | None) -> list[str]:
    docs = []
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ConfigError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                raise ConfigError(
                    f"{path}:{lineno}: no string field {text_field!r} (data.text_field)"
                )
            if record[text_field]:
                docs.append(record[text_field])
            if limit is not None and len(docs) >= limit:
                break
    return docs


def split_documents(num_docs: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic train/validation document indices (at least one of each when possible)."""
    order = np.random.default_rng(seed).permutation(num_docs)
    num_val = int(round(num_docs * val_fraction))
    if val_fraction > 0 and num_docs >= 2:
        num_val = min(max(num_val, 1), num_docs - 1)
    return np.sort(order[num_val:]), np.sort(order[:num_val])


@dataclass
class Dataset:
    """Tokenized train and validation streams plus what made them."""

    tokenizer: Tokenizer
    train: np.ndarray  # flat token ids, documents separated by EOS
    val: np.ndarray
    meta: dict

    def summary(self) -> dict:
        return {
            "source": self.meta["source"],
            "documents": self.meta["train_docs"] + self.meta["val_docs"],
            "train_docs": self.meta["train_docs"],
            "val_docs": self.meta["val_docs"],
            "train_tokens": int(self.train.size),
            "val_tokens": int(self.val.size),
            "bytes": self.meta["bytes"],
            "vocab_size": self.tokenizer.vocab_size,
            "cache": self.meta["cache"],
        }


def prepare_dataset(cfg: Config, tokenizer: Tokenizer | None = None) -> Dataset:
    """Read, split, tokenize (cached) and check the corpus a config names."""
    dcfg = cfg.data
    docs = read_documents(dcfg)
    train_idx, val_idx = split_documents(len(docs), dcfg.val_fraction, dcfg.seed)
    corpus_hash = _hash_docs(docs)
    if tokenizer is None:
        tokenizer = _cached_tokenizer(cfg, docs, train_idx, corpus_hash)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"model.vocab_size: {cfg.model.vocab_size} is smaller than the tokenizer's "
            f"{tokenizer.vocab_size} tokens; set model.vocab_size >= {tokenizer.vocab_size}"
        )
    key = _hash_strings(
        [
            str(CACHE_VERSION),
            corpus_hash,
            tokenizer.fingerprint(),
            str(dcfg.val_fraction),
            str(dcfg.seed),
        ]
    )
    directory = Path(dcfg.cache_dir) / f"tokens-{key[:16]}"
    if not (directory / "meta.json").is_file():
        _write_tokens(directory, docs, train_idx, val_idx, tokenizer, dcfg)
    meta = json.loads((directory / "meta.json").read_text())
    dtype = np.dtype(meta["dtype"])
    train = _load(directory / "train.bin", dtype)
    val = _load(directory / "val.bin", dtype)
    _check_length(train, dcfg.seq_len, "train")
    return Dataset(tokenizer, train, val, {**meta, "cache": str(directory)})


def _load(path: Path, dtype: np.dtype) -> np.ndarray:
    if path.stat().st_size == 0:
        return np.zeros((0,), dtype)
    return np.memmap(path, dtype=dtype, mode="r")


def _check_length(tokens: np.ndarray, seq_len: int, split: str) -> None:
    if tokens.size < seq_len + 1:
        raise ConfigError(
            f"data.seq_len: the {split} split has {tokens.size} tokens, fewer than one window of "
            f"data.seq_len+1={seq_len + 1}; use more data (data.max_docs) or a shorter data.seq_len"
        )


def _cached_tokenizer(cfg: Config, docs, train_idx, corpus_hash: str) -> Tokenizer:
    tcfg = cfg.tokenizer
    if tcfg.path or tcfg.kind == "byte":
        return build_tokenizer(tcfg)
    vocab = tcfg.vocab_size or cfg.model.vocab_size
    key = _hash_strings(
        [
            "bpe",
            str(CACHE_VERSION),
            corpus_hash,
            str(vocab),
            str(tcfg.train_max_bytes),
            *SPECIAL_TOKENS,
        ]
    )
    path = Path(cfg.data.cache_dir) / f"tokenizer-{key[:16]}" / "tokenizer.json"
    if path.is_file():
        return Tokenizer.load(path)
    texts = _take_bytes((docs[i] for i in train_idx), tcfg.train_max_bytes)
    tokenizer = build_tokenizer(tcfg, texts, vocab)
    with _atomic_dir(path.parent) as tmp:
        tokenizer.save(tmp)
    return tokenizer


def _take_bytes(texts, limit: int):
    total = 0
    for text in texts:
        if total >= limit:
            return
        total += len(text)
        yield text


def _write_tokens(
    directory: Path, docs, train_idx, val_idx, tokenizer: Tokenizer, dcfg: DataConfig
):
    dtype = token_dtype(tokenizer.vocab_size)
    streams = {}
    for split, idx in (("train", train_idx), ("val", val_idx)):
        ids = tokenizer.encode_batch([docs[i] for i in idx])
        eos = np.array([tokenizer.eos_id], dtype)
        pieces = [piece for doc in ids for piece in (doc.astype(dtype), eos)]
        streams[split] = np.concatenate(pieces) if pieces else np.zeros((0,), dtype)
    if len(docs) == 1 and dcfg.val_fraction > 0:
        # One document cannot be split by document: hold out its tail instead.
        tokens = streams["train"]
        cut = int(len(tokens) * (1 - dcfg.val_fraction))
        streams = {"train": tokens[:cut], "val": tokens[cut:]}
    meta = {
        "source": dcfg.source,
        "max_docs": dcfg.max_docs,
        "train_docs": len(train_idx),
        "val_docs": len(val_idx),
        "bytes": sum(len(d.encode("utf-8")) for d in docs),
        "dtype": dtype.name,
        "vocab_size": tokenizer.vocab_size,
    }
    with _atomic_dir(directory) as tmp:
        for split, tokens in streams.items():
            tokens.tofile(tmp / f"{split}.bin")
        tokenizer.save(tmp)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))


@contextlib.contextmanager
def _atomic_dir(target: Path) -> Iterator[Path]:
    """Write into a temporary sibling, then rename: readers never see a half-written cache."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        yield tmp
        with contextlib.suppress(OSError):  # another process finished the same cache first
            os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _hash_docs(docs: list[str]) -> str:
    h = hashlib.sha256()
    for doc in docs:
        data = doc.encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def _hash_strings(parts: list[str]) -> str:
    return _hash_docs(parts)


class Sampler:
    """Fixed-length windows of a token stream, as a pure function of (seed, step).

    The global batch for a step is `global_batch` windows of `seq_len + 1` tokens (inputs and
    shifted targets). It is the same whatever the device count; a process of a multi-process
    run reads only its own rows.
    """

    def __init__(
        self, tokens: np.ndarray, seq_len: int, global_batch: int, seed: int, shuffle=True
    ):
        _check_length(tokens, seq_len, "selected")
        self.tokens, self.seq_len, self.global_batch = tokens, seq_len, global_batch
        self.seed, self.shuffle = seed, shuffle

    def starts(self, step: int) -> np.ndarray:
        """Start offsets of the global batch's windows for `step`, shape (global_batch,)."""
        num_starts = self.tokens.size - self.seq_len  # last valid start is size - (seq_len + 1)
        if self.shuffle:
            rng = np.random.default_rng([self.seed, step])
            return rng.integers(0, num_starts, size=self.global_batch)
        # Sequential, non-overlapping windows (evaluation), wrapping around the stream.
        rows = step * self.global_batch + np.arange(self.global_batch)
        return (rows * self.seq_len) % num_starts

    def batch(
        self, step: int, num_devices: int = 1, process_index: int = 0, process_count: int = 1
    ) -> np.ndarray:
        """This process's share of the global batch: (local_devices, per_device, seq_len + 1)."""
        if self.global_batch % num_devices or num_devices % process_count:
            raise ConfigError(
                f"train.batch_size: {self.global_batch} does not split evenly over {num_devices} "
                f"devices in {process_count} processes"
            )
        rows = self.global_batch // process_count
        starts = self.starts(step)[process_index * rows : (process_index + 1) * rows]
        windows = self.tokens[starts[:, None] + np.arange(self.seq_len + 1)]
        return windows.astype(np.int32).reshape(num_devices // process_count, -1, self.seq_len + 1)


def lm_batch(sampler: Sampler, step: int, eos_id: int | None = None) -> dict:
    """This process's rows of the global batch for `step`: tokens (rows, T+1). With `eos_id`
    (data.document_masking) also "segments": the documents a window holds, numbered from 1,
    a new one after each EOS (which ends the document before it)."""
    import jax

    count = jax.process_count()
    tokens = sampler.batch(step, count, jax.process_index(), count)[0]
    if eos_id is None:
        return {"tokens": tokens}
    return {"tokens": tokens, "segments": document_segments(tokens, eos_id)}


def document_segments(tokens: np.ndarray, eos_id: int) -> np.ndarray:
    """(rows, T) token windows -> segment ids: 1 + the EOS tokens before each position."""
    ends = np.asarray(tokens) == eos_id
    before = np.concatenate([np.zeros_like(ends[:, :1]), ends[:, :-1]], axis=1)
    return (1 + np.cumsum(before, axis=1)).astype(np.int32)
