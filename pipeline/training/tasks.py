"""Verifiable tasks for reinforcement learning (`pipeline grpo`) and their fine-tuning data.

A task gives prompts with a known answer and a reward: 1.0 when the completion, stripped of
surrounding whitespace, is exactly the answer, else 0.0. Built in, so a run needs nothing
downloaded:

- `addition`: "What is 47+385?" -> "432", operands of 1 to `digits` digits;
- `reversal`: "bfha" -> "ahfb", 3 to `digits` + 2 of the letters a-h (the prompt is the
  word alone: a small model learns the task much sooner without an instruction before it).

A prompt belongs to the held-out split by a hash of its text, so no held-out prompt is ever
trained on, by `pipeline finetune` (`finetune.data: task:addition`) or by `pipeline grpo`.
A JSONL file of `{"prompt", "answer", ...}` is a task too (its own split), and any reward
function can replace exact match: `grpo.reward: module:function`, called as
`function(prompt, completion, example) -> float`.
"""

from __future__ import annotations

import hashlib
import importlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

from pipeline.config import ConfigError

TASKS = ("addition", "reversal")
HELD_OUT_PER_MILLE = 100  # a tenth of the prompt space
REVERSAL_LETTERS = "abcdefgh"


def held_out(prompt: str) -> bool:
    digest = hashlib.sha256(prompt.encode()).digest()
    return int.from_bytes(digest[:4], "little") % 1000 < HELD_OUT_PER_MILLE


def _addition(rng: np.random.Generator, digits: int) -> dict:
    a, b = (int(rng.integers(0, 10 ** int(rng.integers(1, digits + 1)))) for _ in range(2))
    return {"prompt": f"What is {a}+{b}?", "answer": str(a + b)}


def _reversal(rng: np.random.Generator, digits: int) -> dict:
    n = int(rng.integers(3, digits + 3))
    word = "".join(rng.choice(list(REVERSAL_LETTERS), size=n))
    return {"prompt": word, "answer": word[::-1]}


def task_examples(task: str, split: str, n: int, digits: int, seed: int = 0) -> list[dict]:
    """`n` distinct examples of a built-in task from one split ("train" or "held_out"), or
    fewer if the split has fewer."""
    if task not in TASKS:
        raise ConfigError(f"task: unknown task {task!r}; built in: {', '.join(TASKS)}")
    make = _addition if task == "addition" else _reversal
    rng = np.random.default_rng([seed, TASKS.index(task), digits])
    out, seen = [], set()
    for _ in range(50 * n):
        example = make(rng, digits)
        if example["prompt"] in seen or held_out(example["prompt"]) != (split == "held_out"):
            continue
        seen.add(example["prompt"])
        out.append(example)
        if len(out) == n:
            break
    return out


def read_task(source: str, split: str, n: int, digits: int, seed: int = 0) -> list[dict]:
    """Examples {"prompt", "answer", ...} of a built-in task or a JSONL file (held out by the
    prompt's hash, as the built-in tasks are)."""
    if source in TASKS:
        return task_examples(source, split, n, digits, seed)
    from pipeline.training.instruct import json_object

    path = Path(source)
    if not path.is_file():
        raise ConfigError(f"grpo.task: {source!r} is neither a built-in task ({TASKS}) nor a file")
    examples = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            record = json_object(f"{path}:{lineno}", line)
            if not isinstance(record.get("prompt"), str) or not record["prompt"]:
                raise ConfigError(f"{path}:{lineno}: missing string field 'prompt'")
            if held_out(record["prompt"]) == (split == "held_out"):
                examples.append(record)
    return examples[:n]


def exact_match(prompt: str, completion: str, example: dict) -> float:
    return float(completion.strip() == str(example.get("answer", "")).strip())


def load_reward(spec: str | None) -> Callable[[str, str, dict], float]:
    """The reward function `module:function` names (None: exact match with the answer)."""
    if not spec:
        return exact_match
    module_name, _, name = spec.partition(":")
    if not (module_name and name):
        raise ConfigError(f"grpo.reward: {spec!r} must be module:function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(f"grpo.reward: cannot import {module_name!r} ({err})") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError(f"grpo.reward: {module_name} has no function {name!r}")
    return fn


def sft_examples(task: str, n: int, digits: int) -> tuple[list[dict], list[dict]]:
    """Fine-tuning examples (train, held out) of a built-in task: the prompt and its answer."""

    def chat(example):
        return {
            "messages": [
                {"role": "user", "content": example["prompt"]},
                {"role": "assistant", "content": example["answer"]},
            ],
            "where": f"task:{task}",
        }

    train = task_examples(task, "train", n, digits)
    held = task_examples(task, "held_out", max(n // 10, 1), digits)
    return [chat(e) for e in train], [chat(e) for e in held]
