"""Chat templates and end ids as transformers saves them, against transformers.

A tiny Llama and its tokenizer saved by transformers' own `save_pretrained` (which writes the
template to `chat_template.jinja`, the named ones to `additional_chat_templates/`), the older
layouts (`chat_template.json`, a list in `tokenizer_config.json`), `generation_config.json`'s
list of end ids, and a model with no template at all: refused with one clear error unless the
user gives one.

Run: pytest tests/test_chat_templates.py
"""

import json

import httpx
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from helpers import Server, openai_client  # noqa: E402
from test_hf_families import SIZES  # noqa: E402

from pipeline.cli import main  # noqa: E402
from pipeline.inference.generate import generate  # noqa: E402
from pipeline.inference.runs import load_model  # noqa: E402
from pipeline.interop.hf import export_hf, import_hf  # noqa: E402
from pipeline.tokenizer import BOS, EOS, byte_tokenizer, prompt_ids, render  # noqa: E402

EOT = "<|eot_id|>"  # an end of turn apart from the end of text, as Llama 3 has
TEMPLATE = (
    "{{- bos_token }}{%- for m in messages %}"
    "{{- '<|start|>' + m['role'] + '\\n' + m['content'] + '<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start|>assistant\\n' }}{%- endif %}"
)
TOOL_TEMPLATE = (
    "{{- bos_token }}{%- if tools %}{{- 'tools: ' + (tools | tojson) + '\\n' }}{%- endif %}"
    + TEMPLATE.removeprefix("{{- bos_token }}")
)
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 2, é?"}]


def _hf_tokenizer():
    hf = byte_tokenizer().hf
    hf.add_special_tokens([EOT])
    return hf


def _save(path, template=TEMPLATE, ends=None):
    """A tiny Llama, its tokenizer (the template saved by transformers) and its end ids."""
    hf = _hf_tokenizer()
    vocab = hf.get_vocab_size(with_added_tokens=True)
    eos, eot = hf.token_to_id(EOS), hf.token_to_id(EOT)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        **{**SIZES, "vocab_size": vocab}, bos_token_id=hf.token_to_id(BOS), eos_token_id=eos
    )
    model = transformers.LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = ends or [eos, eot]
    model.save_pretrained(path)
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=hf, bos_token=BOS, eos_token=EOS, chat_template=template
    )
    tokenizer.save_pretrained(path)
    return model, tokenizer


def _ids(encoded) -> list[int]:
    """apply_chat_template's ids (transformers 5 returns a BatchEncoding by default)."""
    return list(encoded if isinstance(encoded, list) else encoded["input_ids"])


def test_the_template_transformers_saves_in_its_own_file_is_the_one_a_chat_renders_with(tmp_path):
    _, theirs = _save(tmp_path / "hf")
    saved = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    assert (tmp_path / "hf" / "chat_template.jinja").is_file() and "chat_template" not in saved
    import_hf(tmp_path / "hf", tmp_path / "run")
    _, _, ours = load_model(tmp_path / "run")
    assert ours.chat_template() == TEMPLATE
    expected = _ids(theirs.apply_chat_template(MESSAGES, add_generation_prompt=True))
    assert prompt_ids(ours, MESSAGES) == expected
    # the end of turn of generation_config.json stops generation beside the end of text
    assert ours.stop_ids == {ours.eos_id, ours.hf.token_to_id(EOT)}
    # export-hf writes the template and the end ids back where transformers reads them
    export_hf(tmp_path / "run", tmp_path / "out")
    back = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert back.chat_template == TEMPLATE
    ends = json.loads((tmp_path / "out" / "generation_config.json").read_text())["eos_token_id"]
    assert sorted(ends) == sorted(ours.stop_ids)


@pytest.mark.parametrize("layout", ["named-files", "config-list", "json"])
def test_named_and_older_template_layouts(tmp_path, layout):
    src = tmp_path / "hf"
    if layout == "named-files":  # transformers writes default + additional_chat_templates/
        _save(src, template={"default": TEMPLATE, "tool_use": TOOL_TEMPLATE})
        assert (src / "additional_chat_templates" / "tool_use.jinja").is_file()
    else:
        _save(src, template=None)
        assert not (src / "chat_template.jinja").exists()
        config = json.loads((src / "tokenizer_config.json").read_text())
        if layout == "config-list":
            config["chat_template"] = [
                {"name": "default", "template": TEMPLATE},
                {"name": "tool_use", "template": TOOL_TEMPLATE},
            ]
        else:
            (src / "chat_template.json").write_text(json.dumps({"chat_template": TEMPLATE}))
        (src / "tokenizer_config.json").write_text(json.dumps(config))
    theirs = transformers.AutoTokenizer.from_pretrained(src)
    import_hf(src, tmp_path / "run")
    _, _, ours = load_model(tmp_path / "run")
    tools = [{"type": "function", "function": {"name": "add", "parameters": {}}}]
    # (transformers reads chat_template.json for processors only: given here by hand)
    given = {"chat_template": TEMPLATE} if layout == "json" else {}
    for offered in (None, tools) if layout != "json" else (None,):
        want = theirs.apply_chat_template(
            MESSAGES, tools=offered, add_generation_prompt=True, tokenize=False, **given
        )
        assert ours.decode(prompt_ids(ours, MESSAGES, offered), skip_special=False) == want
    export_hf(tmp_path / "run", tmp_path / "out")
    back = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    if layout == "json":
        assert back.chat_template == TEMPLATE
    else:
        assert back.chat_template == {"default": TEMPLATE, "tool_use": TOOL_TEMPLATE}


