"""lm-evaluation-harness against our server on the offline stdlib tasks: lm-eval's numbers
equal a direct computation with the model. Run: pytest tests/test_eval.py"""

import shutil

import jax
import numpy as np
import pytest
from conftest import full_logits

pytest.importorskip("lm_eval")

from pipeline.config import ServeConfig  # noqa: E402
from pipeline.evaluation import build_examples  # noqa: E402
from pipeline.inference.runs import load_for_inference  # noqa: E402

pytestmark = pytest.mark.e2e


def test_lm_eval_through_the_server_equals_a_direct_computation(tiny_run, tmp_path):
    from pipeline.evaluation import run_eval

    run = str(tmp_path / "run")
    shutil.copytree(tiny_run, run)  # the shared run stays read-only
    few_slots = ServeConfig(slots=2)  # fewer programs to compile at start-up
    scores, samples = run_eval(run, limit=6, examples=12, cfg=few_slots, samples=True)

    loaded = load_for_inference(run, "none", None)
    model, tokenizer = loaded.model, loaded.tokenizer
    examples = build_examples(12)

    docs = examples["stdlib_next_line"][:6]
    pairs = [(d["context"], c) for d in docs for c in d["choices"]]
    wholes = [tokenizer.encode(ctx + c) for ctx, c in pairs]
    logprobs = []
    for (ctx, _), whole, logits in zip(pairs, wholes, full_logits(model, wholes), strict=True):
        lp = np.asarray(jax.nn.log_softmax(logits), np.float64)
        logprobs.append(
            sum(lp[i - 1, whole[i]] for i in range(len(tokenizer.encode(ctx)), len(whole)))
        )
    direct = [logprobs[4 * i : 4 * i + 4] for i in range(len(docs))]
    by_doc = {s["doc_id"]: s for s in samples["stdlib_next_line"]}
    for i, row in enumerate(direct):
        served = [r[0][0] for r in by_doc[i]["resps"]]  # lm-eval's (loglikelihood, is_greedy)
        np.testing.assert_allclose(served, row, atol=1e-3)
    accuracy = np.mean(
        [int(np.argmax(row)) == d["gold"] for row, d in zip(direct, docs, strict=True)]
    )
    assert scores["stdlib_next_line"]["acc"] == pytest.approx(accuracy)

    from pipeline.inference.generate import generate
    from pipeline.inference.sampling import Sampling

    matches = []
    for i, d in enumerate(examples["stdlib_docstring"][:6]):
        ids = generate(model, [tokenizer.encode(d["context"])], 48, Sampling()).tokens[0]
        text = tokenizer.decode([t for t in ids if t != tokenizer.eos_id])
        text = text.split("\n")[0].split('"""')[0]
        served = {s["doc_id"]: s for s in samples["stdlib_docstring"]}[i]["resps"][0][0]
        assert served == text
        matches.append(text == d["target"])
    assert scores["stdlib_docstring"]["exact_match"] == pytest.approx(np.mean(matches))


def test_lm_eval_chat_completions_through_the_server(tiny_run, tmp_path):
    """local-chat-completions: each context a user turn through /v1/chat/completions; the
    answers equal greedy generation from the run's chat rendering of that turn."""
    import json

    from pipeline.evaluation import run_eval
    from pipeline.inference.generate import generate
    from pipeline.inference.sampling import Sampling
    from pipeline.tokenizer import prompt_ids

    run = str(tmp_path / "run")
    shutil.copytree(tiny_run, run)
    scores, samples = run_eval(
        run, limit=4, examples=12, cfg=ServeConfig(slots=2), samples=True, chat=True
    )
    assert set(scores) == {"stdlib_docstring"}
    loaded = load_for_inference(run, "none", None)
    model, tokenizer = loaded.model, loaded.tokenizer
    examples = build_examples(12)["stdlib_docstring"][:4]
    by_doc = {s["doc_id"]: s for s in samples["stdlib_docstring"]}
    matches = []
    for i, d in enumerate(examples):
        context = by_doc[i]["arguments"][0][0]  # what lm-eval sent: the messages, as JSON
        while not isinstance(context, str):
            context = context[0]
        messages = json.loads(context)
        assert messages == [{"role": "user", "content": d["context"]}]
        ids = generate(model, [prompt_ids(tokenizer, messages)], 48, Sampling()).tokens[0]
        ends = {tokenizer.eos_id, tokenizer.end_id}
        cut = next((j for j, t in enumerate(ids) if t in ends), len(ids))
        text = tokenizer.decode(ids[:cut]).split("\n")[0].split('"""')[0]
        assert by_doc[i]["resps"][0][0] == text
        matches.append(text == d["target"])
    assert scores["stdlib_docstring"]["exact_match"] == pytest.approx(np.mean(matches))

    with pytest.raises(Exception, match="log-likelihood task"):
        run_eval(run, ["stdlib_next_line"], limit=1, chat=True)
