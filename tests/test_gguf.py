"""GGUF in and out, against transformers' own GGUF loader.

Tiny random models that transformers builds here, imported, written as GGUF by `export-gguf`
(the `gguf` package's writer), loaded by `AutoModelForCausalLM.from_pretrained(gguf_file=...)`
and read back by `import-hf FILE.gguf`: logits within 1e-4 of ours for float types, the
tokenizer's ids and the rendered chat the same; quantised files (the common llama.cpp types,
written with `gguf`'s quantisers or as raw blocks) read to the same logits as transformers'
own dequantisation gives.

Run: pytest tests/test_gguf.py
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from test_hf_families import CASES, _hf_model, _logits, _ours  # noqa: E402

from pipeline.cli import main  # noqa: E402
from pipeline.config import ConfigError  # noqa: E402
from pipeline.inference.runs import load_model  # noqa: E402
from pipeline.interop import gguf as ours_gguf  # noqa: E402
from pipeline.interop.hf import import_hf  # noqa: E402
from pipeline.tokenizer import byte_tokenizer, prompt_ids  # noqa: E402

pytestmark = pytest.mark.e2e  # whole models against transformers, torch alongside

TEMPLATE = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|end|>{% endfor %}<|assistant|>"
FAMILIES = {  # GGUF carries no RoPE scaling or sliding window: the plain variants
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 4096}),
    "qwen2": CASES["qwen2"],
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 128}),  # transformers' GGUF default
}
TEXT = "héllo wörld, 你好, привет: def main():\n\treturn 0"


def _import(tmp_path, family: str, **sizes):
    """A transformers model of `family`, imported with a chat template: (it, our run)."""
    CASES[f"gguf-{family}"] = (*FAMILIES[family][:2], {**FAMILIES[family][2], **sizes})
    tok = byte_tokenizer()
    hf = _hf_model(f"gguf-{family}", tok.eos_id)
    hf.save_pretrained(tmp_path / "hf")
    tok.hf.save(str(tmp_path / "hf" / "tokenizer.json"))
    (tmp_path / "template.jinja").write_text(TEMPLATE)
    import_hf(tmp_path / "hf", tmp_path / "run", chat_template=str(tmp_path / "template.jinja"))
    return hf, tmp_path / "run"


def _theirs(path):
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name
    ).eval()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_gguf_round_trip_through_transformers(tmp_path, family):
    _, run = _import(tmp_path, family)
    _, ours, tokenizer = load_model(run)
    assert main(["export-gguf", str(run), "--out", str(tmp_path / "m.gguf"), "--dtype", "f32"]) == 0
    theirs = _theirs(tmp_path / "m.gguf")
    x = np.random.default_rng(0).integers(0, 263, (2, 24))
    assert np.abs(_logits(theirs, x) - _ours(ours, x)).max() < 1e-4  # ours -> GGUF -> transformers
    assert main(["import-hf", str(tmp_path / "m.gguf"), "--out", str(tmp_path / "back")]) == 0
    cfg, back, back_tok = load_model(tmp_path / "back")
    assert cfg.model.family == ("llama" if family == "mistral" else family)
    assert np.abs(_logits(theirs, x) - _ours(back, x)).max() < 1e-4  # GGUF -> ours
    their_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="m.gguf")
    ids = their_tok(TEXT, add_special_tokens=False)["input_ids"]
    assert back_tok.encode(TEXT) == ids == tokenizer.encode(TEXT)
    messages = [{"role": "user", "content": TEXT}]
    rendered = their_tok.apply_chat_template(messages, tokenize=False)
    assert back_tok.decode(prompt_ids(back_tok, messages), skip_special=False) == rendered
    assert back_tok.eos_id == tokenizer.eos_id


@pytest.mark.parametrize("dtype", ["f16", "bf16", "q8_0"])
def test_exported_types_read_back_as_transformers_reads_them(tmp_path, dtype):
    _, run = _import(tmp_path, "llama")
    _, ours, _ = load_model(run)
    ours_gguf.export_gguf(run, tmp_path / "m.gguf", dtype)
    types = {t.tensor_type.name for t in gguf.GGUFReader(str(tmp_path / "m.gguf")).tensors}
    assert types == {"F32", dtype.upper()}  # norms stay f32
    theirs = _theirs(tmp_path / "m.gguf")
    x = np.random.default_rng(1).integers(0, 263, (2, 24))
    reference = _ours(ours, x)
    error = np.abs(_logits(theirs, x) - reference).max()
    assert 0 < error < {"f16": 0.05, "bf16": 0.3, "q8_0": 0.5}[dtype]  # the type's rounding
    ours_gguf.import_gguf(tmp_path / "m.gguf", tmp_path / "back")
    _, back, _ = load_model(tmp_path / "back")
    assert np.abs(_logits(theirs, x) - _ours(back, x)).max() < 1e-4


def _blocks(qtype, rows: int, cols: int, rng) -> np.ndarray:
    """Random bytes of a K-quant type, its scales set small and finite."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    data = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    scale = np.full(1, 0.002, np.float16).view(np.uint8)
    if qtype.name == "Q6_K":  # ..., its d the last two bytes
        data[..., -2:] = scale
    else:  # d and dmin first
        data[..., 0:2], data[..., 2:4] = scale, scale
    return data.reshape(rows, -1)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K"])
