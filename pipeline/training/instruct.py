"""Instruction data for fine-tuning: JSONL or the embedded set, the chat template, loss masks.

An example is `{"prompt", "completion"}` or `{"messages": [{"role", "content"}, ...]}`. Both are
rendered with the chat template, whose role markers are special tokens:

    <|bos|><|user|>prompt<|end|><|assistant|>completion<|end|><|eos|>

and the loss counts only the assistant's tokens and the `<|end|>` closing them. The embedded
default (`stdlib-docstrings`) pairs a standard-library function's source, docstring removed,
with the first line of its docstring, split into train and held-out sets by module.
"""

from __future__ import annotations

import ast
import hashlib
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.config import ConfigError, FinetuneConfig
from pipeline.data import best_fit, json_object, python_functions, stdlib_files
from pipeline.tokenizer import Tokenizer, render
from pipeline.training.tasks import sft_examples

SUMMARY_PROMPT = "Summarize this function in one line:\n"
MAX_SOURCE_CHARS = 1200


@dataclass
class Examples:
    """Fixed-length rows: tokens (N, seq_len + 1) and a loss mask over targets (N, seq_len);
    packed rows also carry segment ids (N, seq_len + 1): 1, 2, ... per example, 0 padding."""

    tokens: np.ndarray
    mask: np.ndarray
    segments: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.tokens)


def read_examples(cfg: FinetuneConfig, digits: int = 2) -> tuple[list[dict], list[dict]]:
    """Train and held-out examples (each a dict with "messages") from the configured source:
    the embedded set, a built-in task (`task:addition`, operands of up to `digits` digits; see
    tasks.py) or a JSONL file."""
    if cfg.data == "stdlib-docstrings":
        return stdlib_docstring_examples(cfg.val_fraction, cfg.max_examples)
    if cfg.data.startswith("task:"):
        return sft_examples(cfg.data.removeprefix("task:"), cfg.max_examples or 5000, digits)
    path = Path(cfg.data)
    if not path.is_file():
        raise ConfigError(f"finetune.data: file not found: {path}")
    examples = [_parse_line(path, n, line) for n, line in _lines(path)]
    examples = examples[: cfg.max_examples] if cfg.max_examples else examples
    if len(examples) < 2:
        raise ConfigError(f"finetune.data: {path} needs at least 2 examples, has {len(examples)}")
    order = np.random.default_rng(0).permutation(len(examples))
    num_val = max(1, int(round(len(examples) * cfg.val_fraction)))
    return [examples[i] for i in sorted(order[num_val:])], [
        examples[i] for i in sorted(order[:num_val])
    ]


def _lines(path: Path):
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                yield n, line


def is_conversation(messages) -> bool:
    """A non-empty list of {role: system | user | assistant, content: str}."""
    return (
        isinstance(messages, list)
        and bool(messages)
        and all(
            isinstance(m, dict)
            and m.get("role") in ("system", "user", "assistant")
            and isinstance(m.get("content"), str)
            for m in messages
        )
    )


def _parse_line(path: Path, lineno: int, line: str) -> dict:
    where = f"{path}:{lineno}"
    record = json_object(where, line)
    if "messages" in record:
        messages = record["messages"]
        if not is_conversation(messages):
            raise ConfigError(
                f"{where}: 'messages' must be a list of {{role, content}} with "
                "role system, user or assistant"
            )
        if not any(m["role"] == "assistant" for m in messages):
            raise ConfigError(f"{where}: no assistant message, so no token to train on")
        return {"messages": messages, "where": where}
    for key in ("prompt", "completion"):
        if not isinstance(record.get(key), str):
            raise ConfigError(f"{where}: missing string field {key!r} (or a 'messages' list)")
    if not record["completion"]:
        raise ConfigError(f"{where}: empty completion, so no token to train on")
    return {
        "messages": [
            {"role": "user", "content": record["prompt"]},
            {"role": "assistant", "content": record["completion"]},
        ],
        "where": where,
    }


