"""Corpus → documents → token store → step-indexed batches.

Sources: the embedded default (`stdlib`: the `.py` files of the running interpreter's standard
library, so a first run needs no download), a text file, a folder, a glob, a JSONL file (plain,
gzip or zstd) with a text field, Parquet / Arrow files; `data.mixture` mixes several. Documents
stream into a token store (`store.py`: content-addressed shards tokenized in parallel, split
into train and validation deterministically, flat token memmaps). The batch for step s is a
pure function of (seed, s), so a resumed run needs only s.
"""

from __future__ import annotations

import ast
import dataclasses
import glob
import io
import itertools
import json
import os
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.config import Config, ConfigError, DataConfig, optional_import
from pipeline.store import (
    STORE_VERSION,
    atomic_dir,
    build_store,
    hash_strings,
    shard_documents,
    split_documents,
)
from pipeline.tokenizer import SPECIAL_TOKENS, Tokenizer, build_tokenizer


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
    """The corpus as a list of documents (a file each, or a JSONL line or table row each)."""
    docs = list(iter_documents(cfg))
    if not docs:
        raise ConfigError(
            f"data.source: the corpus {cfg.source!r} is empty (no non-empty text documents)"
        )
    return docs


def iter_documents(cfg: DataConfig) -> Iterator[str]:
    """The corpus's documents as a stream (a file or a record batch in memory at a time)."""
    source = cfg.source
    table = _table_source(Path(source))
    if source == "stdlib":
        docs = _read_files(stdlib_files())
    elif table is not None:
        docs = _table_texts(table, cfg.text_field)
    elif Path(source).is_file() and source.endswith(JSONL_SUFFIXES):
        docs = _read_jsonl(Path(source), cfg.text_field)
    elif Path(source).is_file():
        docs = _read_files([Path(source)])
    elif Path(source).is_dir():
        files = sorted(p for p in Path(source).rglob("*") if p.is_file() and not _hidden(p))
        docs = _read_files(files)
    elif glob.has_magic(source):
        files = sorted(Path(p) for p in glob.glob(source, recursive=True) if Path(p).is_file())
        if not files:
            raise ConfigError(f"data.source: no files match the glob {source!r}")
        docs = _read_files(files)
    else:
        raise ConfigError(f"data.source: path not found: {source}")
    return itertools.islice(docs, cfg.max_docs)


def _hidden(path: Path) -> bool:
    return any(part.startswith(".") for part in path.parts)


def _read_files(files: list[Path]) -> Iterator[str]:
    for path in files:
        raw = path.read_bytes()
        if not raw.strip() or b"\0" in raw:
            continue  # empty or binary
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError:
            continue  # not UTF-8 text: a few stdlib test files use legacy encodings on purpose


JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")
TABLE_SUFFIXES = (".parquet", ".arrow")


def _open_text(path: Path):
    """A text stream over a .jsonl, .jsonl.gz or .jsonl.zst file, decompressed as it is read."""
    if path.name.endswith(".gz"):
        import gzip

        return gzip.open(path, "rt", encoding="utf-8")
    if path.name.endswith(".zst"):
        zstd = optional_import("zstandard", "data.source: a .jsonl.zst source", "data")
        return io.TextIOWrapper(zstd.ZstdDecompressor().stream_reader(path.open("rb")), "utf-8")
    return path.open(encoding="utf-8")


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
    pa = optional_import("pyarrow", "data.source: a Parquet or Arrow source", "data")
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