def test_quantised_files_dequantise_as_transformers_does(tmp_path, monkeypatch, qtype):
    """Files in llama.cpp's common quantised types (their matrices in `qtype`, the rest f32):
    our import and transformers' loader (its own dequantisation) give the same logits."""
    T = gguf.GGMLQuantizationType
    rng = np.random.default_rng(2)

    def encode(_, value, dtype):
        value = np.ascontiguousarray(value, np.float32)
        block = gguf.GGML_QUANT_SIZES[T[qtype]][0]
        if value.ndim == 1 or value.shape[-1] % block:
            return value, T.F32
        if qtype.endswith("_K"):  # no quantiser in gguf: raw blocks
            return _blocks(T[qtype], value.shape[0], value.shape[1], rng), T[qtype]
        return gguf.quants.quantize(value, T[qtype]), T[qtype]

    _, run = _import(tmp_path, "qwen2", hidden_size=256, intermediate_size=256)
    monkeypatch.setattr(ours_gguf, "_encode", encode)
    ours_gguf.export_gguf(run, tmp_path / "m.gguf", "f32")
    types = {t.tensor_type.name for t in gguf.GGUFReader(str(tmp_path / "m.gguf")).tensors}
    assert qtype in types
    theirs = _theirs(tmp_path / "m.gguf")
    ours_gguf.import_gguf(tmp_path / "m.gguf", tmp_path / "back", "float32")
    _, back, _ = load_model(tmp_path / "back")
    x = np.random.default_rng(3).integers(0, 263, (2, 16))
    expected = _logits(theirs, x)
    assert np.abs(expected - _ours(back, x)).max() < 1e-4 * max(1.0, np.abs(expected).max())


def test_what_gguf_cannot_carry_is_refused(tmp_path):
    CASES["gguf-scaled"] = CASES["llama-linear"]
    tok = byte_tokenizer()
    _hf_model("gguf-scaled", tok.eos_id).save_pretrained(tmp_path / "hf")
    tok.hf.save(str(tmp_path / "hf" / "tokenizer.json"))
    import_hf(tmp_path / "hf", tmp_path / "run")
    with pytest.raises(ConfigError, match="RoPE scaling 'linear' has no GGUF form"):
        ours_gguf.export_gguf(tmp_path / "run", tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()
    with pytest.raises(ConfigError, match="no such GGUF file"):
        ours_gguf.import_gguf(tmp_path / "missing.gguf", tmp_path / "out")
