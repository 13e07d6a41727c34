"""`pipeline eval`: lm-evaluation-harness against our OpenAI server, on tasks built offline.

Two tasks come from the embedded corpus (the standard library's source, read with `ast`),
written as lm-eval task configs over local JSONL files (nothing downloaded):

- `stdlib_next_line` (multiple choice, log-likelihood): the first lines of a function, then
  four candidates for its next line: the real one and three lines of other functions at the
  same indentation. Scored by `acc` (the choice of highest log-likelihood is the real one).
- `stdlib_docstring` (generate until a newline): a function's signature and the opening quotes
  of its docstring; the target is the docstring's first line. Scored by `exact_match`.

`pipeline eval --run RUN` serves the run on a free loopback port (the same engine and HTTP layer
as `pipeline serve`), runs lm-eval's `local-completions` model against it with the run's
tokenizer written in transformers' layout, and writes `RUN/eval/results.json`. With `--chat`,
lm-eval's `local-chat-completions` instead: each context is a user turn sent to
`/v1/chat/completions` (rendered by the run's chat template), for the generate-until task alone
(chat completions return no prompt log-probabilities, so log-likelihood tasks cannot run
there, in lm-eval as with OpenAI's API). lm-eval itself is the `eval` extra.
"""

from __future__ import annotations

import ast
import json
import os
import socket
import threading
import time
from contextlib import contextmanager
from functools import cache
from pathlib import Path

import numpy as np

from pipeline.config import ConfigError, ServeConfig
from pipeline.data import python_functions, stdlib_files

TASKS = ("stdlib_next_line", "stdlib_docstring")
CHAT_TASKS = ("stdlib_docstring",)  # generate-until: what chat completions can answer
MAX_LINE = 72  # characters: short lines keep the contexts within small models' windows


def _functions():
    """(source lines, ast function node) of the standard library's functions, in file order."""
    for path in stdlib_files():
        yield from python_functions(path)


@cache
def build_examples(n: int = 200, seed: int = 0) -> dict[str, list[dict]]:
    """`n` examples of each task, the same on every machine with the same Python version."""
    rng = np.random.default_rng(seed)
    next_line, docstring, pool = [], [], {}
    candidates = []
    for lines, node in _functions():
        body = lines[node.lineno - 1 : node.end_lineno]
        if len(body) >= 4 and all(0 < len(line) <= MAX_LINE for line in body[:4]):
            candidates.append(body[:4])
            indent = body[3][: len(body[3]) - len(body[3].lstrip())]
            pool.setdefault(indent, []).append(body[3])
        doc = ast.get_docstring(node, clean=False)
        first = body[0] if body else ""
        if doc and first.rstrip().endswith(":") and len(first) <= MAX_LINE:
            line = doc.strip().splitlines()[0].strip() if doc.strip() else ""
            if 8 <= len(line) <= MAX_LINE and '"""' not in line and len(body) > 1:
                quote = body[1].lstrip()
                if quote.startswith('"""'):
                    indent = body[1][: len(body[1]) - len(quote)]
                    docstring.append({"context": f'{first}\n{indent}"""', "target": line})
    order = rng.permutation(len(candidates))
    for i in order:
        head, real = candidates[i][:3], candidates[i][3]
        indent = real[: len(real) - len(real.lstrip())]
        others = [line for line in pool.get(indent, []) if line.strip() != real.strip()]
        if len(set(others)) < 3:
            continue
        distractors = list(rng.choice(sorted(set(others)), 3, replace=False))
        choices = [real, *distractors]
        perm = rng.permutation(4)
        next_line.append(
            {  # the newline starts each choice: lm-eval moves a context's trailing whitespace
                "context": "\n".join(head),
                "choices": ["\n" + choices[j] for j in perm],
                "gold": int(np.flatnonzero(perm == 0)[0]),
            }
        )
        if len(next_line) == n:
            break
    picks = rng.permutation(len(docstring))[:n]
    return {"stdlib_next_line": next_line, "stdlib_docstring": [docstring[i] for i in picks]}


def write_tasks(out: Path, n: int = 200, seed: int = 0) -> Path:
    """The two tasks as lm-eval configs (YAML) over JSONL files in `out`; returns `out`."""
    out.mkdir(parents=True, exist_ok=True)
    examples = build_examples(n, seed)
    for name, rows in examples.items():
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = lambda name: json.dumps(str((out / f"{name}.jsonl").absolute()))  # noqa: E731
    (out / "stdlib_next_line.yaml").write_text(
        "task: stdlib_next_line\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data('stdlib_next_line')}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: '{{context}}'\n"
        "doc_to_choice: '{{choices}}'\n"
        "doc_to_target: gold\n"
        "target_delimiter: ''\n"
        "metric_list:\n  - metric: acc\n"
    )
    (out / "stdlib_docstring.yaml").write_text(
        "task: stdlib_docstring\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data('stdlib_docstring')}\n"
        "test_split: test\n"
        "output_type: generate_until\n"
        "doc_to_text: '{{context}}'\n"
        "doc_to_target: target\n"
        "target_delimiter: ''\n"
        "generation_kwargs:\n  until: ['\\n', '\"\"\"']\n  max_gen_toks: 48\n"
        "  do_sample: false\n  temperature: 0\n"
        "metric_list:\n  - metric: exact_match\n"
    )
    return out