def json_object(where: str, line: str) -> dict:
    """One JSONL line as a dict, or a ConfigError naming `where` (file:line)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{where}: not valid JSON ({err.msg})") from None
    if not isinstance(record, dict):
        raise ConfigError(f"{where}: expected a JSON object")
    return record


def _read_jsonl(path: Path, text_field: str) -> Iterator[str]:
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
                yield record[text_field]


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
    """Read, split, tokenize (into the token store, built once) and check the corpus a config
    names. In a multi-process run process 0 builds the store while the others wait, then
    they find it complete."""
    dcfg = cfg.data
    if _is_store(Path(dcfg.source)):
        return _open_store(Path(dcfg.source), cfg, tokenizer)
    if tokenizer is None:
        tokenizer = _cached_tokenizer(cfg)
    _check_vocab(tokenizer, cfg)
    jax = sys.modules.get("jax")  # imported by every multi-process run, never needed here
    others = jax is not None and jax.process_count() > 1
    if others and jax.process_index() != 0:
        _sync(jax, "token store built")
    directory = build_store(
        _documents(dcfg),
        tokenizer,
        Path(dcfg.cache_dir),
        val_fraction=dcfg.val_fraction,
        seed=dcfg.seed,
        shard_bytes=int(dcfg.shard_mb * 1e6),
        workers=dcfg.tokenize_workers or len(os.sched_getaffinity(0)),
        meta={"source": dcfg.source, "max_docs": dcfg.max_docs},
    )
    if others and jax.process_index() == 0:
        _sync(jax, "token store built")
    return _open_store(directory, cfg, tokenizer)


def _check_vocab(tokenizer: Tokenizer, cfg: Config) -> None:
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"model.vocab_size: {cfg.model.vocab_size} is smaller than the tokenizer's "
            f"{tokenizer.vocab_size} tokens; set model.vocab_size >= {tokenizer.vocab_size}"
        )


def _is_store(path: Path) -> bool:
    """Whether `path` is a complete token store (`pipeline tokenize` made it)."""
    return all((path / name).is_file() for name in ("meta.json", "train.bin", "tokenizer.json"))


def _open_store(directory: Path, cfg: Config, tokenizer: Tokenizer | None) -> Dataset:
    """A token store's train and validation tokens as memmaps, with the tokenizer that made
    them (a store given as `data.source` brings its own; another one given here is refused)."""
    made_by = Tokenizer.load(directory)
    if tokenizer is None:
        tokenizer = made_by
    elif tokenizer.fingerprint() != made_by.fingerprint():
        raise ConfigError(
            f"data.source: the token store {directory} was made with another tokenizer than "
            "this run's; tokenize the text again (pipeline tokenize) or use that store's"
        )
    _check_vocab(tokenizer, cfg)
    meta = json.loads((directory / "meta.json").read_text())
    dtype = np.dtype(meta["dtype"])
    train = _load(directory / "train.bin", dtype)
    val = _load(directory / "val.bin", dtype)
    _check_length(train, cfg.data.seq_len, "train")
    return Dataset(tokenizer, train, val, {**meta, "cache": str(directory)})


def mixture_configs(dcfg: DataConfig) -> list[tuple[DataConfig, float]]:
    """A `data.mixture`'s sources, each as the data section that reads it alone, with its
    weight; [] when there is no mixture."""
    return [
        (dataclasses.replace(dcfg, source=m.source, text_field=m.text_field, mixture=()), m.weight)
        for m in dcfg.mixture
    ]


def prepare_mixture(cfg: Config, tokenizer: Tokenizer | None = None) -> list[MixturePart]:
    """Each source of `data.mixture` prepared as `prepare_dataset` prepares one (a token store
    of its own, its own validation split), all with the same tokenizer."""
    tokenizer = tokenizer or _cached_tokenizer(cfg)
    names = source_names([m.source for m in cfg.data.mixture])
    return [
        MixturePart(name, weight, prepare_dataset(dataclasses.replace(cfg, data=dcfg), tokenizer))
        for name, (dcfg, weight) in zip(names, mixture_configs(cfg.data), strict=True)
    ]


@dataclass
class MixturePart:
    name: str  # short and unique in the mixture: metrics are named after it (eval_loss/NAME)
    weight: float
    dataset: Dataset


def source_names(sources: list[str]) -> list[str]:
    """Short unique names for sources: the file or folder name without its suffixes."""
    stems = [Path(s).name.split(".")[0] or "source" for s in sources]
    return [stem if stems.count(stem) == 1 else f"{stem}{i}" for i, stem in enumerate(stems)]


def _sync(jax, name: str) -> None:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def _documents(dcfg: DataConfig) -> Iterator[str]:
    """`iter_documents`, with a clear error for a corpus with none."""
    docs = iter_documents(dcfg)
    first = next(docs, None)
    if first is None:
        raise ConfigError(
            f"data.source: the corpus {dcfg.source!r} is empty (no non-empty text documents)"
        )
    return itertools.chain([first], docs)


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


def _cached_tokenizer(cfg: Config) -> Tokenizer:
    """The configured tokenizer; a BPE trained here is keyed by the text it trains on (the
    first `tokenizer.train_max_bytes` of the train split) and cached."""
    tcfg = cfg.tokenizer
    if tcfg.path or tcfg.kind == "byte":
        return build_tokenizer(tcfg)
    vocab = tcfg.vocab_size or cfg.model.vocab_size
    sources = mixture_configs(cfg.data) or [(cfg.data, 1.0)]
    total = sum(weight for _, weight in sources)
    texts = [  # a mixture: each source's share of the bytes in proportion to its weight
        text
        for dcfg, weight in sources
        for text in _take_bytes(_train_texts(dcfg), int(tcfg.train_max_bytes * weight / total))
    ]
    key = hash_strings(
        ["bpe", str(STORE_VERSION), hash_strings(texts), str(vocab), *SPECIAL_TOKENS]
    )
    path = Path(cfg.data.cache_dir) / f"tokenizer-{key[:16]}" / "tokenizer.json"
    if path.is_file():
        return Tokenizer.load(path)
    tokenizer = build_tokenizer(tcfg, iter(texts), vocab)
    with atomic_dir(path.parent) as tmp:
        tokenizer.save(tmp)
    return tokenizer


def _train_texts(dcfg: DataConfig) -> Iterator[str]:
    """The train split's documents in corpus order, as the token store splits them."""
    for texts in shard_documents(_documents(dcfg), int(dcfg.shard_mb * 1e6)):
        train, _ = split_documents(len(texts), dcfg.val_fraction, dcfg.seed)
        yield from (texts[i] for i in train)


