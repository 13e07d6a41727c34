"""Process and device setup: multi-process initialisation and the measured matmul peak.

`init_distributed` must run before anything touches JAX devices; the CLI calls it first.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import socket
import time
from contextlib import contextmanager
from functools import cache
from pathlib import Path

import jax

from pipeline.config import ConfigError, RunConfig

LOCK_FILE = ".lock"


class RunDirInUseError(ConfigError):
    """Another process holds the run directory (a second `make pretrain`, say): a user's
    mistake, one error line."""


@contextmanager
def run_dir_lock(run_dir: str | Path, enabled: bool = True, shared: bool = False):
    """Hold `run_dir` while the block runs: an advisory `flock` on its `.lock` file. A writer
    (training: pretrain, finetune, distill, a sweep's points) holds it exclusively and records
    itself in it (pid, host, start); readers that must not see a run change under them (export,
    export-hf) hold it `shared`, many at once, none while a writer does. The OS drops the lock
    when the process ends, however it ends (`kill -9` too), so a lock is never stale. A process
    that cannot have it gets `RunDirInUseError` naming the holder. `enabled` False (the other
    processes of a multi-process job: process 0 holds it for them) does nothing. fcntl's `flock`
    rather than a library (filelock, say): the writer's record lives in the locked file."""
    if not enabled:
        yield
        return
    path = Path(run_dir)
    if shared and not path.is_dir():
        yield  # nothing to protect: the reader reports the missing run itself
        return
    path.mkdir(parents=True, exist_ok=True)
    fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 4096).decode(errors="replace")
        os.close(fd)
        raise RunDirInUseError(_in_use(path, holder, shared)) from None
    if not shared:
        since = time.strftime("%Y-%m-%d %H:%M:%S")
        record = {"pid": os.getpid(), "host": socket.gethostname(), "since": since}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
    try:
        yield
    finally:
        if not shared:
            os.ftruncate(fd, 0)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _in_use(path: Path, holder: str, shared: bool) -> str:
    try:
        who = json.loads(holder)
        who = f"process {who['pid']} on {who['host']} (since {who['since']})"
    except (ValueError, KeyError, TypeError):
        who = "another process (an export reading it)"
    if shared:
        return f"{path} is in use by {who}, which is training it: export it when it stops"
    return (
        f"{path} is in use by {who}: one process trains in a run directory at a time; "
        "wait for it, stop it, or choose another run.dir"
    )


def serving_cache_dir(setting: str | None) -> str | None:
    """Where `serve` keeps compiled programs: `setting` (serve.compilation_cache or
    --compilation-cache) when it names a directory; "off" (or "none", "") for no cache; unset
    ("auto" or None): JAX's own $JAX_COMPILATION_CACHE_DIR when set, else
    $PIPELINE_COMPILATION_CACHE, else the user's cache ($XDG_CACHE_HOME, or ~/.cache, then
    pipeline/jax). A server restarted with the same model and settings loads its programs
    instead of compiling them."""
    if setting is not None and setting.lower() in ("off", "none", ""):
        return None
    if setting not in (None, "auto"):
        return setting
    for name in ("JAX_COMPILATION_CACHE_DIR", "PIPELINE_COMPILATION_CACHE"):
        if os.environ.get(name):
            return os.environ[name]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "pipeline", "jax")


def enable_compilation_cache(path: str | None) -> None:
    """Keep compiled programs on disk under `path`, so the next process starts without compiling.

    Every program is cached, however quick its compilation (JAX's default skips those under a
    second, which is most of a small model's programs on CPU).
    """
    if not path:
        return
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", os.path.abspath(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def init_distributed(run: RunConfig) -> bool:
    """Join a multi-process run when the config or the environment asks for one."""
    address = run.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if not (run.distributed or address):
        return False
    num_processes = run.num_processes or _env_int("JAX_NUM_PROCESSES")
    process_id = run.process_id if run.process_id is not None else _env_int("JAX_PROCESS_ID")
    if jax.config.jax_platforms in (None, "", "cpu") or os.environ.get("JAX_PLATFORMS") == "cpu":
        # CPU collectives across processes need gloo (loopback or a real network).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=address, num_processes=num_processes, process_id=process_id
    )
    return True


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value else None


def allocator() -> str:
    """The allocator this process runs with (benchmarks report it: jemalloc is much faster):
    jemalloc where its `mallctl` is loaded, not merely named in LD_PRELOAD (a preload of a
    library that is not installed is ignored by the loader with a warning)."""
    try:
        loaded = hasattr(ctypes.CDLL(None), "mallctl")
    except OSError:
        loaded = "jemalloc" in os.environ.get("LD_PRELOAD", "")
    return "jemalloc" if loaded else "system malloc"


def release_free_memory() -> bool:
    """Hand the allocator's freed pages back to the system now (after compiling many programs,
    whose leftovers an allocator keeps for reuse): jemalloc's purge of every arena, glibc's
    `malloc_trim`. Whether either ran."""
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return False
    if hasattr(libc, "mallctl"):  # jemalloc (preloaded)
        libc.mallctl.argtypes = [ctypes.c_char_p] + [ctypes.c_void_p] * 3 + [ctypes.c_size_t]
        return libc.mallctl(b"arena.4096.purge", None, None, None, 0) == 0  # 4096: every arena
    if hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
        return True
    return False


def is_main_process() -> bool:
    return jax.process_index() == 0


@cache
def measure_matmul_peak(
    dtype: str = "float32", size: int | None = None, repeats: int = 10
) -> float:
    """FLOP/s of a jitted size x size matmul on the first device (best of `repeats`).

    Random operands (zeros or ones can run faster than real data); 2048 on CPU, 8192 on
    accelerators, whose matrix units a smaller product does not fill.
    """
    device = jax.local_devices()[0]
    size = size or (2048 if device.platform == "cpu" else 8192)
    a = jax.device_put(jax.random.normal(jax.random.key(0), (size, size), dtype), device)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


# Dense (no sparsity) peak FLOP/s per chip from the vendors' data sheets, for MFU against the
# nominal figure: (device_kind prefix, bfloat16/float16, float32 through the matrix units).
NOMINAL_PEAKS = (
    ("NVIDIA H200", 989.4e12, 494.7e12),
    ("NVIDIA H100 PCIe", 756.0e12, 378.0e12),
    ("NVIDIA H100", 989.4e12, 494.7e12),  # SXM
    ("NVIDIA A100", 312.0e12, 156.0e12),
    ("NVIDIA L4", 121.0e12, 60.0e12),
    ("NVIDIA A10G", 70.0e12, 35.0e12),
    ("TPU v6 lite", 918.0e12, None),
    ("TPU v5p", 459.0e12, None),
    ("TPU v5 lite", 197.0e12, None),
    ("TPU v4", 275.0e12, None),
)


def nominal_peak_flops(device_kind: str, dtype: str) -> float | None:
    """The data-sheet peak of one chip in `dtype`, None where unknown (CPUs among them)."""
    for prefix, half, single in NOMINAL_PEAKS:
        if device_kind.startswith(prefix):
            return half if dtype in ("bfloat16", "float16") else single
    return None


def aggregate_peak_flops(per_device: float | None, dtype: str) -> float:
    """Peak FLOP/s of all devices of the run. Simulated CPU devices share one machine's cores."""
    if jax.devices()[0].platform == "cpu":
        return per_device or measure_matmul_peak(dtype)
    return (per_device or measure_matmul_peak(dtype)) * jax.device_count()
