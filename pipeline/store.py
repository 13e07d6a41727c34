"""Token stores: a corpus tokenized once, in parallel, into content-addressed shards.

The documents arrive as a stream and are cut into shards of about `data.shard_mb` of text.
Each shard is split into train and validation documents (deterministically, by its own
document order and `data.seed`), tokenized (EOS after each document) by a pool of worker
processes, all cores by default (`data.tokenize_workers`), and written to
`<cache>/shards/<key>.{train,val}.npy` with `<key>.json` (its counts) last; the key hashes the
shard's text, the tokenizer and the split settings. So an interrupted build resumes where it
stopped, a grown corpus tokenizes only its new shards, and the result does not depend on the
number of workers.

The store, `<cache>/tokens-<key>/` (the key hashes the shards' keys in order), holds the
shards' tokens end to end as flat memmaps the step-indexed sampler reads (`train.bin`,
`val.bin`), `index.json` (the shards in order with their counts), the tokenizer, and
`meta.json`, written last (a store without it is incomplete). Memory stays bounded: a few
shards of text at a time, whatever the corpus size.

A process pool of numpy shards rather than ArrayRecord through grain: the sampler draws
windows at arbitrary token offsets, which a flat memmap serves with one slice, and numpy files
need no further dependency.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing
import os
import tempfile
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path

import numpy as np

from pipeline.tokenizer import Tokenizer, token_dtype

STORE_VERSION = 3


def split_documents(num_docs: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic train/validation document indices (at least one of each when possible)."""
    order = np.random.default_rng(seed).permutation(num_docs)
    num_val = int(round(num_docs * val_fraction))
    if val_fraction > 0 and num_docs >= 2:
        num_val = min(max(num_val, 1), num_docs - 1)
    return np.sort(order[num_val:]), np.sort(order[:num_val])


def shard_documents(docs: Iterable[str], shard_bytes: int) -> Iterator[list[str]]:
    """Consecutive groups of documents of about `shard_bytes` of text each (one at least)."""
    shard, size = [], 0
    for doc in docs:
        shard.append(doc)
        size += len(doc)
        if size >= shard_bytes:
            yield shard
            shard, size = [], 0
    if shard:
        yield shard


def hash_strings(parts: Iterable[str]) -> str:
    h = hashlib.sha256()
    for part in parts:
        data = part.encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def build_store(
    docs: Iterable[str],
    tokenizer: Tokenizer,
    cache_dir: Path,
    *,
    val_fraction: float,
    seed: int,
    shard_bytes: int,
    workers: int,
    meta: dict,
) -> Path:
    """Tokenize `docs` into a store under `cache_dir` (reused when complete); its directory."""
    shards_dir = Path(cache_dir) / "shards"
    shards_dir.mkdir(parents=True, exist_ok=True)
    settings = hash_strings([str(STORE_VERSION), tokenizer.fingerprint(), f"{val_fraction}/{seed}"])
    start = time.perf_counter()
    keys, nbytes, built = [], 0, 0  # built: the bytes of the shards tokenized by this call
    with _Tokenizing(tokenizer, workers, val_fraction, seed) as pool:
        for texts in shard_documents(docs, shard_bytes):
            key = hash_strings([settings, hash_strings(texts)])[:32]
            keys.append(key)
            size = sum(len(t.encode("utf-8")) for t in texts)
            nbytes += size
            if not (shards_dir / f"{key}.json").is_file():
                pool.submit(texts, shards_dir / key)
                built += size
        used = pool.workers_used
    if not keys:
        raise ValueError("no documents")
    seconds = time.perf_counter() - start
    directory = Path(cache_dir) / f"tokens-{hash_strings([settings, *keys])[:16]}"
    if not (directory / "meta.json").is_file():
        index = [{"key": k, **json.loads((shards_dir / f"{k}.json").read_text())} for k in keys]
        stats = {
            "train_docs": sum(s["train_docs"] for s in index),
            "val_docs": sum(s["val_docs"] for s in index),
            "bytes": nbytes,
            "shards": len(keys),
            "tokenize_seconds": seconds,
            "tokenize_workers": used,
            "mb_per_s_per_core": built / 1e6 / max(seconds, 1e-9) / used,
        }
        _write_store(directory, shards_dir, index, tokenizer, val_fraction, {**meta, **stats})
    return directory