def test_a_model_without_a_template_refuses_a_chat_unless_given_one(tmp_path, capsys):
    _save(tmp_path / "hf", template=None)
    import_hf(tmp_path / "hf", tmp_path / "run")
    _, _, ours = load_model(tmp_path / "run")
    with pytest.raises(ValueError, match="no chat template"):
        prompt_ids(ours, MESSAGES)
    with pytest.raises(ValueError, match="no chat template"):  # chat fine-tuning data too
        render(ours, [*MESSAGES, {"role": "assistant", "content": "4"}])
    run = str(tmp_path / "run")
    capsys.readouterr()  # (what saving the model printed)
    assert main(["generate", "--run", run, "--chat", "--prompt", "hi", "--max-new-tokens", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "--chat-template" in err[0], err
    template = tmp_path / "template.jinja"
    template.write_text(TEMPLATE)
    argv = ["generate", "--run", run, "--chat", "--prompt", "hi", "--max-new-tokens", "2"]
    assert main([*argv, "--chat-template", str(template), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    asked = "<|bos|><|start|>user\nhi<|eot_id|><|start|>assistant\n"
    assert out["prompt_tokens"] == len(ours.encode(asked))
    # kept in the run at import: every stage then renders with it
    import_hf(tmp_path / "hf", tmp_path / "kept", chat_template=str(template))
    _, _, kept = load_model(tmp_path / "kept")
    assert kept.chat_template() == TEMPLATE
    # our own models keep their role markers
    assert byte_tokenizer().chat_template() is None


def test_generation_ends_at_any_of_the_end_ids(tmp_path):
    _save(tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "run")
    _, model, tokenizer = load_model(tmp_path / "run")
    prompt = prompt_ids(tokenizer, MESSAGES)
    free = generate(model, [prompt], 12).tokens[0]
    stop = free[4]
    k = free.index(stop)
    for eos in ((stop, tokenizer.eos_id), (tokenizer.eos_id, stop)):
        assert generate(model, [prompt], 12, eos_id=eos).tokens[0] == free[: k + 1]


@pytest.mark.e2e  # a loaded engine behind a real server
def test_a_chat_turn_through_the_server_equals_transformers(tmp_path):
    """Greedy, token for token, ending where transformers' generation config ends it."""
    hf_model, theirs = _save(tmp_path / "probe")
    ids = _ids(theirs.apply_chat_template(MESSAGES, add_generation_prompt=True))
    with torch.no_grad():
        free = hf_model.generate(
            torch.tensor([ids]), max_new_tokens=16, do_sample=False, eos_token_id=[], pad_token_id=0
        )[0, len(ids) :].tolist()
    stop = free[5]  # an end id the answer reaches: generation_config's second
    eos = theirs.convert_tokens_to_ids(EOS)
    hf_model, theirs = _save(tmp_path / "hf", ends=[eos, stop])
    with torch.no_grad():
        want = hf_model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)
    want = want[0, len(ids) :].tolist()
    assert want[-1] == stop and len(want) <= 6
    import_hf(tmp_path / "hf", tmp_path / "run")
    _, model, tokenizer = load_model(tmp_path / "run")
    server = Server(model=model, tokenizer=tokenizer, slots=2)
    try:
        reply = openai_client(server).chat.completions.create(
            model="tiny", messages=MESSAGES, max_tokens=16, temperature=0
        )
    finally:
        server.close()
    choice = reply.choices[0]
    assert choice.finish_reason == "stop"
    assert choice.message.content == tokenizer.decode(want[:-1])
    assert reply.usage.prompt_tokens == len(ids)


@pytest.mark.e2e  # a loaded engine behind a real server
def test_the_server_refuses_a_chat_without_a_template_and_takes_one_from_its_config(tmp_path):
    _save(tmp_path / "hf", template=None)
    import_hf(tmp_path / "hf", tmp_path / "run")
    _, model, tokenizer = load_model(tmp_path / "run")
    template = tmp_path / "template.jinja"
    template.write_text(TEMPLATE)
    server = Server(model=model, tokenizer=tokenizer, slots=2)
    try:
        body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 2}
        r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=30)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert "no chat template" in error["message"] and error["param"] == "messages"
        completion = httpx.post(  # a plain completion still works
            server.url + "/v1/completions", json={"model": "tiny", "prompt": "ab", "max_tokens": 2}
        )
        assert completion.status_code == 200
    finally:
        server.close()
    tokenizer.template_override = None
    server = Server(model=model, tokenizer=tokenizer, slots=2, chat_template=str(template))
    try:
        r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=30)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["prompt_tokens"] == len(prompt_ids(tokenizer, MESSAGES))
    finally:
        server.close()
