"""Each model family against transformers: Llama 3 (RoPE scaling), Qwen2, Qwen3, Mistral, Gemma.

Tiny random models that transformers builds here (nothing downloaded): imported logits match
over a sequence longer than the sliding window and the scaling's original context, greedy
generation through our KV cache equals `generate(do_sample=False)`, the exported directory
loads in transformers with our logits, and a LoRA fine-tune's adapter loads in peft.

Run: pytest tests/test_hf_families.py
"""

import json

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from conftest import imported_finetune_config  # noqa: E402

from pipeline.config import ConfigError  # noqa: E402
from pipeline.inference.generate import generate  # noqa: E402
from pipeline.inference.runs import load_model  # noqa: E402
from pipeline.interop.hf import export_hf, import_hf  # noqa: E402
from pipeline.tokenizer import byte_tokenizer  # noqa: E402

pytestmark = pytest.mark.e2e  # parity against transformers: whole models, torch alongside

VOCAB = 263  # the byte tokenizer's
SIZES = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    initializer_range=0.2,  # peaked distributions: greedy choices are not near-ties
)
LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}
CASES = {
    "llama3": ("LlamaConfig", "LlamaForCausalLM", {"rope_parameters": LLAMA3}),
    "llama-linear": (
        "LlamaConfig",
        "LlamaForCausalLM",
        {"rope_parameters": {"rope_type": "linear", "factor": 4.0}},
    ),
    "llama-dynamic": (
        "LlamaConfig",
        "LlamaForCausalLM",
        {"rope_parameters": {"rope_type": "dynamic", "factor": 4.0}, "max_position_embeddings": 24},
    ),
    "llama-yarn": (
        "LlamaConfig",
        "LlamaForCausalLM",
        {
            "rope_parameters": {
                "rope_type": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": 16,
            }
        },
    ),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 8}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"head_dim": 16}),
}


def _hf_model(case: str, eos: int):
    config_class, model_class, extra = CASES[case]
    torch.manual_seed(0)
    config = getattr(transformers, config_class)(
        **{**SIZES, **extra}, bos_token_id=eos, eos_token_id=eos
    )
    model = getattr(transformers, model_class)(config).eval()
    with torch.no_grad():  # norms and biases away from their initial 1 / 0, so they count
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn_like(p) * 0.1 + (0.0 if case == "gemma" else 1.0))
            elif name.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.1)
    return model


def _save(case: str, path):
    tok = byte_tokenizer()
    model = _hf_model(case, tok.eos_id)
    model.save_pretrained(path)
    tok.hf.save(str(path / "tokenizer.json"))
    return model, tok


def _logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.numpy()


def _ours(model, tokens: np.ndarray) -> np.ndarray:
    """Our logits over the real vocabulary (an imported one is padded to a multiple of 128)."""
    logits = np.asarray(model(jnp.asarray(tokens))[0])
    return logits[..., : model.cfg.vocab_used or model.cfg.vocab_size]


@pytest.mark.parametrize("case", list(CASES))
def test_import_generate_and_export_match_transformers(tmp_path, case):
    hf, tok = _save(case, tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "run")
    cfg, model, _ = load_model(tmp_path / "run")
    assert cfg.model.family == ("llama" if case.startswith("llama") else case)
    # 48 positions: beyond the window (8), the scaled context (16) and dynamic's context (24)
    x = np.random.default_rng(0).integers(0, VOCAB, (2, 48))
    theirs = _logits(hf, x)
    assert np.abs(theirs - _ours(model, x)).max() < 1e-4
    prompt = [int(t) for t in x[0, :20]]
    hf.generation_config.eos_token_id = None  # all 32 tokens, whatever they are
    with torch.no_grad():
        expected = hf.generate(
            torch.tensor([prompt]), max_new_tokens=32, do_sample=False, pad_token_id=0
        )[0, len(prompt) :].tolist()
    assert len(expected) == 32
    assert generate(model, [prompt], 32).tokens[0] == expected

    export_hf(tmp_path / "run", tmp_path / "out")
    assert oct((tmp_path / "out" / "model.safetensors").stat().st_mode & 0o777) == "0o644"
    generation = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert generation["do_sample"] is True and generation["eos_token_id"] == tok.eos_id
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(back).__name__ == CASES[case][1]
    assert np.abs(_logits(back, x) - theirs).max() < 1e-4


