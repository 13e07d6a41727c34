"""The engine in a process of its own, and the HTTP side's client of it.

`pipeline serve` runs two processes: the HTTP server (routes, tokenising, detokenising, SSE,
metrics) and the engine core (the model, the scheduler, the device loop). They share no
interpreter lock, so the engine's loop never waits for a response being written, and the
server never waits for a step being scheduled: the shape of vLLM's engine core. They talk over
one `multiprocessing` pipe (pickled tuples, a batch of every token delivered per engine
iteration); the server reads it from its event loop (`add_reader`), without a thread.

Messages, server -> core: ("submit", call, jobs), ("cancel", job id), ("score", call, ids,
adapter), ("load", call, name, run), ("unload", call, name), ("stop", drain, timeout).
Core -> server: ("ready", facts) or ("failed", message) once, then ("out", tokens,
observations, figures) per engine iteration that delivered anything, ("reply", call, error,
value) per call, ("stopped",) at the end. What the server sends in one turn of its event loop
goes as one ("many", messages) (requests arrive in bursts: a wave of clients whose answers
ended together), and the replies to one such batch's submits come back as one too: a pipe
write, a wake-up of the other process and a read per burst, not per request.

A core that dies (killed, out of memory, a bug) closes its end of the pipe: the server sees it
at once, ends every request in flight with an error, answers new ones 503, reports it on
`/health`, and exits non-zero for its supervisor to restart (a restarted engine would have to
reload and recompile anyway: a new process is the honest unit of restart). A server that dies
closes the pipe too, and the core stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from pipeline.config import ConfigError, ModelConfig, ServeConfig
from pipeline.inference.runs import Loaded, load_for_inference
from pipeline.model import create_model
from pipeline.runtime import enable_compilation_cache, serving_cache_dir
from pipeline.serving.adapters import Adapters
from pipeline.serving.client import (
    AdapterInUseError,
    EngineDeadError,
    Job,
    Matchers,
    load_adapter,
    submit_all,
    unload_adapter,
)
from pipeline.serving.engine import Engine, QueueFullError
from pipeline.serving.launch import spawn_engine
from pipeline.serving.stats import LoopStats
from pipeline.tokenizer import byte_tokenizer

log = logging.getLogger(__name__)


def _figures(engine) -> dict:
    """The engine's gauges and loop totals, sent with each batch of tokens."""
    return {
        "busy_slots": engine.busy_slots,
        "queue_depth": engine.queue_depth,
        "preemptions": engine.preemptions,
        "blocks_used": engine.blocks.used,
        "hit_rate": engine.blocks.hit_rate,
        "stats": engine.stats.snapshot(),
    }


