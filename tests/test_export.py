"""`pipeline export`: the serialised prefill/decode programs generate the live model's tokens.

Run: pytest tests/test_export.py
"""

import json
import os
import subprocess
import sys
import zipfile

import pytest
from conftest import ROOT
from helpers import tiny_model_config

from pipeline.inference.export import export_model
from pipeline.inference.generate import generate
from pipeline.inference.sampling import Sampling
from pipeline.model import create_model
from pipeline.tokenizer import byte_tokenizer

pytestmark = pytest.mark.e2e  # a fresh interpreter per test

CFG = tiny_model_config(vocab_size=263, max_seq_len=64)

# Runs in a fresh interpreter: the artifact must not need Flax or the model code.
LOADER = """
import json, sys
from pipeline.exported import ExportedModel

model = ExportedModel.load(sys.argv[1])
greedy = model.generate([[5, 6, 7], list(range(1, 18))], 12)
sampled = model.generate([[5, 6, 7]], 12, temperature=0.9, top_k=20, top_p=0.9, seed=4)
assert "flax" not in sys.modules and "pipeline.model" not in sys.modules, "imported model code"
print(json.dumps({"greedy": greedy, "sampled": sampled}))
"""


def _python(*args) -> dict:
    """What a fresh interpreter running `args` prints (JSON), on CPU."""
    proc = subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_exported_artifact_generates_the_live_models_tokens(tmp_path, quantize):
    model = create_model(CFG, seed=5)
    if quantize:
        from pipeline.quantize import quantize_model

        quantize_model(model, quantize, embeddings=True)
    artifact = tmp_path / "model.zip"
    manifest = export_model(model, byte_tokenizer(), artifact)
    assert manifest["prefill_buckets"] == [16, 32, 64]
    out = _python("-c", LOADER, str(artifact))
    prompts = [[5, 6, 7], list(range(1, 18))]
    assert out["greedy"] == generate(model, prompts, 12).tokens
    sampling = Sampling(temperature=0.9, top_k=20, top_p=0.9, seed=4)
    assert out["sampled"] == generate(model, [[5, 6, 7]], 12, sampling).tokens


def test_the_artifact_stops_at_every_end_id_of_the_model(tmp_path):
    """An imported model's generation_config.json may name several end ids (the tokenizer's
    `stop_ids`): the manifest keeps them all and the artifact's generation stops at each."""
    model = create_model(CFG, seed=5)
    tokenizer = byte_tokenizer()
    ids = tokenizer.encode("def f(")
    (tokens,) = generate(model, [ids], 12).tokens
    at = next(i for i in range(2, 12) if tokens[i] not in tokens[:i])
    tokenizer.stop_ids = frozenset({tokenizer.eos_id, tokens[at]})  # as import-hf sets them
    artifact = tmp_path / "model.zip"
    manifest = export_model(model, tokenizer, artifact)
    assert manifest["stop_ids"] == sorted({tokenizer.eos_id, tokens[at]})
    args = ("--prompt", "def f(", "--max-new-tokens", "12", "--json")
    out = _python("-m", "pipeline.exported", str(artifact), *args)
    assert out["tokens"] == tokens[: at + 1]


def test_a_truncated_artifact_is_a_clear_error(tmp_path):
    from pipeline.exported import ExportedModel

    artifact = tmp_path / "model.zip"
    export_model(create_model(CFG), byte_tokenizer(), artifact)
    data = artifact.read_bytes()
    artifact.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a complete exported model"):
        ExportedModel.load(artifact)
    with pytest.raises(FileNotFoundError, match="missing.zip"):
        ExportedModel.load(tmp_path / "missing.zip")
    assert zipfile.is_zipfile(tmp_path / "model.zip") is False
