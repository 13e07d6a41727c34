"""Speculative decoding: greedy equals the target alone; sampling keeps its distribution.

Run: pytest tests/test_speculative.py
"""

import jax
import numpy as np
import pytest
from conftest import full_logits
from helpers import tiny_model_config

from pipeline.config import ModelConfig
from pipeline.inference.generate import generate
from pipeline.inference.sampling import Sampling
from pipeline.inference.speculative import speculative_generate
from pipeline.model import create_model

TARGET = tiny_model_config(vocab_size=97)
DRAFT = ModelConfig(
    family="llama", vocab_size=97, num_layers=1, embed_dim=16, num_heads=2, max_seq_len=128
)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_greedy_speculative_equals_the_target_alone(k):
    target = create_model(TARGET, seed=1)
    prompts = [[5, 6, 7], list(range(1, 20)), [42]]
    budgets = [20, 9, 14]
    alone = generate(target, prompts, budgets).tokens
    bad = create_model(DRAFT, seed=9)  # a draft whose tokens are mostly rejected
    out = speculative_generate(target, bad, prompts, budgets, k=k)
    assert out.tokens == alone and out.acceptance < 0.5
    if k == 5:  # a draft that is the target: every token accepted
        out = speculative_generate(target, create_model(TARGET, seed=1), prompts, budgets, k=k)
        assert out.tokens == alone and out.acceptance == 1.0
    if k == 3:  # EOS stops a row: the target's third token of row 0 as end-of-text
        eos = alone[0][2]
        stopped = speculative_generate(target, bad, prompts, budgets, eos_id=eos, k=k)
        assert stopped.tokens == generate(target, prompts, budgets, eos_id=eos).tokens


@pytest.mark.e2e
def test_sampling_keeps_the_target_distribution():
    """Chi-square: the joint law of the 2nd and 3rd tokens (the 1st comes from the prefill)."""
    from scipy.stats import chisquare

    V = 6
    target = create_model(ModelConfig(**{**TARGET.__dict__, "vocab_size": V}), seed=3)
    draft = create_model(ModelConfig(**{**DRAFT.__dict__, "vocab_size": V}), seed=4)
    prompt, n = [1, 2, 3], 6000
    samplings = [Sampling(temperature=1.0, seed=s) for s in range(n)]
    out = speculative_generate(target, draft, [prompt] * n, 3, samplings, k=2)
    assert 0.0 < out.acceptance < 1.0  # both branches of the rule ran
    counts = np.zeros((V, V))
    for row in out.tokens:
        counts[row[1], row[2]] += 1

    def joint(model) -> np.ndarray:
        """The model's own law of the 2nd and 3rd tokens, as expected counts."""

        pairs = [(a, b) for a in range(V) for b in range(V)]
        rows = [prompt + [a, b] for a, b in pairs]  # one forward: each position's next token
        expected = np.zeros((V, V))
        for (a, b), logits in zip(pairs, full_logits(model, rows), strict=True):
            p = np.asarray(jax.nn.softmax(logits[len(prompt) - 1 :]), np.float64)
            expected[b] += p[0, a] * p[1, b] * p[2]  # p(a) p(b | a) p(. | a, b)
        return expected.ravel() / expected.sum() * n

    assert chisquare(counts.ravel(), joint(target)).pvalue > 1e-3
    # and the test has power: the same counts reject the draft's own law, which a sampler that
    # accepted the draft's tokens without the rule's correction would follow
    assert chisquare(counts.ravel(), joint(draft)).pvalue < 1e-6


def test_a_draft_with_another_vocabulary_is_refused():
    target = create_model(TARGET)
    draft = create_model(ModelConfig(**{**DRAFT.__dict__, "vocab_size": 50}))
    with pytest.raises(ValueError, match="vocabulary"):
        speculative_generate(target, draft, [[1, 2]], 4)


@pytest.mark.e2e
@pytest.mark.parametrize("same", [True, False])
def test_the_serving_engine_with_a_draft_gives_the_target_tokens(same):
    import threading

    from pipeline.serving.engine import Engine, Request

    target = create_model(TARGET, seed=1)
    draft = create_model(TARGET, seed=1) if same else create_model(DRAFT, seed=9)
    engine = Engine(target, slots=2, max_len=32, draft=draft, draft_k=3)
    engine.warmup()
    engine.start()
    prompts = [[5, 6, 7], list(range(1, 12)), [42], [9, 9], [3, 1, 4, 1, 5], [2, 7]]
    budgets = [15, 9, 14, 3, 11, 1]
    got = {i: [] for i in range(len(prompts))}
    finished = threading.Semaphore(0)

    def emit(i):
        def on(token, reason):
            if token is not None:
                got[i].append(token)
            if reason:
                finished.release()

        return on

    steps = engine.steps
    for i, (prompt, n) in enumerate(zip(prompts, budgets, strict=True)):
        engine.submit(Request(prompt, n, Sampling(), emit(i)))
    for _ in prompts:
        assert finished.acquire(timeout=120)
    engine.stop()
    alone = generate(target, prompts, budgets).tokens
    assert [got[i] for i in range(len(prompts))] == alone
    if same:  # every draft accepted: up to 4 tokens a step
        assert engine.steps - steps < sum(budgets) / 2