def _write_store(directory, shards_dir, index, tokenizer, val_fraction, meta) -> None:
    dtype = token_dtype(tokenizer.vocab_size)
    one_document = meta["train_docs"] + meta["val_docs"] == 1 and val_fraction > 0
    with atomic_dir(directory) as tmp:
        for split in ("train", "val"):
            with (tmp / f"{split}.bin").open("wb") as out:
                for shard in index:
                    np.load(shards_dir / f"{shard['key']}.{split}.npy", mmap_mode="r").tofile(out)
        if one_document:  # one document cannot be split by document: hold out its tail
            tokens = np.fromfile(tmp / "train.bin", dtype)
            cut = int(len(tokens) * (1 - val_fraction))
            tokens[:cut].tofile(tmp / "train.bin")
            tokens[cut:].tofile(tmp / "val.bin")
        tokenizer.save(tmp)
        (tmp / "index.json").write_text(json.dumps(index, indent=1))
        meta = {**meta, "dtype": dtype.name, "vocab_size": tokenizer.vocab_size}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))


class _Tokenizing:
    """Tokenizes shards inline until a second one needs work, then in a pool of `workers`
    spawned processes (never forked: the parent may hold JAX's threads), a few at a time."""

    def __init__(self, tokenizer: Tokenizer, workers: int, val_fraction: float, seed: int):
        self.tokenizer, self.workers, self.split = tokenizer, max(1, workers), (val_fraction, seed)
        self.waiting: tuple | None = None
        self.pool: ProcessPoolExecutor | None = None
        self.futures: set[Future] = set()
        self.tmp = None
        self.workers_used = 1

    def __enter__(self):
        return self

    def submit(self, texts: list[str], target: Path) -> None:
        if self.workers == 1:
            write_shard(self.tokenizer, texts, target, *self.split)
            return
        if self.waiting is None and self.pool is None:
            self.waiting = (texts, target)  # a corpus of one shard never starts the pool
            return
        if self.pool is None:
            self._start()
        while len(self.futures) >= 2 * self.workers:
            done, self.futures = wait(self.futures, return_when=FIRST_COMPLETED)
            for future in done:
                future.result()
        self.futures.add(self.pool.submit(_work, texts, target, *self.split))

    def _start(self) -> None:
        self.tmp = tempfile.TemporaryDirectory()
        path = self.tokenizer.save(self.tmp.name)
        self.pool = ProcessPoolExecutor(
            self.workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker,
            initargs=(str(path),),
        )
        self.workers_used = self.workers
        texts, target = self.waiting
        self.waiting = None
        self.futures.add(self.pool.submit(_work, texts, target, *self.split))

    def __exit__(self, kind, error, trace):
        if self.waiting is not None and kind is None:
            write_shard(self.tokenizer, *self.waiting, *self.split)
        if self.pool is not None:
            try:
                for future in self.futures if kind is None else ():
                    future.result()
            finally:
                self.pool.shutdown(cancel_futures=True)
                self.tmp.cleanup()


_WORKER_TOKENIZER: Tokenizer | None = None


def _init_worker(path: str) -> None:
    global _WORKER_TOKENIZER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the pool is the parallelism
    _WORKER_TOKENIZER = Tokenizer.load(path)


def _work(texts: list[str], target: Path, val_fraction: float, seed: int) -> None:
    write_shard(_WORKER_TOKENIZER, texts, target, val_fraction, seed)


def write_shard(tokenizer: Tokenizer, texts, target: Path, val_fraction: float, seed: int):
    """A shard's train and validation tokens (EOS after each document), `target`.json last."""
    dtype = token_dtype(tokenizer.vocab_size)
    eos = np.array([tokenizer.eos_id], dtype)
    counts = {}
    splits = split_documents(len(texts), val_fraction, seed)
    for split, idx in zip(("train", "val"), splits, strict=True):
        ids = tokenizer.encode_batch([texts[i] for i in idx])
        pieces = [piece for doc in ids for piece in (doc.astype(dtype), eos)]
        tokens = np.concatenate(pieces) if pieces else np.zeros((0,), dtype)
        path = target.with_name(f"{target.name}.{split}.npy")
        _atomic_write(path, lambda f, t=tokens: np.save(f, t))
        counts[f"{split}_docs"], counts[f"{split}_tokens"] = len(idx), int(tokens.size)
    text = json.dumps(counts)
    _atomic_write(target.with_name(f"{target.name}.json"), lambda f: f.write(text.encode()))


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Write into a temporary sibling, then rename: readers never see a half-written cache."""
    import shutil

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        yield tmp
        with contextlib.suppress(OSError):  # another process finished the same cache first
            os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
