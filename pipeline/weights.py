"""Weights on disk as safetensors, read and written one tensor at a time.

A run's final weights (`model/model.safetensors`, our parameter names such as
`blocks.0.attn.q.kernel`) and imported Hugging Face checkpoints go through here. The format is
an 8-byte header length, a JSON header (dtype, shape and byte range of each tensor) and the
data. `safetensors.safe_open` maps the files into memory, and the pages it touches stay in
the process's resident memory until the file is closed (importing a 1B model through it peaked
at 2.9x the weights); `safetensors.numpy.save_file` builds the whole file in memory before
writing it. Plain reads and writes of each tensor's bytes keep the peak at the model plus one
tensor, for a format any safetensors reader opens.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np

from pipeline.config import ConfigError

DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "U32": np.uint32,
    "BOOL": np.bool_,
}
NAMES = {np.dtype(v): k for k, v in DTYPES.items()}


def weight_name(path) -> str:
    """`blocks.0.attn.q.kernel` for the pytree path of a parameter."""
    parts = []
    for key in path:
        part = getattr(key, "key", getattr(key, "idx", getattr(key, "name", None)))
        parts.append(str(part))
    return ".".join(parts[:-1] if parts and parts[-1] == "value" else parts)


class SafetensorsReader:
    """The tensors of safetensors files, each read on demand into its own array."""

    def __init__(self, files: list[Path], source: str):
        self.where: dict[str, tuple[Path, dict, int]] = {}
        for file in files:
            header, data_start = _header(file)
            for key, entry in header.items():
                if key != "__metadata__":
                    self.where[key] = (file, entry, data_start)
        self.source = source

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def get(self, name: str) -> np.ndarray:
        if name not in self.where:
            raise ConfigError(f"{self.source}: tensor {name!r} is missing")
        file, entry, data_start = self.where[name]
        begin, end = entry["data_offsets"]
        dtype = np.dtype(DTYPES[entry["dtype"]])
        count = (end - begin) // dtype.itemsize
        array = np.fromfile(file, dtype=dtype, count=count, offset=data_start + begin)
        return array.reshape(entry["shape"])


def _header(file: Path) -> tuple[dict, int]:
    """(the JSON header, where the data begin), checked against the file's size."""
    try:
        size = file.stat().st_size
        with file.open("rb") as f:
            length = int.from_bytes(f.read(8), "little")
            if not 0 < length <= size - 8:
                raise ValueError("header length beyond the file")
            header = json.loads(f.read(length))
        entries = [e for k, e in header.items() if k != "__metadata__"]
        if 8 + length + max((e["data_offsets"][1] for e in entries), default=0) > size:
            raise ValueError("the file is shorter than its header says")
        unknown = {e["dtype"] for e in entries} - set(DTYPES)
        if unknown:
            raise ValueError(f"dtype {sorted(unknown)[0]} is not supported")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"{file}: not a readable safetensors file ({err})") from None
    return header, 8 + length


def write_safetensors(path: Path, tensors: Iterable[tuple[str, np.ndarray]]) -> None:
    """Write (name, array) pairs as one safetensors file, a tensor at a time (readable: 0644)."""
    tensors = list(tensors)  # arrays of any kind (numpy, jax): each reaches the host in turn
    header, offset = {}, 0
    for name, array in tensors:
        nbytes = int(np.prod(array.shape)) * np.dtype(array.dtype).itemsize
        header[name] = {
            "dtype": NAMES[np.dtype(array.dtype)],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data start 8-byte aligned, as the library's
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        f.write(len(encoded).to_bytes(8, "little"))
        f.write(encoded)
        for _, array in tensors:
            np.ascontiguousarray(np.asarray(array)).tofile(f)
    path.chmod(0o644)


def save_state(state: Any, path: Path) -> None:
    """A parameter pytree (an `nnx.State`) as a safetensors file of our parameter names."""
    paths_leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    write_safetensors(path, ((weight_name(p), leaf) for p, leaf in paths_leaves))


def load_state(path: Path, like: Any, place: Callable | None = None) -> Any:
    """The parameters saved by `save_state`, in the structure and dtypes of `like`.

    `place` (e.g. `jnp.asarray`) takes each array as it is read, so its host copy is freed
    before the next is read: memory holds the placed model plus one tensor, not two models."""
    reader = SafetensorsReader([path], str(path))
    paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(like)
    leaves = []
    for p, leaf in paths_leaves:
        value = reader.get(weight_name(p))
        if value.shape != tuple(leaf.shape):
            raise ConfigError(
                f"{path}: {weight_name(p)} has shape {value.shape}, expected {tuple(leaf.shape)}"
            )
        value = value.astype(leaf.dtype, copy=False)
        leaves.append(place(value) if place is not None else value)
        del value
    return jax.tree.unflatten(treedef, leaves)
