"""Many LoRA adapters on one base: a mixed batch gives each request its adapter's tokens, and
adapters load and unload while the server runs.

Run: pytest tests/test_adapters.py
"""

import threading

import httpx
import jax
import numpy as np
import pytest
from helpers import CFG, NAME, Server

from pipeline.config import LoraConfig
from pipeline.inference.generate import generate
from pipeline.inference.sampling import Sampling
from pipeline.lora import add_lora, load_adapter, save_adapter, target_modules
from pipeline.model import create_model
from pipeline.serving.adapters import Adapters
from pipeline.serving.engine import Engine, Request


def _adapter(tmp_path, name: str, seed: int, rank: int, targets: tuple) -> str:
    """A LoRA run of the tests' base (seed 7) with random A and B (a trained adapter's shape)."""
    cfg = LoraConfig(rank=rank, alpha=2.0 * rank, targets=targets)
    model = add_lora(create_model(CFG, seed=7), cfg, seed=seed)
    rng = np.random.default_rng(seed)
    for parent, attr, _ in target_modules(model, targets):
        layer = getattr(parent, attr)
        layer.lora_b[...] = rng.normal(0, 0.5, layer.lora_b.shape).astype(np.float32)
    save_adapter(model, cfg, tmp_path / name, base=None)
    return str(tmp_path / name)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("adapters")
    return {
        "one": _adapter(tmp, "one", 1, 4, ("q", "v", "up")),
        "two": _adapter(tmp, "two", 2, 8, ("k", "o", "down", "gate")),
    }


def _alone(run: str | None, prompt, n, sampling=Sampling()):
    model = create_model(CFG, seed=7)
    if run:
        load_adapter(model, run)
    return generate(model, [prompt], n, sampling).tokens[0][:n]


@pytest.mark.e2e  # a whole stage or a loaded engine: make test, not test-fast
def test_a_mixed_adapter_batch_gives_each_request_its_adapter_alone(runs):
    model = create_model(CFG, seed=7)
    adapters = Adapters(model, capacity=2, max_rank=8)
    index = {None: 0, **{name: adapters.load(name, run) for name, run in runs.items()}}
    engine = Engine(model, slots=8, block_size=8)
    engine.start()
    rng = np.random.default_rng(0)
    jobs = []
    for i in range(12):
        name = [None, "one", "two"][i % 3]
        prompt = rng.integers(0, 256, int(rng.integers(3, 30))).tolist()
        sampling = Sampling() if i % 2 else Sampling(temperature=0.8, seed=i)
        jobs.append((name, prompt, sampling, []))
    done = threading.Semaphore(0)
    for name, prompt, sampling, out in jobs:
        emit = lambda t, r, out=out: (
            out.append(t) if t is not None else None,
            r and done.release(),
        )  # noqa: E731
        engine.submit(Request(prompt, 10, sampling, emit, adapter=index[name], salt=name or ""))
    for _ in jobs:
        assert done.acquire(timeout=120)
    engine.stop()
    outputs = {}
    for name, prompt, sampling, out in jobs:
        assert out == _alone(runs.get(name), prompt, 10, sampling)
        outputs.setdefault(name, []).append(out)
    assert engine.blocks.used == 0
    # the adapters change the tokens (else this test could not fail)
    assert outputs["one"] != outputs[None][: len(outputs["one"])]


@pytest.mark.e2e
def test_adapters_load_and_unload_while_serving(runs):
    server = Server(adapters=lambda model: Adapters(model, capacity=2, max_rank=8))
    try:
        http = httpx.Client(base_url=server.url, timeout=60)
        body = {"prompt": [5, 6, 7, 8], "max_tokens": 6, "temperature": 0}
        load = {"lora_name": "one", "lora_path": runs["one"]}
        assert http.post("/v1/load_lora_adapter", json=load).status_code == 200
        models = [m["id"] for m in http.get("/v1/models").json()["data"]]
        assert models == [NAME, "one"]
        one = http.post("/v1/completions", json={**body, "model": "one"}).json()
        base = http.post("/v1/completions", json={**body, "model": NAME}).json()
        tokenizer = server.tokenizer
        for answer, run in ((one, runs["one"]), (base, None)):
            ids = _alone(run, [5, 6, 7, 8], 6)
            ids = ids[: ids.index(tokenizer.eos_id)] if tokenizer.eos_id in ids else ids
            assert answer["choices"][0]["text"] == tokenizer.decode(ids)
            assert answer["model"] in ("one", NAME)
        bad = http.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/nowhere"})
        assert bad.status_code == 400 and "not a LoRA run" in bad.json()["error"]["message"]
        again = http.post("/v1/load_lora_adapter", json=load)
        assert again.status_code == 400 and "loaded already" in again.json()["error"]["message"]
        unload = http.post("/v1/unload_lora_adapter", json={"lora_name": "one"})
        assert unload.status_code == 200
        gone = http.post("/v1/completions", json={**body, "model": "one"})
        assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"
        assert http.post("/v1/unload_lora_adapter", json={"lora_name": "one"}).status_code == 404
        load_two = {"lora_name": "two", "lora_path": runs["two"]}
        assert http.post("/v1/load_lora_adapter", json=load_two).status_code == 200
        two = http.post("/v1/completions", json={**body, "model": "two"}).json()
        ids = _alone(runs["two"], [5, 6, 7, 8], 6)
        ids = ids[: ids.index(tokenizer.eos_id)] if tokenizer.eos_id in ids else ids
        assert two["choices"][0]["text"] == tokenizer.decode(ids)
        jax.block_until_ready(server.engine.params)
    finally:
        server.close()
