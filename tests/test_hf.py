"""Hugging Face interop against `transformers` and `peft` (tiny random models built here).

Run: pytest tests/test_hf.py
"""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from conftest import ROOT, imported_finetune_config, make_tiny_runs  # noqa: E402

from pipeline.config import ConfigError  # noqa: E402
from pipeline.inference.generate import generate  # noqa: E402
from pipeline.inference.runs import load_model  # noqa: E402
from pipeline.interop.hf import export_hf, import_hf  # noqa: E402
from pipeline.tokenizer import byte_tokenizer, prompt_ids  # noqa: E402

pytestmark = pytest.mark.e2e  # whole stages, subprocesses or real servers


def _hf_model(kind: str, eos: int, context: int = 64):
    torch.manual_seed(0)
    if kind == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=263,
            n_positions=64,
            n_embd=32,
            n_layer=2,
            n_head=4,
            bos_token_id=eos,
            eos_token_id=eos,
        )
        return transformers.GPT2LMHeadModel(config).eval()
    config = transformers.LlamaConfig(
        vocab_size=263,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=context,
        bos_token_id=eos,
        eos_token_id=eos,
        rope_theta=500.0,
    )
    return transformers.LlamaForCausalLM(config).eval()


def _logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.numpy()


def _ours(model, tokens: np.ndarray) -> np.ndarray:
    """Our logits over the real vocabulary (an imported one is padded to a multiple of 128)."""
    logits = np.asarray(model(jnp.asarray(tokens))[0])
    return logits[..., : model.cfg.vocab_used or model.cfg.vocab_size]


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_import_matches_transformers_logits_and_greedy_generation(tmp_path, kind):
    tok = byte_tokenizer()
    hf = _hf_model(kind, tok.eos_id)
    hf.save_pretrained(tmp_path / "hf")
    tok.hf.save(str(tmp_path / "hf" / "tokenizer.json"))
    template = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}[assistant] "
    (tmp_path / "hf" / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": "<|eos|>", "chat_template": template})
    )
    import_hf(tmp_path / "hf", tmp_path / "run")
    cfg, model, tokenizer = load_model(tmp_path / "run")
    assert tokenizer.vocab_size == tok.vocab_size and tokenizer.eos_id == tok.eos_id
    # the imported tokenizer's own chat template renders chat prompts
    messages = [{"role": "user", "content": "hi"}]
    assert prompt_ids(tokenizer, messages) == tok.encode("[user] hi\n[assistant] ")
    # 263 rows padded to 384, a multiple of 128; the padding's logits are never the answer
    assert (cfg.model.vocab_size, cfg.model.vocab_used) == (384, 263)
    x = np.random.default_rng(0).integers(0, 263, (2, 24))
    assert np.abs(_logits(hf, x) - _ours(model, x)).max() < 1e-4
    padding = np.asarray(model(jnp.asarray(x))[0])[..., 263:]
    assert (padding == np.finfo(np.float32).min).all()
    prompt = [5, 17, 99, 3]
    with torch.no_grad():
        theirs = hf.generate(
            torch.tensor([prompt]), max_new_tokens=12, do_sample=False, pad_token_id=tok.eos_id
        )[0, len(prompt) :].tolist()
    ours = generate(model, [prompt], 12, eos_id=tok.eos_id).tokens[0]
    assert ours == theirs
    # exported again: transformers' tensors as they were, the padding rows gone
    export_hf(tmp_path / "run", tmp_path / "again")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "again").state_dict()
    for name, tensor in hf.state_dict().items():
        if name in back:
            np.testing.assert_array_equal(back[name].numpy(), tensor.numpy(), err_msg=name)
    assert json.loads((tmp_path / "again" / "config.json").read_text())["vocab_size"] == 263


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_export_loads_in_transformers_and_the_adapter_in_peft(tmp_path, family):
    peft = pytest.importorskip("peft")
    base, lora = make_tiny_runs(tmp_path, (f"model.family={family}",))
    x = np.random.default_rng(1).integers(0, 263, (2, 20))
    export_hf(base, tmp_path / "hf-base")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf-base").eval()
    _, ours, _ = load_model(base)
    assert np.abs(_logits(hf, x) - _ours(ours, x)).max() < 1e-4

    export_hf(lora, tmp_path / "hf-lora")
    adapter_dir = tmp_path / "hf-lora" / "adapter"
    adapter_config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert all("blocks" not in m for m in adapter_config["target_modules"])
    base_hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf-lora").eval()
    assert np.abs(_logits(base_hf, x) - _ours(ours, x)).max() < 1e-4  # the base alone
    adapted = peft.PeftModel.from_pretrained(base_hf, adapter_dir).eval()
    _, ours_lora, _ = load_model(lora)
    ours_logits = _ours(ours_lora, x)
    assert np.abs(ours_logits - _ours(ours, x)).max() > 1e-6  # the adapter changes the output
    assert np.abs(_logits(adapted, x) - ours_logits).max() < 1e-4