def build_examples(
    tokenizer: Tokenizer,
    examples: list[dict],
    seq_len: int,
    packing: bool = False,
    drop_long: bool = False,
) -> Examples:
    """Tokenize, truncate to seq_len + 1, then pad one example per row or pack several.

    `drop_long` skips examples that do not fit whole (the embedded set); otherwise a long
    example is truncated, and one left with no trainable token is an error naming its line.
    """
    rows, masks = [], []
    for example in examples:
        try:
            ids, trained = render(tokenizer, example["messages"])
        except ValueError as err:  # the model's chat template refused or could not be split
            raise ConfigError(f"{example.get('where', 'an example')}: {err}") from None
        if drop_long and len(ids) > seq_len + 1:
            continue
        ids, trained = ids[: seq_len + 1], trained[: seq_len + 1]
        if not any(trained[1:]):
            where = example.get("where", "an example")
            raise ConfigError(
                f"{where}: no trainable token within data.seq_len={seq_len}; "
                "shorten the prompt or raise data.seq_len"
            )
        rows.append(ids)
        masks.append(trained)
    if not rows:
        raise ConfigError(f"finetune.data: no example fits data.seq_len={seq_len}")
    segments = None
    if packing:
        rows, masks, ids_of = _pack(rows, masks, seq_len + 1)
        segments = np.zeros((len(rows), seq_len + 1), np.int32)
        for i, row in enumerate(ids_of):
            segments[i, : len(row)] = row
    tokens = np.full((len(rows), seq_len + 1), tokenizer.pad_id, np.int32)
    mask = np.zeros((len(rows), seq_len + 1), np.float32)
    for i, (ids, trained) in enumerate(zip(rows, masks, strict=True)):
        tokens[i, : len(ids)] = ids
        mask[i, : len(trained)] = trained
    # mask[t] says whether target t (= token t+1) counts
    return Examples(tokens, mask[:, 1:], segments)


def _pack(rows, masks, width: int):
    """Best-fit decreasing packing of whole examples into rows of `width` tokens (`best_fit`).
    Returns the rows, their masks and each token's segment id (1, 2, ... within a row):
    attention and the loss stay within an example (the model masks across segments;
    positions restart)."""
    packed, packed_masks, segments = [], [], []
    for row in best_fit([len(ids) for ids in rows], width):
        packed.append([t for i in row for t in rows[i]])
        packed_masks.append([m for i in row for m in masks[i]])
        segments.append([s for s, i in enumerate(row, 1) for _ in rows[i]])
    return packed, packed_masks, segments


class ExampleSampler:
    """Batches of examples as a pure function of (seed, step): a fresh shuffle every epoch."""

    def __init__(self, examples: Examples, global_batch: int, seed: int, shuffle: bool = True):
        self.examples, self.global_batch, self.seed, self.shuffle = (
            examples,
            global_batch,
            seed,
            shuffle,
        )

    def indices(self, step: int) -> np.ndarray:
        n = len(self.examples)
        flat = step * self.global_batch + np.arange(self.global_batch)
        if not self.shuffle:
            return flat % n
        epochs, positions = np.divmod(flat, n)
        return np.array(
            [
                np.random.default_rng([self.seed, e]).permutation(n)[p]
                for e, p in zip(epochs, positions, strict=True)
            ]
        )

    def batch(self, step: int, process_index: int = 0, process_count: int = 1) -> dict:
        rows = self.global_batch // process_count
        idx = self.indices(step)[process_index * rows : (process_index + 1) * rows]
        batch = {"tokens": self.examples.tokens[idx], "mask": self.examples.mask[idx]}
        if self.examples.segments is not None:
            batch["segments"] = self.examples.segments[idx]
        return batch


def stdlib_docstring_examples(val_fraction: float, limit: int | None = None):
    """(function source without its docstring -> first docstring line), held out by module."""
    train, held_out = [], []
    for path in stdlib_files():
        if "test" in path.parts or "idlelib" in path.parts:
            continue
        for prompt, completion in _docstring_pairs(path):
            example = {
                "messages": [
                    {"role": "user", "content": SUMMARY_PROMPT + prompt},
                    {"role": "assistant", "content": completion},
                ],
                "where": str(path),
            }
            bucket = int(hashlib.sha256(path.stem.encode()).hexdigest(), 16) % 1000
            (held_out if bucket < val_fraction * 1000 else train).append(example)
        if limit and len(train) + len(held_out) >= limit:
            break
    return train, held_out


def _docstring_pairs(path: Path):
    for lines, node in python_functions(path):
        if len(node.body) < 2:
            continue
        doc = ast.get_docstring(node)
        summary = doc.strip().splitlines()[0].strip() if doc and doc.strip() else ""
        if not (10 <= len(summary) <= 120) or node.end_lineno - node.lineno > 40:
            continue
        start = (node.decorator_list[0] if node.decorator_list else node).lineno - 1
        docstring = node.body[0]
        kept = lines[start : docstring.lineno - 1] + lines[docstring.end_lineno : node.end_lineno]
        code = textwrap.dedent("\n".join(line for line in kept if line.strip()))
        if len(code) <= MAX_SOURCE_CHARS:
            yield code, summary