class Core:
    """The engine core process's side: the engine, its requests by job id, the pipe."""

    def __init__(self, conn, engine, tokenizer, adapters):
        self.conn, self.engine, self.adapters = conn, engine, adapters
        self.matchers = Matchers(tokenizer, engine.vocab_size)
        self.requests: dict = {}  # job id -> the engine's request, until it ends
        self._out: list = []  # (job id, token, reason, new log-probabilities) to send
        self._obs: list = []  # (metric, value) to send
        self._send_lock = threading.Lock()
        self._work = ThreadPoolExecutor(1, thread_name_prefix="engine-calls")
        engine.observe = lambda name, value: self._obs.append((name, value))
        engine.after_iteration = self.flush

    def send(self, message) -> None:
        with self._send_lock:
            self.conn.send(message)

    def emit_of(self, job: Job) -> Callable:
        def emit(token, reason):  # the engine thread
            # the log-probabilities the engine appended since the last token (this process
            # keeps none: the server's job collects them)
            lps = ()
            if job.logprobs:
                lps = job.logprobs[:]
                job.logprobs.clear()
            if reason is not None:
                self.requests.pop(job.id, None)
            self._out.append((job.id, token, reason, lps))

        return emit

    def flush(self) -> None:
        """Send what the engine delivered since the last flush (the engine thread, after each
        iteration)."""
        if not self._out:
            return
        out, self._out = self._out, []
        obs, self._obs = self._obs, []
        self.send(("out", out, obs, _figures(self.engine)))

    def serve(self) -> None:
        """Answer the server's messages until it says stop or goes away."""
        while True:
            if not self.conn.poll(0.5):
                if not self.engine.alive:
                    raise EngineDeadError("the engine loop stopped")
                continue
            try:
                message = self.conn.recv()
            except (EOFError, OSError):  # the server is gone: nothing to serve
                self.engine.stop(drain=False, timeout=10)
                return
            if message[0] == "stop":
                self.engine.stop(drain=message[1], timeout=message[2])
                self.flush()
                self.send(("stopped",))
                return
            replies: list = []
            for one in message[1] if message[0] == "many" else (message,):
                self.handle(one, replies)
            if replies:
                self.send(replies[0] if len(replies) == 1 else ("many", replies))

    def handle(self, message, replies: list) -> None:
        """Act on one message; a submit's reply goes to `replies` (sent once the batch is
        handled), the other calls' from the worker thread when done."""
        kind = message[0]
        if kind == "cancel":
            request = self.requests.get(message[1])
            if request is not None:
                self.engine.cancel(request)
        elif kind == "submit":
            _, call, jobs = message
            replies.append(answer(call, self._submit, jobs))
        elif kind == "score":
            _, call, ids, adapter = message
            self._work.submit(self.reply, call, self.engine.score, ids, adapter)
        elif kind == "load":
            self._work.submit(self.reply, message[1], self._load, *message[2:])
        elif kind == "unload":
            self._work.submit(self.reply, message[1], self._unload, message[2])

    def _submit(self, jobs: list[Job]) -> None:
        submit_all(self.engine, jobs, self.emit_of, self.matchers, self.requests)

    def _load(self, name: str, run: str) -> dict:
        load_adapter(self.engine, self.adapters, name, run)
        return adapter_books(self.adapters)

    def _unload(self, name: str) -> dict:
        unload_adapter(self.engine, self.adapters, name)
        return adapter_books(self.adapters)

    def reply(self, call: int, fn, *args) -> None:
        self.send(answer(call, fn, *args))


def answer(call: int, fn, *args) -> tuple:
    """("reply", call, error, value) of `fn(*args)`: its value, or the error the caller raises
    ((kind, message): refusals as themselves, anything else as a RuntimeError)."""
    try:
        value, error = fn(*args), None
    except (QueueFullError, ValueError, AdapterInUseError) as err:
        value, error = None, (type(err).__name__, str(err))
    except Exception as err:  # a bug: the caller gets a 500, the engine goes on
        log.exception("engine call %s failed", getattr(fn, "__name__", fn))
        value, error = None, ("RuntimeError", f"{type(err).__name__}: {err}")
    return ("reply", call, error, value)


def adapter_books(adapters) -> dict | None:
    """What the server needs of the adapters: names -> index, salt, run."""
    if adapters is None:
        return None
    return {"index": dict(adapters.index), "salts": dict(adapters.salts), "runs": adapters.runs}


def engine_args(cfg: ServeConfig) -> dict:
    """The Engine's keyword arguments from the serve config."""
    return {
        "slots": cfg.slots,
        "max_len": cfg.max_len,
        "max_queue": cfg.max_queue,
        "kv_blocks": cfg.kv_blocks,
        "kv_memory_gb": cfg.kv_memory_gb,
        "block_size": cfg.block_size,
        "prefill_chunk": cfg.prefill_chunk,
        "decode_prefill_chunk": cfg.decode_prefill_chunk,
        "decode_steps": cfg.decode_steps,
        "prefill_wait": (cfg.prefill_wait_ratio, cfg.prefill_max_wait),
        "prefix_caching": cfg.prefix_caching,
    }


def build_engine(
    run_dir, cfg: ServeConfig, adapter_runs: dict[str, str] | None = None, background=True
):
    """Load a run (and the LoRA adapters to serve beside it) into a warmed-up engine, not
    started: (engine, tokenizer, adapters or None). `run_dir` may be a ModelConfig instead:
    a model of random weights and the byte tokenizer (benchmarks). `background`: compile
    only what a first request needs before returning, the rest while serving."""
    if isinstance(run_dir, ModelConfig):
        loaded = Loaded(None, create_model(run_dir), byte_tokenizer(), None)
    else:
        loaded = load_for_inference(run_dir, cfg.quantize, cfg.draft)
    adapters = None
    capacity = max(cfg.max_adapters, len(adapter_runs or {}))
    if capacity:
        if cfg.draft:
            raise ConfigError("serve: adapters and a draft model (serve.draft) exclude each other")
        try:
            adapters = Adapters(loaded.model, capacity, cfg.max_lora_rank)
            for adapter, run in (adapter_runs or {}).items():
                adapters.load(adapter, run)
        except ValueError as err:
            raise ConfigError(f"--adapter: {err}") from None
    engine = Engine(loaded.model, draft=loaded.draft, draft_k=cfg.draft_k, **engine_args(cfg))
    engine.warmup(background=background)
    return engine, loaded.tokenizer, adapters