@pytest.mark.parametrize("case", ["llama3", "qwen2", "qwen3", "mistral", "gemma"])
def test_a_lora_fine_tune_of_an_imported_model_loads_in_peft(tmp_path, case):
    peft = pytest.importorskip("peft")
    from pipeline.training.finetune import finetune

    _save(case, tmp_path / "hf")
    template = tmp_path / "template.jinja"  # the fine-tuning data are conversations
    template.write_text(TEMPLATES["qwen2"])
    import_hf(tmp_path / "hf", tmp_path / "run", chat_template=str(template))
    cfg = imported_finetune_config(
        tmp_path / "run",
        tmp_path,
        "finetune.max_examples=50",
        "optimizer.lr=0.05",  # two steps that visibly move the adapters
    )
    finetune(cfg)
    export_hf(tmp_path / "ft", tmp_path / "out")
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    adapted = peft.PeftModel.from_pretrained(base, tmp_path / "out" / "adapter").eval()
    _, ours, _ = load_model(tmp_path / "ft")
    _, plain, _ = load_model(tmp_path / "run")
    x = np.random.default_rng(1).integers(0, VOCAB, (2, 40))
    ours_logits = _ours(ours, x)
    assert np.abs(ours_logits - _ours(plain, x)).max() > 1e-5  # the adapter changes the output
    assert np.abs(_logits(adapted, x) - ours_logits).max() < 1e-4


def test_unsupported_options_are_one_line_naming_the_field(tmp_path):
    _save("qwen3", tmp_path / "hf")
    config_file = tmp_path / "hf" / "config.json"
    config = json.loads(config_file.read_text())
    for change, words in (
        ({"rope_parameters": {"rope_type": "longrope"}}, "rope_parameters.rope_type='longrope'"),
        ({"attention_bias": True}, "attention_bias=True"),
        ({"model_type": "gemma2"}, "model_type='gemma2'"),
        ({"hidden_act": "relu"}, "hidden_act='relu'"),
    ):
        config_file.write_text(json.dumps({**config, **change}))
        with pytest.raises(ConfigError, match=words):
            import_hf(tmp_path / "hf", tmp_path / "run")


def test_a_sharded_checkpoint_imports_tensor_by_tensor_in_bfloat16(tmp_path):
    import jax
    from flax import nnx

    tok = byte_tokenizer()
    hf = _hf_model("qwen3", tok.eos_id)
    hf.save_pretrained(tmp_path / "hf", max_shard_size="40KB")
    tok.hf.save(str(tmp_path / "hf" / "tokenizer.json"))
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "hf").glob("*.safetensors"))) > 1
    import_hf(tmp_path / "hf", tmp_path / "run", dtype="bfloat16")
    cfg, model, _ = load_model(tmp_path / "run")
    assert cfg.model.param_dtype == cfg.model.compute_dtype == "bfloat16"
    assert {x.dtype for x in jax.tree.leaves(nnx.state(model))} == {jnp.dtype("bfloat16")}
    x = np.random.default_rng(0).integers(0, VOCAB, (2, 48))
    theirs = _logits(hf, x)
    # bfloat16 keeps 8 bits of mantissa: close to float32, and the same next-token choices
    assert np.abs(theirs - _ours(model, x)).max() < 0.05 * np.abs(theirs).max()
    assert (theirs.argmax(-1) == _ours(model, x).argmax(-1)).mean() > 0.9


