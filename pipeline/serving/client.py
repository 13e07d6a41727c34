"""The HTTP side's view of the engine: what a route submits, and the two ways it reaches one.

A route hands the engine `Job`s: what a client asked for (the prompt, its budget, sampling,
stop tokens, controls, adapter, grammar) and what it has received so far (tokens counted,
log-probabilities). The engine's own books of a request (slot, blocks, positions, prefill
progress) are `engine.Request`, built from a job by `to_request` on the engine's side.

- `LocalEngine`: the engine's loop on a thread of this process (tests, `pipeline eval`, the
  in-process benchmarks).
- `EngineClient` (`core.py`): the engine in a process of its own, which `pipeline serve` uses,
  so tokenising, detokenising, HTTP and SSE never hold the engine's interpreter lock.

Both offer the same awaitable methods to the routes (`submit`, `score`, `load_adapter`,
`unload_adapter`) and the same figures (`busy_slots`, `queue_depth`, ..., `stats`).
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pipeline.inference.sampling import Sampling
from pipeline.serving.controls import Controls


class EngineDeadError(RuntimeError):
    """The engine stopped for good (its process exited, its loop failed)."""


class AdapterInUseError(RuntimeError):
    """An adapter cannot be unloaded while requests use it."""


_ids = itertools.count()


@dataclass(eq=False)
class Job:
    """One choice of a request, as the HTTP side sees it."""

    prompt: list[int]
    max_tokens: int
    sampling: Sampling
    stop_ids: frozenset[int] = frozenset()
    controls: Controls = Controls()
    adapter: int = 0
    salt: str = ""
    grammar: str | None = None  # an llguidance grammar (structured outputs)
    parent: Job | None = None  # choice 0 of an n-choice request (its prefilled prompt is shared)
    # (token or None, finish reason or None) per delivered token, on the event loop's terms of
    # the backend (LocalEngine: from the engine thread)
    emit: Callable[[int | None, str | None], None] | None = None
    id: int = field(default_factory=_ids.__next__)
    generated: int = 0  # tokens received
    # with controls.logprobs: (log-probability, top ids, their log-probabilities) per token,
    # appended before the token is emitted
    logprobs: list = field(default_factory=list)

    def __getstate__(self) -> dict:  # what crosses to the engine's process
        return {**self.__dict__, "emit": None, "logprobs": []}


def to_request(job: Job, parent, emit, matcher: Callable[[str], Any] | None):
    """The engine's request of `job` (`parent`: the engine's request of its parent)."""
    from pipeline.serving.engine import Request

    return Request(
        prompt=job.prompt,
        max_tokens=job.max_tokens,
        sampling=job.sampling,
        emit=emit,
        stop_ids=job.stop_ids,
        controls=job.controls,
        logprobs=job.logprobs,
        parent=parent,
        grammar=matcher(job.grammar) if job.grammar is not None else None,
        adapter=job.adapter,
        salt=job.salt,
    )


def submit_all(engine, jobs: list[Job], emit_of, matcher, books: dict) -> None:
    """Submit the choices of one request to `engine` (`emit_of(job)`: the engine's callback of
    a job), each entered in `books` (job id -> the engine's request) before it can run; refused
    together (QueueFullError, ValueError): the ones already in are cancelled and forgotten."""
    submitted = []
    try:
        for job in jobs:
            parent = books.get(job.parent.id) if job.parent is not None else None
            request = books[job.id] = to_request(job, parent, emit_of(job), matcher)
            engine.submit(request)
            submitted.append(request)
    except Exception:
        for request in submitted:
            engine.cancel(request)
        for job in jobs:
            books.pop(job.id, None)
        raise


def load_adapter(engine, adapters, name: str, run: str) -> None:
    """Load LoRA run `run` as adapter `name` and give the engine the new stacks (ValueError:
    a run it cannot serve)."""
    adapters.load(name, run)
    engine.params = adapters.params()


def unload_adapter(engine, adapters, name: str) -> None:
    """Unload adapter `name` (AdapterInUseError while a running or waiting request uses it)."""
    if engine.uses(adapters.index[name]):
        raise AdapterInUseError(name)
    adapters.unload(name)
    engine.params = adapters.params()


def ll_tokenizer(tokenizer, n_vocab: int):
    """The tokenizer as llguidance sees it (grammars are checked and followed with it)."""
    from llguidance import LLTokenizer

    return LLTokenizer(tokenizer.hf.to_str(), n_vocab=n_vocab, eos_token=tokenizer.eos_id)


class Matchers:
    """llguidance matchers of grammars, over one tokenizer built on first use."""

    def __init__(self, tokenizer, n_vocab: int):
        self.tokenizer, self.n_vocab, self._llt = tokenizer, n_vocab, None

    def lltokenizer(self):
        if self._llt is None:
            self._llt = ll_tokenizer(self.tokenizer, self.n_vocab)
        return self._llt

    def __call__(self, grammar: str):
        from llguidance import LLMatcher

        return LLMatcher(self.lltokenizer(), grammar)


class Outbox:
    """Tokens from the engine thread to the event loop, a batch per wake-up: the engine's
    callbacks append under a lock, and the first one after a drain schedules one drain on the
    loop. (`call_soon_threadsafe` writes to the loop's wake-up pipe: once per engine delivery
    rather than once per token per request.)"""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._items: list = []
        self._lock = threading.Lock()
        self._scheduled = False

    def put(self, queue: asyncio.Queue, item) -> None:
        with self._lock:
            self._items.append((queue, item))
            if self._scheduled:
                return
            self._scheduled = True
        self.loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        with self._lock:
            items, self._items, self._scheduled = self._items, [], False
        for queue, item in items:
            queue.put_nowait(item)


class LocalEngine:
    """An engine whose loop runs on a thread of this process (started by the caller)."""

    def __init__(self, engine, tokenizer, adapters=None):
        self.engine, self.adapters = engine, adapters
        self.max_len, self.vocab_size = engine.max_len, engine.vocab_size
        self.num_slots, self.kv_blocks = engine.num_slots, engine.kv_blocks
        self.stats = engine.stats
        self.on_death: Callable[[], None] = lambda: None  # (a thread's failure is not seen)
        self.matchers = Matchers(tokenizer, engine.vocab_size)
        self._outbox: Outbox | None = None
        self._requests: dict = {}  # the engine's request of each job not ended

    @property
    def observe(self):
        return self.engine.observe

    @observe.setter
    def observe(self, hook) -> None:
        self.engine.observe = hook

    dead = property(lambda self: self.engine.failed)
    busy_slots = property(lambda self: self.engine.busy_slots)
    queue_depth = property(lambda self: self.engine.queue_depth)
    preemptions = property(lambda self: self.engine.preemptions)
    blocks_used = property(lambda self: self.engine.blocks.used)
    hit_rate = property(lambda self: self.engine.blocks.hit_rate)

    def sink(self, queue: asyncio.Queue) -> Callable:
        """A job's `emit` that puts (token, reason) on `queue`, from the engine thread."""
        loop = asyncio.get_running_loop()
        if self._outbox is None or self._outbox.loop is not loop:
            self._outbox = Outbox(loop)
        outbox = self._outbox
        return lambda token, reason: outbox.put(queue, (token, reason))

    async def submit(self, jobs: list[Job]) -> None:
        """Raises QueueFullError (429) or ValueError (400): nothing of the request is kept."""
        requests = self._requests

        def emit_of(job):
            def emit(token, reason):
                job.generated += token is not None
                if reason is not None:
                    requests.pop(job.id, None)
                job.emit(token, reason)

            return emit

        submit_all(self.engine, jobs, emit_of, self.matchers, requests)

    def cancel(self, job: Job) -> None:
        request = self._requests.get(job.id)
        if request is not None:
            self.engine.cancel(request)

    async def score(self, ids: list[int], adapter: int):
        return await asyncio.to_thread(self.engine.score, ids, adapter)

    async def load_adapter(self, name: str, path: str) -> None:
        await asyncio.to_thread(load_adapter, self.engine, self.adapters, name, path)

    async def unload_adapter(self, name: str) -> None:
        unload_adapter(self.engine, self.adapters, name)
