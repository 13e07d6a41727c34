"""`pipeline bench serve --peer transformers`: `transformers serve --continuous-batching` on the
same weights, under the same load as our server (`pipeline/bench/loadgen.py`), with our ratio
to it per concurrency level."""

from __future__ import annotations

import multiprocessing
import os
import socket
import time
from pathlib import Path

import numpy as np

from pipeline.bench.loadgen import random_prompts, run_load
from pipeline.config import Config


class _TransformersServer:
    """`transformers serve --continuous-batching` on the same weights (saved in transformers'
    layout), in its own process: the peer a user would run instead."""

    def __init__(self, cfg: Config, workdir: str):
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
        command += ["--continuous-batching", "--device", "cpu", "--host", "127.0.0.1"]
        command += ["--port", str(self.port), self.model]
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
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def measure(self, clients, load: tuple) -> dict:
        """Run `load` (url, concurrency, prompts, max_tokens, extra) against this server."""
        cpu, start = self._cpu(), time.perf_counter()
        figures = clients.apply(run_load, (*load, None, self.model))
        wall = time.perf_counter() - start
        return {**figures, "cores_busy": (self._cpu() - cpu) / wall}

    def close(self):
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except Exception:
            self.proc.kill()
        self.log.close()


def peer_rows(cfg, case, levels, prompt_len, max_tokens, extra, ours):
    """transformers serve --continuous-batching at the same levels, on the same prompts as
    `bench_serve`; `ours`: our figures per level (for the ratios)."""
    import tempfile

    import jax

    clients = multiprocessing.get_context("spawn").Pool(1)
    with tempfile.TemporaryDirectory() as workdir:
        server = _TransformersServer(cfg, workdir)
        try:
            clients.apply(run_load, (server.url, 1, ["warm up"], 4, extra, None, server.model))
            for c in levels:
                prompts = random_prompts(np.random.default_rng(c), max(8, 4 * c), prompt_len)
                figures = server.measure(clients, (server.url, c, prompts, max_tokens, extra))
                yield {
                    "case": f"serve/{case}/transformers/c{c}",
                    "kind": "serve",
                    "concurrency": c,
                    "slots": 0,
                    "prompt_len": prompt_len,
                    "max_tokens": max_tokens,
                    "request": extra,
                    **figures,
                    "ours_tokens_per_sec_ratio": ours[c]["tokens_per_sec"]
                    / figures["tokens_per_sec"],
                    "ours_ttft_p50_ratio": ours[c]["ttft_p50_ms"] / figures["ttft_p50_ms"],
                    "compile_s": server.compile_s,
                    "device": jax.devices()[0].device_kind,
                    "allocator": "glibc (torch)",
                }
        finally:
            server.close()
            clients.close()
