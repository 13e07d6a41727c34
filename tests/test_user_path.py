"""A user's whole path with a checkpoint as people have it, on a tiny model the test builds.

transformers saves a Llama with its template in `chat_template.jinja` and two end ids in
`generation_config.json` -> `import-hf` (and the same model through a GGUF file) -> a chat turn
equal to transformers' -> a LoRA fine-tune on a JSONL of conversations -> `pipeline serve` with
the base and the adapter -> `export-hf` and `export-gguf` -> transformers (and peft) load both
and give our logits. Every step through the CLI a user types.

Run: pytest -m slow tests/test_user_path.py
"""

import json

import httpx
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytest.importorskip("gguf")

from conftest import imported_finetune_config  # noqa: E402
from helpers import serve_process  # noqa: E402
from test_chat_templates import _ids, _save  # noqa: E402
from test_hf_families import _logits, _ours  # noqa: E402

from pipeline.cli import main  # noqa: E402
from pipeline.inference.generate import generate  # noqa: E402
from pipeline.inference.runs import load_model  # noqa: E402
from pipeline.tokenizer import prompt_ids  # noqa: E402
from pipeline.training.finetune import finetune  # noqa: E402

QUESTION = "2 + 2, é?"


def _cli(capsys, *args: str):
    assert main(list(args)) == 0, capsys.readouterr().err
    return capsys.readouterr().out


def _chat_tokens(hf_model, theirs, messages, n: int) -> list[int]:
    """transformers' greedy answer: apply_chat_template + generate, ending at its end ids."""
    ids = _ids(theirs.apply_chat_template(messages, add_generation_prompt=True))
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)
    return out[0, len(ids) :].tolist()


def _imports(tmp_path, capsys):
    """The checkpoint as transformers saved it, imported directly and through GGUF."""
    hf_model, theirs = _save(tmp_path / "hf")
    assert (tmp_path / "hf" / "chat_template.jinja").is_file()
    base, from_gguf = tmp_path / "base", tmp_path / "from-gguf"
    _cli(capsys, "import-hf", str(tmp_path / "hf"), "--out", str(base))
    _cli(capsys, "export-gguf", str(base), "--out", str(tmp_path / "in.gguf"), "--dtype", "f32")
    _cli(capsys, "import-hf", str(tmp_path / "in.gguf"), "--out", str(from_gguf))
    x = np.random.default_rng(0).integers(0, hf_model.config.vocab_size, (2, 24))
    messages = [{"role": "user", "content": QUESTION}]
    want = _ids(theirs.apply_chat_template(messages, add_generation_prompt=True))
    for run in (base, from_gguf):
        _, model, tokenizer = load_model(run)
        assert np.abs(_ours(model, x) - _logits(hf_model, x)).max() < 1e-4, run
        assert prompt_ids(tokenizer, messages) == want, run
    return hf_model, theirs, base


def _conversations(path, n: int = 48):
    rng = np.random.default_rng(0)
    with path.open("w") as f:
        for _ in range(n):
            a, b = (int(v) for v in rng.integers(0, 10, 2))
            turns = [
                {"role": "user", "content": f"{a} + {b}?"},
                {"role": "assistant", "content": f"{a + b}."},
            ]
            f.write(json.dumps({"messages": turns}) + "\n")


def _served_chats(base, tuned, tmp_path) -> dict[str, str]:
    """The base's and the adapter's greedy answers through a real `pipeline serve`."""
    proc, url = serve_process(str(base), tmp_path / "cache", "--adapter", f"tuned={tuned}")
    try:
        names = [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]]
        assert "tuned" in names and len(names) == 2
        answers = {}
        for name in names:
            body = {
                "model": name,
                "messages": [{"role": "user", "content": QUESTION}],
                "max_tokens": 12,
                "temperature": 0,
            }
            reply = httpx.post(url + "/v1/chat/completions", json=body, timeout=120)
            assert reply.status_code == 200, reply.text
            answers["tuned" if name == "tuned" else "base"] = reply.json()["choices"][0]
    finally:
        proc.terminate()
        proc.wait(30)
    return answers


def _expected_chat(run, n: int) -> str:
    _, model, tokenizer = load_model(run)
    ids = prompt_ids(tokenizer, [{"role": "user", "content": QUESTION}])
    stops = [*tokenizer.stop_ids, tokenizer.end_id]
    tokens = generate(model, [ids], n, eos_id=stops).tokens[0]
    if tokens and tokens[-1] in stops:
        tokens = tokens[:-1]
    return tokenizer.decode(tokens)


@pytest.mark.slow
@pytest.mark.e2e
def test_import_chat_finetune_serve_and_export_as_a_user_does(tmp_path, capsys):
    hf_model, theirs, base = _imports(tmp_path, capsys)

    # a chat turn: transformers' greedy answer, ending at generation_config's end ids
    messages = [{"role": "user", "content": QUESTION}]
    chat = ["generate", "--run", str(base), "--chat", "--prompt", QUESTION, "--json"]
    out = json.loads(_cli(capsys, *chat, "--max-new-tokens", "16"))
    assert out["tokens"] == _chat_tokens(hf_model, theirs, messages, 16)

    # LoRA on a JSONL of conversations, rendered with the model's own template
    data = tmp_path / "chats.jsonl"
    _conversations(data)
    overrides = (f"finetune.data={data}", "train.steps=12", "optimizer.lr=1e-2")
    cfg = imported_finetune_config(base, tmp_path, *overrides, "train.checkpoint_every=12")
    assert finetune(cfg).status == "finished"
    tuned = tmp_path / "ft"

    # the base and the adapter served side by side, each answering as it does alone
    answers = _served_chats(base, tuned, tmp_path)
    assert answers["base"]["message"]["content"] == _expected_chat(base, 12)
    assert answers["tuned"]["message"]["content"] == _expected_chat(tuned, 12)
    assert answers["base"]["message"]["content"] != answers["tuned"]["message"]["content"]

    # exported both ways: transformers + peft, and transformers' GGUF loader, give our logits
    _, ours_tuned, _ = load_model(tuned)
    x = np.random.default_rng(1).integers(0, hf_model.config.vocab_size, (2, 24))
    ours = _ours(ours_tuned, x)
    _cli(capsys, "export-hf", str(tuned), "--out", str(tmp_path / "hf-out"))
    hf_base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf-out").eval()
    adapted = peft.PeftModel.from_pretrained(hf_base, tmp_path / "hf-out" / "adapter").eval()
    assert np.abs(_logits(adapted, x) - ours).max() < 1e-4
    _cli(capsys, "export-gguf", str(tuned), "--out", str(tmp_path / "out.gguf"), "--dtype", "f32")
    from_file = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file="out.gguf"
    ).eval()
    assert np.abs(_logits(from_file, x) - ours).max() < 1e-4
    assert (tmp_path / "hf-out" / "chat_template.jinja").read_text() == (
        tmp_path / "hf" / "chat_template.jinja"
    ).read_text()
