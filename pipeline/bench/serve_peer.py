"""`pipeline bench serve --peer transformers`: `transformers serve --continuous-batching` on the
same weights, on the device the benchmark runs on, under the same load as our server
(`pipeline/bench/loadgen.py`), in its two configurations (eager; `--compile`, with CUDA graphs
on a GPU), with our ratio per concurrency level to each and, in `peer_best`, to the faster."""

from __future__ import annotations

import multiprocessing
import socket
import time
from pathlib import Path

import numpy as np

from pipeline.bench.loadgen import process_cpu_seconds, random_prompts, run_load
from pipeline.config import Config, ConfigError


class _TransformersServer:
    """`transformers serve --continuous-batching` on the same weights (saved in transformers'
    layout), in its own process: the peer a user would run instead."""

    def __init__(self, cfg: Config, workdir: str, flags: list[str]):
        import subprocess
        import sys
        import urllib.request

        from pipeline.interop.hf import save_hf
        from pipeline.model import create_model
        from pipeline.tokenizer import byte_tokenizer

        path = Path(workdir) / "hf"
        self.model = str(save_hf(cfg.model, create_model(cfg.model), byte_tokenizer(), path))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        command = [str(Path(sys.executable).with_name("transformers")), "serve"]
        device = peer_device()
        command += ["--continuous-batching", "--device", device, "--host", "127.0.0.1"]
        if device == "cuda" and cfg.model.compute_dtype in ("bfloat16", "float16"):
            command += ["--dtype", cfg.model.compute_dtype]  # as users serve on a GPU
        command += [*flags, "--port", str(self.port), self.model]
        start = time.perf_counter()
        self.log = open(Path(workdir) / "transformers-serve.log", "w")  # noqa: SIM115
        self.proc = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT)
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"transformers serve exited; see {self.log.name}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2)
                break
            except OSError:
                if time.perf_counter() - start > 300:
                    raise RuntimeError("transformers serve did not start in 300 s") from None
                time.sleep(0.5)
        self.compile_s = time.perf_counter() - start

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/completions"

    def _cpu(self) -> float:
        return process_cpu_seconds(self.proc.pid)

    def measure(self, clients, load: tuple) -> dict:
        """Run `load` (url, concurrency, prompts, max_tokens, extra) against this server."""
        cpu, start = self._cpu(), time.perf_counter()
        figures = clients.apply(run_load, (*load, None, self.model))
        wall, server = time.perf_counter() - start, self._cpu() - cpu
        per_request = 1e6 / figures["requests"]
        clients_cpu = figures.pop("cpu_s")
        return {
            **figures,
            "cores_busy": server / wall,
            "server_cpu_us_per_request": server * per_request,
            "clients_cpu_us_per_request": clients_cpu * per_request,
        }

    def close(self):
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except Exception:
            self.proc.kill()
        self.log.close()


def peer_device() -> str:
    """transformers' device for the backend JAX runs on here (the benchmark's device)."""
    import jax

    backend = jax.default_backend()
    if backend in ("cpu", "gpu", "cuda"):
        return "cpu" if backend == "cpu" else "cuda"
    raise ConfigError(f"bench serve --peer transformers runs on cpu or cuda, not {backend}")


def peer_configs() -> dict[str, list[str]]:
    """The peer's configurations (name: its flags): eager, and compiled (+ CUDA graphs)."""
    compiled = ["--compile", *(["--cb-use-cuda-graph"] if peer_device() == "cuda" else [])]
    return {
        "transformers serve --continuous-batching": [],
        "transformers serve --continuous-batching " + " ".join(compiled): compiled,
    }


def peer_rows(cfg, case, levels, prompt_len, max_tokens, extra, ours):
    """transformers serve --continuous-batching, in each configuration, at the same levels, on
    the same prompts as `bench_serve`; `ours`: our figures per level (for the ratios). Then per
    level `serve/{case}/transformers-best/c{c}`: our ratios to the faster configuration."""
    import tempfile

    clients = multiprocessing.get_context("spawn").Pool(1)
    rows = {c: [] for c in levels}
    try:
        for name, flags in peer_configs().items():
            with tempfile.TemporaryDirectory() as workdir:
                try:
                    server = _TransformersServer(cfg, workdir, flags)
                except RuntimeError as err:  # a configuration this peer cannot run here
                    log = Path(workdir) / "transformers-serve.log"
                    tail = log.read_text()[-600:] if log.exists() else ""
                    yield {"case": f"serve/{case}/transformers", "kind": "peer_failed"} | {
                        "peer_config": name,
                        "error": f"{err}: {tail}",
                    }
                    continue
                try:
                    warm = (server.url, 1, ["warm up"], 4, extra, None, server.model)
                    clients.apply(run_load, warm)
                    for c in levels:
                        row = _level(server, clients, case, c, prompt_len, max_tokens, extra)
                        label = "transformers-compiled" if flags else "transformers"
                        row["case"] = f"serve/{case}/{label}/c{c}"
                        row = {**row, "peer_config": name, **_ratios(ours[c], row)}
                        rows[c].append(row)
                        yield row
                finally:
                    server.close()
        for c in [c for c in levels if rows[c]]:
            best = max(rows[c], key=lambda r: r["tokens_per_sec"])
            yield {**best, "case": f"serve/{case}/transformers-best/c{c}"}
    finally:
        clients.close()


def _ratios(ours: dict, peer: dict) -> dict:
    return {
        "ours_tokens_per_sec_ratio": ours["tokens_per_sec"] / peer["tokens_per_sec"],
        "ours_ttft_p50_ratio": ours["ttft_p50_ms"] / peer["ttft_p50_ms"],
    }


def _level(server, clients, case, c, prompt_len, max_tokens, extra) -> dict:
    import jax

    prompts = random_prompts(np.random.default_rng(c), max(8, 4 * c), prompt_len)
    figures = server.measure(clients, (server.url, c, prompts, max_tokens, extra))
    return {
        "case": f"serve/{case}/transformers/c{c}",
        "kind": "serve",
        "concurrency": c,
        "slots": 0,
        "prompt_len": prompt_len,
        "max_tokens": max_tokens,
        "request": extra,
        **figures,
        "compile_s": server.compile_s,
        "device": jax.devices()[0].device_kind,
        "allocator": "glibc (torch)",
    }