def test_a_hub_id_downloads_and_an_unreachable_hub_is_one_error_line(tmp_path, monkeypatch, capsys):
    """ORG/NAME where no such path exists goes to the Hub (here an address nothing listens
    on: one error line naming the local form, nothing written); where the path exists, it is
    read locally and nothing is downloaded."""
    from helpers import free_port

    from pipeline.cli import main

    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")
    monkeypatch.chdir(tmp_path)
    assert main(["import-hf", "some-org/some-model", "--out", "run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: some-org/some-model: not a local"), err
    assert "import-hf path/to/model" in err[0] and not (tmp_path / "run").exists()
    tok = byte_tokenizer()
    _hf_model("llama", tok.eos_id).save_pretrained(tmp_path / "some-org" / "some-model")
    tok.hf.save(str(tmp_path / "some-org" / "some-model" / "tokenizer.json"))
    assert main(["import-hf", "some-org/some-model", "--out", "run"]) == 0
    assert (tmp_path / "run" / "config.yaml").is_file()


def test_bad_checkpoints_and_unsupported_options_are_clear_errors(tmp_path):
    tok = byte_tokenizer()
    _hf_model("llama", tok.eos_id).save_pretrained(tmp_path / "hf")
    tok.hf.save(str(tmp_path / "hf" / "tokenizer.json"))
    weights = tmp_path / "hf" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ConfigError, match="model.safetensors: not a readable safetensors"):
        import_hf(tmp_path / "hf", tmp_path / "run")
    weights.write_bytes(data)
    config_file = tmp_path / "hf" / "config.json"
    config = json.loads(config_file.read_text())
    config["rope_scaling"] = {"rope_type": "longrope", "factor": 4.0}
    config_file.write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="rope_type='longrope' is not supported"):
        import_hf(tmp_path / "hf", tmp_path / "run")
    config_file.write_text(json.dumps({**config, "model_type": "gemma2"}))
    with pytest.raises(ConfigError, match="model_type='gemma2' is not supported"):
        import_hf(tmp_path / "hf", tmp_path / "run")


