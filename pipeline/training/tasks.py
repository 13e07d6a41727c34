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

`TaskEval` scores a model on the held-out prompts (greedy completions: the pass rate, the mean
reward and length): GRPO's evaluation, and fine-tuning's on `finetune.data: task:NAME` beside
its held-out loss.
"""

from __future__ import annotations

import hashlib
import importlib
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from pipeline.config import Config, ConfigError
from pipeline.data import json_object
from pipeline.inference.generate import generate
from pipeline.inference.sampling import Sampling
from pipeline.lora import set_dropout_keys
from pipeline.tokenizer import prompt_ids

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


EVAL_CHUNK = 64  # held-out prompts generated together


class TaskEval:
    """The model a stage's parameters make, its completions of a task's prompts and their
    rewards; `evaluate` scores greedy completions of the held-out prompts."""

    def __init__(self, cfg: Config, task: str, tokenizer, graphdef, frozen, lora: bool):
        g = cfg.grpo
        self.cfg, self.max_new_tokens, self.tokenizer, self.lora = (
            cfg,
            g.max_new_tokens,
            tokenizer,
            lora,
        )
        self.graphdef, self.frozen, self.placed_frozen = graphdef, frozen, None
        self.reward = load_reward(g.reward)
        self.held_out = read_task(task, "held_out", g.eval_prompts, g.digits)
        if not self.held_out:
            raise ConfigError(f"task {task}: no held-out prompt")
        self.held_prompts = [self.ids(e["prompt"]) for e in self.held_out]

    def ids(self, prompt: str) -> list[int]:
        return prompt_ids(self.tokenizer, [{"role": "user", "content": prompt}])

    def check_fits(self, prompts: list[list[int]]) -> None:
        longest = max(map(len, prompts)) + self.max_new_tokens
        if longest > self.cfg.data.seq_len:
            raise ConfigError(
                f"data.seq_len: {self.cfg.data.seq_len} is shorter than the longest prompt plus "
                f"grpo.max_new_tokens ({longest} tokens)"
            )

    def model(self, params):
        if self.placed_frozen is None:  # once: the frozen base (or reference) on the device
            self.placed_frozen = jax.device_put(self.frozen)
        if not self.lora:
            return nnx.merge(self.graphdef, params)
        model = nnx.merge(self.graphdef, params, self.placed_frozen)
        set_dropout_keys(model, None)
        return model

    def complete(self, params, prompts, samplings) -> list[list[int]]:
        end = self.tokenizer.end_id
        out = generate(self.model(params), prompts, self.max_new_tokens, samplings, eos_id=end)
        return out.tokens

    def rewards(self, examples, completions) -> np.ndarray:
        end = self.tokenizer.end_id
        texts = [self.tokenizer.decode([t for t in c if t != end]) for c in completions]
        return np.array(
            [float(self.reward(e["prompt"], t, e)) for e, t in zip(examples, texts, strict=True)],
            np.float32,
        )

    def evaluate(self, params) -> dict:
        """Greedy completions of the held-out prompts: pass rate, mean reward and length."""
        rewards, lengths = [], []
        for start in range(0, len(self.held_prompts), EVAL_CHUNK):
            prompts = self.held_prompts[start : start + EVAL_CHUNK]
            completions = self.complete(params, prompts, Sampling())
            rewards.append(self.rewards(self.held_out[start : start + EVAL_CHUNK], completions))
            lengths += [len(c) for c in completions]
        rewards = np.concatenate(rewards)
        return {
            "eval_pass_rate": float(np.mean(rewards >= 1.0)),
            "eval_reward": float(rewards.mean()),
            "eval_completion_length": float(np.mean(lengths)),
        }
