"""The documentation cannot go stale silently: every `pipeline ...` and `make ...` command in the
README and the docs pages names a verb, flags, config keys and make targets that exist, and the
README's toy-size commands run.

Run: pytest tests/test_docs.py
"""

import argparse
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT as _ROOT

from pipeline.cli import build_parser
from pipeline.config import Config, flat_keys

ROOT = Path(_ROOT)
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
# What the Makefile reads from its command line (make VAR=value), besides its targets.
MAKE_VARIABLES = {
    "ARGS", "RUN", "PROMPT", "CONFIG", "GRID", "LIMIT", "CHAT", "JAX", "JAX_VERSION", "EXTRAS",
    "PYTHON", "VENV", "GPU_PYTHON", "GPU_JAX",
}  # fmt: skip
COMMAND = re.compile(r"(?:^|[\s`(])((?:\.venv/bin/)?(?:python -m pipeline|pipeline|make)\s[^`\n]*)")


def _code_lines(text: str) -> list[str]:
    """The shell lines of the pages: the lines of ```bash blocks, the `$ `-prompted lines of
    other blocks (not those whose output is an `error:`: they show a mistake on purpose), and
    the inline code spans; continuation lines joined."""
    lines, fence = [], None
    raw = re.sub(r"\\\n\s*", " ", text).splitlines()
    for i, line in enumerate(raw):
        stripped = line.strip()
        if stripped.startswith("```"):
            fence = None if fence is not None else stripped[3:]
        elif fence in ("bash", "sh"):
            lines.append(stripped)
        elif fence is not None and stripped.startswith("$ "):
            following = raw[i + 1].strip() if i + 1 < len(raw) else ""
            if not following.startswith("error:"):
                lines.append(stripped)
    lines += re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
    return lines


def documented_commands() -> list[tuple[str, str]]:
    """(page, command) for each `pipeline ...` and `make ...` command the pages show."""
    found = []
    for page in PAGES:
        for line in _code_lines(page.read_text()):
            line = re.sub(r"(^|\s)#\s.*$", "", line.removeprefix("$ "))  # a comment
            for match in COMMAND.finditer(line):
                command = re.split(r"\s(?:&&|;|\||&|/)\s|;\s*done", match.group(1))[0].strip()
                found.append((str(page.relative_to(ROOT)), command))
    return found


def _words(command: str) -> list[str]:
    """The command's words, with the docs' optional-argument brackets and ellipses dropped."""
    try:
        words = shlex.split(command)
    except ValueError:  # an unfinished quote in prose: the words up to it
        words = command.replace('"', " ").replace("'", " ").split()
    words = [w.strip("[]") for w in words]
    return [w for w in words if w and w not in ("...", "|") and not w.startswith("<")]


def _subparsers(parser: argparse.ArgumentParser) -> dict:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


CONFIG_KEYS = set(flat_keys(Config().to_dict()))


def _check_key(word: str, problems: list[str]) -> None:
    key = word.split("=", 1)[0]
    if "." in key and key.split(".")[0] in Config().to_dict() and key not in CONFIG_KEYS:
        problems.append(f"unknown config key {key!r}")


def check_pipeline(words: list[str]) -> list[str]:
    """What is wrong with `pipeline VERB ...` (empty: nothing)."""
    verbs = _subparsers(build_parser())
    if not words or words[0].startswith("-"):
        return []
    verb = words[0]
    if verb not in verbs:
        return [f"unknown verb {verb!r}"]
    sub = verbs[verb]
    problems = []
    for word in words[1:]:
        if word.startswith("--"):
            flag = word.split("=", 1)[0]
            if flag not in sub._option_string_actions:
                problems.append(f"{verb}: unknown flag {flag}")
        elif "=" in word:
            _check_key(word, problems)
    if verb == "bench":
        targets = next(a for a in sub._actions if a.dest == "target").choices
        positional = [w for w in words[1:] if not w.startswith("-") and "=" not in w]
        if positional and positional[0] not in targets:
            problems.append(f"bench: unknown benchmark {positional[0]!r}")
    return problems