def write_hf_tokenizer(tokenizer, out: Path, max_len: int) -> Path:
    """The run's tokenizer as transformers loads it (lm-eval tokenizes requests with it)."""
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.hf.save(str(out / "tokenizer.json"))
    name = tokenizer.hf.id_to_token
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": name(tokenizer.eos_id),
        "bos_token": name(tokenizer.bos_id) if tokenizer.bos_id is not None else None,
        "pad_token": name(tokenizer.pad_id),
        "model_max_length": max_len,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return out


@contextmanager
def local_server(run_dir: str, cfg: ServeConfig):
    """`pipeline serve` for `run_dir` on a free loopback port, in this process: yields
    (base URL, model name, the loaded run)."""
    import uvicorn

    from pipeline.inference.runs import load_for_inference
    from pipeline.serving.core import engine_args
    from pipeline.serving.engine import Engine
    from pipeline.serving.serve import create_app

    loaded = load_for_inference(run_dir, cfg.quantize, None)
    engine = Engine(loaded.model, **engine_args(cfg))
    engine.warmup()
    engine.start()
    name = cfg.model_name or Path(run_dir).resolve().name
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app(engine, loaded.tokenizer, name, cfg)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}", name, loaded, engine
    finally:
        server.should_exit = True
        thread.join(30)
        engine.stop(drain=False, timeout=30)


def run_eval(
    run_dir: str,
    tasks: list[str] | None = None,
    limit: int | None = None,
    examples: int = 200,
    cfg: ServeConfig | None = None,
    samples: bool = False,
    chat: bool = False,
):
    """lm-eval's `local-completions` (with `chat`, `local-chat-completions`) against a local
    server of `run_dir`: {task: {metric: value}}, also written to RUN/eval/results.json (with
    `chat`, chat_results.json); with `samples`, also lm-eval's per-example records."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ConfigError(
            "pipeline eval needs lm-evaluation-harness: pip install -e '.[eval]'"
        ) from None
    tasks = _check_tasks(tasks, chat)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = Path(run_dir) / "eval"
    task_dir = write_tasks(out / "tasks", examples)
    cfg = cfg or ServeConfig(slots=8)
    with local_server(run_dir, cfg) as (url, name, loaded, engine):
        tokenizer_dir = write_hf_tokenizer(loaded.tokenizer, out / "tokenizer", engine.max_len)
        args = [f"model={name}", f"max_length={engine.max_len}", "max_retries=1"]
        if chat:  # one request per example (lm-eval does not batch chat), 8 at a time
            args += [f"base_url={url}/v1/chat/completions", "num_concurrent=8"]
        else:
            args += [
                f"base_url={url}/v1/completions",
                "tokenizer_backend=huggingface",
                f"tokenizer={tokenizer_dir}",
                "num_concurrent=8",
            ]
        results = lm_eval.simple_evaluate(
            model="local-chat-completions" if chat else "local-completions",
            model_args=",".join(args),
            tasks=tasks,
            task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
            limit=limit,
            log_samples=samples,
            apply_chat_template=chat,
        )
    scores = {
        task: {
            k.split(",")[0]: v
            for k, v in metrics.items()
            if isinstance(v, int | float)
            and k.split(",")[0] not in ("sample_len", "alias")
            and "stderr" not in k
        }
        for task, metrics in results["results"].items()
    }
    (out / ("chat_results.json" if chat else "results.json")).write_text(
        json.dumps(scores, indent=2)
    )
    return (scores, results.get("samples", {})) if samples else scores


def _check_tasks(tasks: list[str] | None, chat: bool) -> list[str]:
    valid = CHAT_TASKS if chat else TASKS
    tasks = list(tasks or valid)
    for task in tasks:
        if task not in TASKS:
            raise ConfigError(f"eval: unknown task {task!r}; valid: {', '.join(TASKS)}")
        if task not in valid:
            raise ConfigError(
                f"eval --chat: {task} is a log-likelihood task, and chat completions return no "
                f"prompt log-probabilities; with --chat, valid: {', '.join(valid)}"
            )
    return tasks