# Chat templates in each family's style (written here: nothing is downloaded), exercising what
# real ones use: a default system prompt, namespace(), loop controls, strftime_now, tojson,
# raise_exception, the special tokens as variables.
TEMPLATES = {
    "llama3": (
        "{{- bos_token }}{%- if not date_string is defined %}"
        "{%- set date_string = strftime_now('%d %b %Y') %}{%- endif %}"
        "{%- if messages[0]['role'] == 'system' %}{%- set system = messages[0]['content'] | trim %}"
        "{%- set messages = messages[1:] %}{%- else %}{%- set system = '' %}{%- endif %}"
        "{{- '<|start_header_id|>system<|end_header_id|>\\n\\nToday Date: ' + date_string + "
        "'\\n\\n' + system + '<|eot_id|>' }}"
        "{%- for message in messages %}{{- '<|start_header_id|>' + message['role'] + "
        "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{%- endfor %}"
        "{%- if add_generation_prompt %}"
        "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
    ),
    "qwen2": (
        "{%- if messages[0]['role'] == 'system' %}"
        "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
        "{%- else %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
        "{%- endif %}{%- for message in messages %}"
        "{%- if not (message.role == 'system' and loop.first) %}"
        "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
        "{%- endif %}{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
    ),
    "qwen3": (
        "{%- set ns = namespace(last_user=0) %}{%- for message in messages %}"
        "{%- if message.role == 'user' %}{%- set ns.last_user = loop.index0 %}{%- endif %}"
        "{%- endfor %}{%- for message in messages %}"
        "{%- if message.role == 'assistant' and loop.index0 < ns.last_user %}"
        "{{- '<|im_start|>assistant\\n' + message.content + '<|im_end|>\\n' }}{%- continue %}"
        "{%- endif %}{{- '<|im_start|>' + message.role + '\\n' + message.content "
        "+ '<|im_end|>\\n' }}{%- endfor %}{{- {'meta': 'é'} | tojson }}"
        "{%- if add_generation_prompt %}"
        "{{- '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    ),
    "mistral": (
        "{%- if messages[0]['role'] == 'system' %}{%- set system = messages[0]['content'] %}"
        "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}"
        "{%- endif %}{{- bos_token }}{%- for message in loop_messages %}"
        "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{- raise_exception('roles must alternate user/assistant') }}{%- endif %}"
        "{%- if message['role'] == 'user' %}{%- if loop.last and system is defined %}"
        "{{- '[INST] ' + system + '\\n\\n' + message['content'] + '[/INST]' }}{%- else %}"
        "{{- '[INST] ' + message['content'] + '[/INST]' }}{%- endif %}"
        "{%- else %}{{- ' ' + message['content'] + eos_token }}{%- endif %}{%- endfor %}"
    ),
    "gemma": (
        "{{ bos_token }}{%- if messages[0]['role'] == 'system' %}"
        "{%- set first = messages[0]['content'] + '\\n\\n' %}"
        "{%- set loop_messages = messages[1:] %}"
        "{%- else %}{%- set first = '' %}{%- set loop_messages = messages %}{%- endif %}"
        "{%- for message in loop_messages %}{%- set role = 'model' if message['role'] == "
        "'assistant' else message['role'] %}{{ '<start_of_turn>' + role + '\\n' + "
        "(first if loop.first else '') + message['content'] | trim + '<end_of_turn>\\n' }}"
        "{%- endfor %}{%- if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{%- endif %}"
    ),
}
CONVERSATION = [
    {"role": "system", "content": "You answer in one line."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3 + 3, ünïcode?"},
]


@pytest.mark.parametrize("family", list(TEMPLATES))
def test_chat_templates_render_as_transformers_renders_them(tmp_path, family):
    from pipeline.tokenizer import prompt_ids

    _save(family, tmp_path / "hf")
    special = {"bos_token": "<|bos|>", "eos_token": "<|eos|>", "unk_token": "<|pad|>"}
    (tmp_path / "hf" / "tokenizer_config.json").write_text(
        json.dumps({**special, "chat_template": TEMPLATES[family]})
    )
    import_hf(tmp_path / "hf", tmp_path / "run")
    _, _, ours = load_model(tmp_path / "run")
    theirs = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(tmp_path / "hf" / "tokenizer.json"),
        chat_template=TEMPLATES[family],
        **special,
    )
    expected = theirs.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=False)
    ids = theirs(expected, add_special_tokens=False)["input_ids"]
    assert prompt_ids(ours, CONVERSATION) == ids
    if family == "mistral":  # a conversation the template refuses is one clear error
        with pytest.raises(ValueError, match="roles must alternate"):
            prompt_ids(ours, [CONVERSATION[1], CONVERSATION[1]])


@pytest.mark.parametrize("family", ["qwen2", "llama3", "gemma"])
def test_fine_tuning_data_follows_the_models_template_and_trains_assistant_turns(tmp_path, family):
    from pipeline.tokenizer import render
    from pipeline.training.instruct import build_examples

    _save(family, tmp_path / "hf")
    special = {"bos_token": "<|bos|>", "eos_token": "<|eos|>"}
    (tmp_path / "hf" / "tokenizer_config.json").write_text(
        json.dumps({**special, "chat_template": TEMPLATES[family]})
    )
    import_hf(tmp_path / "hf", tmp_path / "run")
    _, _, tokenizer = load_model(tmp_path / "run")
    conversation = [*CONVERSATION, {"role": "assistant", "content": "6"}]
    ids, trained = render(tokenizer, conversation)
    theirs = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(tmp_path / "hf" / "tokenizer.json"), **special
    )
    text = theirs.apply_chat_template(conversation, chat_template=TEMPLATES[family], tokenize=False)
    assert ids == theirs(text, add_special_tokens=False)["input_ids"]  # the template's layout
    # trained: exactly the two assistant turns, each with what the template closes it with
    runs, current = [], []
    for token, flag in zip(ids, trained, strict=True):
        if flag:
            current.append(token)
        elif current:
            runs, current = [*runs, current], []
    runs = [tokenizer.decode(r, skip_special=False) for r in [*runs, current] if r]
    assert len(runs) == 2 and runs[0].startswith("4") and runs[1].startswith("6"), runs
    assert "user" not in "".join(runs) and "2 + 2" not in "".join(runs)
    examples = build_examples(tokenizer, [{"messages": conversation}], seq_len=len(ids))
    assert examples.mask.sum() == sum(trained[1:])