def core_main(conn, run_dir, cfg: ServeConfig, adapter_runs, level, background):
    """The engine core process: load, compile (with `background`, only what a first request
    needs before saying ready), serve."""
    for sig in (signal.SIGINT, signal.SIGTERM):  # the server decides when this process ends
        signal.signal(sig, signal.SIG_IGN)
    logging.basicConfig(format="%(name)s: %(message)s")
    logging.getLogger("pipeline").setLevel(level)
    enable_compilation_cache(serving_cache_dir(cfg.compilation_cache))
    try:
        engine, tokenizer, adapters = build_engine(run_dir, cfg, adapter_runs, background)
    except ConfigError as err:
        conn.send(("failed", str(err)))
        return
    core = Core(conn, engine, tokenizer, adapters)
    engine.start()
    facts = {
        "max_len": engine.max_len,
        "vocab_size": engine.vocab_size,
        "num_slots": engine.num_slots,
        "kv_blocks": engine.kv_blocks,
        "adapters": adapter_books(adapters),
        "pid": os.getpid(),
        "compile_s": engine.compile_seconds,
        "programs": engine.program_count,
    }
    core.send(("ready", facts))
    try:
        core.serve()
    except EngineDeadError:
        core.flush()
        os._exit(1)  # the loop failed (logged): the server sees the pipe close


class Books:
    """The adapters as the server sees them (the engine's process holds the weights)."""

    def __init__(self, books: dict):
        self.index, self.salts, self.runs = books["index"], books["salts"], books["runs"]