def _make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return set(re.findall(r"^([a-z][\w-]*):", text, flags=re.M))


def check_make(words: list[str]) -> list[str]:
    """What is wrong with `make TARGET [VAR=value ...]` (ARGS' overrides checked as keys)."""
    targets, problems = _make_targets(), []
    for word in words:
        if "=" in word:
            name, value = word.split("=", 1)
            if name not in MAKE_VARIABLES:
                problems.append(f"make: unknown variable {name}")
            if name in ("ARGS", "GRID"):
                for inner in value.split():
                    _check_key(inner, problems)
        elif word not in targets and not word.startswith("-") and not word.startswith("/"):
            problems.append(f"make: unknown target {word!r}")
    return problems


def check(command: str) -> list[str]:
    words = _words(command)
    if words[0] == "make":
        return check_make(words[1:])
    if words[0].endswith("python"):  # python -m pipeline ...
        return check_pipeline(words[3:])
    return check_pipeline(words[1:])


def test_the_pages_show_commands():
    commands = [c for _, c in documented_commands()]
    assert len(commands) > 100, len(commands)
    for verb in ("pretrain", "finetune", "dpo", "grpo", "distill", "serve", "generate", "bench"):
        assert any(f"pipeline {verb} " in c or c == f"make {verb}" for c in commands), verb


def test_every_documented_command_names_what_exists():
    problems = [
        f"{page}: {command}: {p}" for page, command in documented_commands() for p in check(command)
    ]
    assert not problems, "\n".join(problems)


def test_the_check_finds_a_missing_verb_flag_key_and_target():
    assert check("python -m pipeline pretrian --config x.yaml") == ["unknown verb 'pretrian'"]
    assert check("pipeline generate --run r --prompt p --max-tokens 3") == [
        "generate: unknown flag --max-tokens"
    ]
    assert check("pipeline pretrain --config c.yaml train.stepz=3") == [
        "unknown config key 'train.stepz'"
    ]
    assert check('make pretrane ARGS="optimizer.lrr=1"') == [
        "make: unknown target 'pretrane'",
        "unknown config key 'optimizer.lrr'",
    ]


def test_a_removed_flag_fails_the_check(monkeypatch):
    """Remove `generate --draft-k` from the parser: the pages that show it fail the check."""
    original = build_parser

    def without_draft_k():
        parser = original()
        gen = _subparsers(parser)["generate"]
        action = gen._option_string_actions.pop("--draft-k")
        gen._actions.remove(action)
        return parser

    monkeypatch.setattr(sys.modules[__name__], "build_parser", without_draft_k)
    failing = [c for _, c in documented_commands() if check(c)]
    assert failing and all("--draft-k" in c for c in failing)


def _quick_start() -> list[str]:
    """The README's toy-size commands: the code block under "Try it at toy size"."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"Try it at toy size.*?```bash\n(.*?)```", text, flags=re.S).group(1)
    return [line.split("  #")[0].strip() for line in block.splitlines() if line.strip()]


@pytest.mark.e2e
def test_the_readmes_quick_start_runs(tmp_path):
    """Each toy-size command of the README, as written, in a fresh directory with configs/."""
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    env.pop("XLA_FLAGS", None)
    commands = _quick_start()
    assert len(commands) >= 3
    for command in commands:
        words = shlex.split(command)
        assert words[0] == ".venv/bin/python", command
        proc = subprocess.run(
            [sys.executable, *words[1:]], cwd=tmp_path, env=env, capture_output=True, text=True,
            timeout=600,
        )  # fmt: skip
        assert proc.returncode == 0, (command, proc.stderr[-2000:])
    assert (tmp_path / "runs/pretrain_tiny/model").is_dir()
    assert (tmp_path / "runs/finetune_tiny/adapter_model.safetensors").is_file()