def _take_bytes(texts, limit: int):
    total = 0
    for text in texts:
        if total >= limit:
            return
        total += len(text)
        yield text


class _Rows:
    """A sampler: `rows(step, index)` gives rows `index` of the global batch for `step`."""

    seq_len: int
    global_batch: int

    def rows(self, step: int, index: np.ndarray) -> dict:
        raise NotImplementedError

    def batch(
        self, step: int, num_devices: int = 1, process_index: int = 0, process_count: int = 1
    ) -> np.ndarray:
        """This process's share of the global batch: (local_devices, per_device, seq_len + 1)."""
        index = _process_rows(self.global_batch, num_devices, process_index, process_count)
        tokens = self.rows(step, index)["tokens"]
        return tokens.reshape(num_devices // process_count, -1, self.seq_len + 1)


class Sampler(_Rows):
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

    def rows(self, step: int, index: np.ndarray) -> dict:
        """Rows `index` of the global batch for `step`: {"tokens": (len(index), seq_len + 1)}."""
        starts = self.starts(step)[index]
        windows = self.tokens[starts[:, None] + np.arange(self.seq_len + 1)]
        return {"tokens": windows.astype(np.int32)}


class PackedSampler(_Rows):
    """Rows of whole documents (`data.packing=best_fit`): the documents of a token stream (each
    ending with its EOS; one longer than a row is cut into row-sized pieces) packed into rows of
    `seq_len + 1` tokens by best-fit decreasing, padded at the end. Each row carries segment ids
    (1, 2, ... per document, 0 on padding), so attention, positions and the loss stay within a
    document and no document is cut at a window's edge. Rows are drawn as a pure function of
    (seed, step), as `Sampler`'s windows."""

    def __init__(
        self,
        tokens,
        eos_id: int,
        pad_id: int,
        seq_len: int,
        global_batch: int,
        seed: int,
        shuffle: bool = True,
    ):
        _check_length(tokens, seq_len, "selected")
        width = seq_len + 1
        ends = np.flatnonzero(np.asarray(tokens) == eos_id) + 1
        if not ends.size or ends[-1] != tokens.size:
            ends = np.append(ends, tokens.size)  # a tail without EOS (a held-out tail)
        starts = np.concatenate([[0], ends[:-1]])
        pieces = np.maximum(1, -(-(ends - starts) // width))  # row-sized pieces per document
        self.piece_start = np.repeat(starts, pieces) + width * _ranks(pieces)
        self.piece_len = np.minimum(np.repeat(ends, pieces) - self.piece_start, width)
        self.table = best_fit(self.piece_len, width)
        self.tokens, self.pad_id, self.seq_len = tokens, pad_id, seq_len
        self.global_batch, self.seed, self.shuffle = global_batch, seed, shuffle

    def indices(self, step: int) -> np.ndarray:
        """The packed rows of the global batch for `step`, shape (global_batch,)."""
        if self.shuffle:
            rng = np.random.default_rng([self.seed, step])
            return rng.integers(0, len(self.table), size=self.global_batch)
        return (step * self.global_batch + np.arange(self.global_batch)) % len(self.table)

    def rows(self, step: int, index: np.ndarray) -> dict:
        width = self.seq_len + 1
        tokens = np.full((len(index), width), self.pad_id, np.int32)
        segments = np.zeros((len(index), width), np.int32)
        for r, row in enumerate(self.indices(step)[index]):
            at = 0
            for segment, piece in enumerate(self.table[row], 1):
                start, n = self.piece_start[piece], self.piece_len[piece]
                tokens[r, at : at + n] = self.tokens[start : start + n]
                segments[r, at : at + n] = segment
                at += n
        return {"tokens": tokens, "segments": segments}

    def fill(self) -> float:
        """The share of the rows' tokens that are text, not padding."""
        return float(self.piece_len.sum() / (len(self.table) * (self.seq_len + 1)))


def _ranks(counts: np.ndarray) -> np.ndarray:
    """0, 1, ..., n - 1 for each n of `counts`, end to end."""
    total = int(counts.sum())
    return np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)


class MixtureSampler(_Rows):
    """Rows of several samplers, each row from source j with probability weight_j: the source
    of each row and the row itself are a pure function of (seed, step), as `Sampler`'s."""

    def __init__(self, samplers: list, weights: list[float], seed: int):
        self.samplers, self.seed = samplers, seed
        self.p = np.asarray(weights, np.float64) / np.sum(weights)
        self.seq_len, self.global_batch = samplers[0].seq_len, samplers[0].global_batch

    def sources(self, step: int) -> np.ndarray:
        """The source of each row of the global batch for `step`, shape (global_batch,)."""
        rng = np.random.default_rng([self.seed, step, len(self.p)])
        return rng.choice(len(self.p), size=self.global_batch, p=self.p)

    def rows(self, step: int, index: np.ndarray) -> dict:
        sources = self.sources(step)[index]
        out = {}
        for j, sampler in enumerate(self.samplers):
            take = sources == j
            if take.any():
                for name, value in sampler.rows(step, index[take]).items():
                    out.setdefault(name, np.zeros((len(index), self.seq_len + 1), np.int32))
                    out[name][take] = value
        return out


def best_fit(lengths, capacity: int) -> list[list[int]]:
    """Best-fit decreasing bin packing: the indices of `lengths` (each <= capacity) in bins of
    `capacity`, longest first, each into the open bin it fills the most (a new bin when none
    has room). A segment tree over the remaining capacities finds that bin in O(log capacity)."""
    size = 1 << max(1, capacity.bit_length())  # leaves 0..capacity
    count = [0] * (2 * size)  # how many open bins have each remaining capacity, summed upwards
    open_bins: dict[int, list[int]] = {}  # remaining capacity -> bins with it
    bins: list[list[int]] = []

    def add(room: int, delta: int) -> None:
        i = room + size
        while i:
            count[i] += delta
            i //= 2

    def smallest_at_least(need: int, node: int = 1, lo: int = 0, hi: int = size - 1):
        if hi < need or not count[node]:
            return None
        if lo == hi:
            return lo
        mid = (lo + hi) // 2
        found = smallest_at_least(need, 2 * node, lo, mid)
        return found if found is not None else smallest_at_least(need, 2 * node + 1, mid + 1, hi)

    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        need = int(lengths[index])
        room = smallest_at_least(need)
        if room is None:
            bins.append([index])
            room, target = capacity, len(bins) - 1
        else:
            target = open_bins[room].pop()
            add(room, -1)
            bins[target].append(index)
        room -= need
        if room > 0:
            open_bins.setdefault(room, []).append(target)
            add(room, 1)
    return bins


def _process_rows(global_batch: int, num_devices: int, index: int, count: int) -> np.ndarray:
    """The rows of the global batch process `index` of `count` reads."""
    if global_batch % num_devices or num_devices % count:
        raise ConfigError(
            f"train.batch_size: {global_batch} does not split evenly over {num_devices} "
            f"devices in {count} processes"
        )
    rows = global_batch // count
    return np.arange(index * rows, (index + 1) * rows)


def lm_batch(sampler, step: int, eos_id: int | None = None) -> dict:
    """This process's rows of the global batch for `step`: tokens (rows, T+1). With `eos_id`
    (data.document_masking) also "segments": the documents a window holds, numbered from 1,
    a new one after each EOS (which ends the document before it). Packed rows
    (`PackedSampler`) bring their segments, and a "mask" leaving out the padding."""
    import jax

    count = jax.process_count()
    batch = sampler.rows(
        step, _process_rows(sampler.global_batch, count, jax.process_index(), count)
    )
    if "segments" in batch:
        batch["mask"] = (batch["segments"][:, 1:] > 0).astype(np.float32)
    elif eos_id is not None:
        batch["segments"] = document_segments(batch["tokens"], eos_id)
    return batch


def document_segments(tokens: np.ndarray, eos_id: int) -> np.ndarray:
    """(rows, T) token windows -> segment ids: 1 + the EOS tokens before each position."""
    ends = np.asarray(tokens) == eos_id
    before = np.concatenate([np.zeros_like(ends[:, :1]), ends[:, :-1]], axis=1)
    return (1 + np.cumsum(before, axis=1)).astype(np.int32)