def test_an_imported_run_generates_and_fine_tunes_like_any_other(tmp_path, capsys):

    from pipeline.cli import main
    from pipeline.training.finetune import finetune

    tok = byte_tokenizer()
    _hf_model("llama", tok.eos_id, context=256).save_pretrained(tmp_path / "hf")
    tok.hf.save(str(tmp_path / "hf" / "tokenizer.json"))
    assert main(["import-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "run")]) == 0
    capsys.readouterr()
    args = ["generate", "--run", str(tmp_path / "run"), "--prompt", "def", "--max-new-tokens", "8"]
    assert main([*args, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"]
    # the fine-tuning data are conversations: a model without a chat template refuses them
    with pytest.raises(ConfigError, match="no chat template"):
        finetune(imported_finetune_config(tmp_path / "run", tmp_path))
    template = tmp_path / "template.jinja"
    template.write_text("{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}")
    imported = ["import-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "run")]
    assert main([*imported, "--chat-template", str(template)]) == 0
    cfg = imported_finetune_config(tmp_path / "run", tmp_path)
    result = finetune(cfg)
    assert result.status == "finished" and (tmp_path / "ft" / "adapter_config.json").is_file()


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_the_torch_peer_builds_our_architecture_and_trains(family):
    """The PyTorch benchmark peer: transformers' model of our config counts the FLOPs ours
    counts (so MFU compares like with like) and trains: a finite loss near ln(V) on random
    tokens, and the fields the GPU check and the README read."""
    import math

    from pipeline.bench.torch_peer import build_model, matmul_flops_per_token, run
    from pipeline.config import load_config
    from pipeline.model import count_params, flops_per_token

    overrides = [f"model.family={family}", "train.batch_size=2"]
    cfg = load_config(os.path.join(ROOT, "configs", "tiny.yaml"), overrides)
    model = build_model(cfg.model)
    assert sum(p.numel() for p in model.parameters()) == count_params(cfg.model)
    flops = flops_per_token(cfg.model, cfg.data.seq_len)
    assert matmul_flops_per_token(model, cfg.model, cfg.data.seq_len) == flops
    result = run(cfg, steps=2, warmup=1, compile_model=False)
    assert result["flops_per_token"] == flops
    assert result["tokens_per_sec"] > 0 and result["step_time_s"] > 0
    assert abs(result["loss"] - math.log(cfg.model.vocab_size)) < 1.0


@pytest.mark.e2e
def test_bench_train_against_the_torch_peer_alternates_and_gives_the_ratios(monkeypatch):
    """`bench train --peer torch`: ours and the peer (eager, and torch.compile'd) alternate,
    each in its own process, on the same batch shape; the last row's ratios are against the
    faster peer, named (one round here: the alternation is the same loop)."""
    from pipeline.bench import peer as peer_module
    from pipeline.bench import run_bench

    monkeypatch.setattr(peer_module, "ROUNDS", 1)
    config = os.path.join(ROOT, "configs", "tiny.yaml")
    rows = run_bench("train", config, ["train.batch_size=4"], None, 1, True, peer="torch")
    cases = [r["case"] for r in rows]
    assert cases[1:] == [
        "train/tiny",
        "train/tiny/torch",
        "train/tiny/torch-compiled",
        "train/tiny/vs-torch",
    ]
    ours, eager, compiled, result = rows[1:]
    assert not eager["compiled"] and compiled["compiled"]
    assert all(r["batch"] == 4 and r["seq_len"] == ours["seq_len"] for r in (eager, compiled))
    best = max((eager, compiled), key=lambda r: r["tokens_per_sec"])
    assert result["peer_config"] == best["peer_config"] and "fused AdamW" in best["peer_config"]
    for field in ("tokens_per_sec", "peak_rss_bytes", "mfu"):
        assert result[f"{field}_ratio"] == pytest.approx(ours[field] / best[field])
    assert set(result["peer_configs"]) == {eager["peer_config"], compiled["peer_config"]}
    assert all(r["peak_rss_bytes"] > 10 * 2**20 for r in (ours, eager, compiled))
    # the training state per device: float32 weights and AdamW's two moments (+ step and key)
    assert 12 * ours["params"] <= ours["state_bytes"] < 12 * ours["params"] + 1024
    assert ours["temp_bytes"] > 0


@pytest.mark.e2e
def test_bench_generate_against_the_torch_peer_gives_both_and_the_ratios(monkeypatch):
    """`bench generate --peer torch`: our generate and transformers' (eager with its dynamic
    cache; static cache + torch.compile) on the same prompt shape, alternated; the last row's
    ratios are against the faster, named; the time to first token timed alike."""
    from pipeline.bench import peer as peer_module
    from pipeline.bench import run_bench

    monkeypatch.setattr(peer_module, "ROUNDS", 1)
    config = os.path.join(ROOT, "configs", "tiny.yaml")
    rows = run_bench("generate", config, [], ["b1"], 1, True, peer="torch")
    want = ["generate/tiny/b1", "generate/tiny/b1/torch", "generate/tiny/b1/torch-compiled"]
    assert [r["case"] for r in rows[1:]] == [*want, "generate/tiny/b1/vs-torch"]
    ours, eager, compiled, result = rows[1:]
    assert {(r["batch"], r["prompt_len"], r["new_tokens"]) for r in rows[1:4]} == {(1, 64, 128)}
    assert "static cache + torch.compile" in compiled["peer_config"]
    best = max((eager, compiled), key=lambda r: r["tokens_per_sec"])
    assert result["peer_config"] == best["peer_config"]
    for field in ("tokens_per_sec", "decode_tokens_per_sec", "ttft_ms"):
        assert result[f"{field}_ratio"] == pytest.approx(ours[field] / best[field])
    # ours: a whole one-token call and its prefill program, timed in separate calls (two
    # clocks on a shared machine: their order is not asserted, a bench is no timed test)
    assert ours["ttft_ms"] > 0 and ours["prefill_ms"] > 0
