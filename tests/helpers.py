"""Helpers the tests share: the tiny model they build and one in-process server.

Not a test module; import from it (`from helpers import Server, tiny_model_config`).
"""

import os
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import uvicorn

from pipeline.config import ModelConfig, ServeConfig
from pipeline.inference.generate import generate
from pipeline.inference.sampling import Sampling
from pipeline.model import create_model
from pipeline.serving.engine import Engine
from pipeline.serving.serve import create_app, uvicorn_config
from pipeline.tokenizer import byte_tokenizer


def tiny_model_config(**changes) -> ModelConfig:
    """The tests' tiny Llama-style model: 2 layers, width 32, 4 query and 2 key-value heads,
    the byte tokenizer's 320 tokens, 128 positions; `changes` override any of them."""
    sizes = dict(vocab_size=320, num_layers=2, embed_dim=32, num_heads=4, num_kv_heads=2)
    return ModelConfig(**{"family": "llama", **sizes, "max_seq_len": 128, **changes})


CFG = tiny_model_config()  # the serving tests' model
NAME = "tiny"
GREEDY = Sampling()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """An engine and the app on a real socket, in this process (the engine thread + uvicorn)."""

    def __init__(
        self,
        slots=4,
        max_queue=64,
        api_key=None,
        start_engine=True,
        cfg=CFG,
        adapters=None,
        model=None,
        tokenizer=None,
        **app_kw,
    ):
        """`adapters(model)`: the model's Adapters (wrapped before the engine takes it);
        `model`, `tokenizer`: those (e.g. an imported run's) in place of a tiny random model
        and the byte tokenizer."""
        self.model = model if model is not None else create_model(cfg, seed=7)
        self.tokenizer = tokenizer if tokenizer is not None else byte_tokenizer()
        self.adapters = adapters(self.model) if adapters else None
        self.engine = Engine(self.model, slots=slots, max_queue=max_queue)
        self.engine.warmup()
        if start_engine:
            self.engine.start()
        self.port = free_port()
        serve_cfg = ServeConfig(api_key=api_key, port=self.port, **app_kw)
        self.app = create_app(self.engine, self.tokenizer, NAME, serve_cfg, self.adapters)
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn_config(self.app, serve_cfg, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.02)

    def close(self):
        self.server.should_exit = True
        self.thread.join(10)
        self.engine.stop(drain=False, timeout=10)

    def expected(self, prompt: str, n: int, sampling=GREEDY, stop_ids=()) -> str:
        """What the model generates for `prompt` alone, outside the server."""
        ids = generate(self.model, [self.tokenizer.encode(prompt)], n, sampling).tokens[0]
        for i, t in enumerate(ids):
            if t in stop_ids:
                ids = ids[:i]
                break
        return self.tokenizer.decode(ids)


def openai_client(server, key="unused"):
    """The official `openai` client for `server`."""
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)


def serve_process(run: str, cache, *overrides: str, port: int | None = None):
    """`pipeline serve` on `run` as a real process (configs/serve.yaml, the compilation cache
    in `cache`), once /health answers: (the process, its URL)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    port = port or free_port()
    command = [sys.executable, "-m", "pipeline", "serve", "--run", run, "--port", str(port)]
    command += ["--config", os.path.join(root, "configs", "serve.yaml")]
    command += [f"serve.compilation_cache={cache}", *overrides]
    proc = subprocess.Popen(
        command,
        cwd=root,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""},
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 240
    while True:
        assert proc.poll() is None, proc.stdout.read()
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        assert time.time() < deadline, "server did not come up"
        time.sleep(0.3)