class EngineClient:
    """The server's handle on the engine core process (the same surface as `LocalEngine`)."""

    def __init__(self, conn, process, facts: dict):
        self.conn, self.process = conn, process
        self.max_len, self.vocab_size = facts["max_len"], facts["vocab_size"]
        self.num_slots, self.kv_blocks = facts["num_slots"], facts["kv_blocks"]
        self.pid, self.compile_s = facts["pid"], facts["compile_s"]
        self.program_count = facts["programs"]
        self.adapters = Books(facts["adapters"]) if facts["adapters"] is not None else None
        self.stats = LoopStats()
        self.busy_slots = self.queue_depth = self.preemptions = self.blocks_used = 0
        self.hit_rate = 0.0
        self.observe = lambda name, value: None
        self.dead: str | None = None  # why the engine is gone
        self.on_death: Callable[[], None] = lambda: None
        self.jobs: dict[int, Job] = {}
        self._calls: dict[int, asyncio.Future] = {}
        self._next_call = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._outbox: list = []  # messages of this turn of the event loop, sent together

    def attach(self) -> None:
        """Read the pipe from the running event loop (once the server's loop runs)."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._loop = loop
            loop.add_reader(self.conn.fileno(), self._readable)

    def sink(self, queue: asyncio.Queue) -> Callable:
        self.attach()
        return lambda token, reason: queue.put_nowait((token, reason))

    def _readable(self) -> None:
        try:
            while self.conn.poll():
                self._receive(self.conn.recv())
        except (EOFError, OSError):
            self._died()

    def _receive(self, message) -> None:
        kind = message[0]
        if kind == "many":
            for one in message[1]:
                self._receive(one)
        elif kind == "out":
            _, out, obs, figures = message
            for job_id, token, reason, lps in out:
                job = self.jobs.get(job_id)
                if job is None:
                    continue
                job.logprobs.extend(lps)
                job.generated += token is not None
                if reason is not None:
                    del self.jobs[job_id]
                job.emit(token, reason)
            for name, value in obs:
                self.observe(name, value)
            self._figures(figures)
        elif kind == "reply":
            _, call, error, value = message
            future = self._calls.pop(call, None)
            if future is not None and not future.done():
                if error is None:
                    future.set_result(value)
                else:
                    future.set_exception(_error(*error))

    def _figures(self, figures: dict) -> None:
        for name in ("busy_slots", "queue_depth", "preemptions", "blocks_used", "hit_rate"):
            setattr(self, name, figures[name])
        for name, value in figures["stats"].items():
            setattr(self.stats, name, value)

    def _died(self) -> None:
        if self.dead is not None:
            return
        if self._loop is not None:
            self._loop.remove_reader(self.conn.fileno())
        self.process.join(1)
        self.dead = f"the engine process exited (exit code {self.process.exitcode})"
        log.error("%s: ending %d requests in flight", self.dead, len(self.jobs))
        jobs, self.jobs = self.jobs, {}
        for job in jobs.values():
            job.emit(None, "error")
        calls, self._calls = self._calls, {}
        for future in calls.values():
            if not future.done():
                future.set_exception(EngineDeadError(self.dead))
        self.on_death()

    def _send(self, message) -> None:
        """Send `message` at the end of this turn of the event loop, with the others of the
        turn (before the loop runs: at once)."""
        if self.dead is not None:
            raise EngineDeadError(self.dead)
        self._outbox.append(message)
        if self._loop is None:
            self._flush()
            if self.dead is not None:  # the pipe broke under it
                raise EngineDeadError(self.dead)
        elif len(self._outbox) == 1:
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        box, self._outbox = self._outbox, []
        if not box or self.dead is not None:  # (dead: every call waiting has its error)
            return
        try:
            self.conn.send(box[0] if len(box) == 1 else ("many", box))
        except OSError:
            self._died()

    async def _call(self, kind: str, *args):
        self.attach()
        call, self._next_call = self._next_call, self._next_call + 1
        future = self._calls[call] = asyncio.get_running_loop().create_future()
        self._send((kind, call, *args))
        return await future

    async def submit(self, jobs: list[Job]) -> None:
        for job in jobs:
            self.jobs[job.id] = job
        try:
            await self._call("submit", jobs)
        except BaseException:  # refused, or the client went away while it was being taken
            for job in jobs:
                self.cancel(job)
                self.jobs.pop(job.id, None)
            raise

    def cancel(self, job: Job) -> None:
        if job.id in self.jobs and self.dead is None:
            with contextlib.suppress(EngineDeadError):
                self._send(("cancel", job.id))

    async def score(self, ids: list[int], adapter: int):
        return await self._call("score", ids, adapter)

    async def load_adapter(self, name: str, run: str) -> None:
        self.adapters = Books(await self._call("load", name, run))

    async def unload_adapter(self, name: str) -> None:
        self.adapters = Books(await self._call("unload", name))

    def stop(self, drain: bool, timeout: float | None) -> None:
        """Finish (with `drain`) the requests in the engine, then end its process."""
        if self.dead is None and self.process.is_alive():
            self._flush()
            try:
                self.conn.send(("stop", drain, timeout))
                deadline = time.monotonic() + (timeout or 60) + 30
                while time.monotonic() < deadline and self.conn.poll(deadline - time.monotonic()):
                    if self.conn.recv()[0] == "stopped":
                        break
            except (EOFError, OSError):
                pass
        self.process.join(30)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()


def _error(name: str, message: str) -> Exception:
    kinds = {
        "QueueFullError": QueueFullError,
        "AdapterInUseError": AdapterInUseError,
        "ValueError": ValueError,
    }
    return kinds.get(name, RuntimeError)(message)


def connect(spawned) -> EngineClient:
    """The client of an engine process `launch.spawn_engine` started, once it can serve a first
    request (its loading errors are ConfigErrors here, as if it had loaded in this process)."""
    ours, process = spawned
    try:
        message = ours.recv()
    except EOFError:
        process.join()
        message = f"serve: the engine process exited (exit code {process.exitcode})"
        raise ConfigError(message) from None
    if message[0] == "failed":
        process.join()
        raise ConfigError(message[1])
    return EngineClient(ours, process, message[1])


def start_engine(
    run_dir, cfg: ServeConfig, adapter_runs: dict | None = None, background: bool = True
) -> EngineClient:
    """Start the engine core process on a run (or a ModelConfig: random weights, see
    `build_engine`) and wait until it can serve a first request."""
    return connect(spawn_engine(run_dir, cfg, adapter_runs, background))
