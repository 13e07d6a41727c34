"""Per-request logit controls of the serving engine, applied inside its jitted programs.

What a request may ask beyond temperature / top-k / top-p, as OpenAI and vLLM define it:

- `logit_bias` {token id: bias in [-100, 100]}: added to the logits;
- `min_tokens`: the request's stop tokens are masked until it has generated that many;
- `repetition_penalty` r (the common extension, as transformers and vLLM apply it): the logit of
  every token seen in the prompt or the output is divided by r where positive, multiplied by r
  where negative;
- `frequency_penalty` f and `presence_penalty` p (OpenAI's definitions): the logit of token t
  loses f * c[t] + p * (c[t] > 0), c[t] being how often t occurs in the output so far;
- `logprobs` k: the log-probability of each chosen token and the k most likely ones, from the
  model's raw distribution (float32 log-softmax of its logits, before any of the above and
  before temperature and truncation: what vLLM reports by default).

- a grammar's token mask (structured outputs): tokens it does not allow next are excluded; the
  mask is a per-slot bitmask array the engine refreshes between steps.

In this order (mask, bias and min_tokens, then repetition, frequency, presence), then
temperature and truncation. Every control is a per-slot device array (token counts per slot
included), so one compiled step serves any mix of requests: nothing recompiles for a new option,
and a batch where no request uses a control skips its work (`lax.cond`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

MAX_TOP_LOGPROBS = 20  # OpenAI's limit for top_logprobs
MAX_LOGIT_BIAS = 300  # entries per request
MAX_STOP_IDS = 8  # stop token ids per request, end-of-text included


@dataclass(frozen=True)
class Controls:
    """What one request asks of the logits (the defaults change nothing)."""

    presence: float = 0.0
    frequency: float = 0.0
    repetition: float = 1.0
    bias: dict[int, float] = field(default_factory=dict)
    min_tokens: int = 0
    stop_ids: tuple[int, ...] = ()  # masked while fewer than min_tokens were generated
    logprobs: bool = False
    constrained: bool = False  # a grammar's token mask applies (structured outputs)

    @property
    def shapes_logits(self) -> bool:
        penalised = self.presence or self.frequency or self.repetition != 1.0 or self.bias
        return bool(penalised or (self.min_tokens and self.stop_ids) or self.constrained)


def check_controls(c: Controls, vocab_size: int) -> None:
    """Raise ValueError (a message for the client) for controls the engine cannot apply."""
    if not c.repetition > 0:
        raise ValueError(f"repetition_penalty must be > 0, got {c.repetition}")
    if len(c.bias) > MAX_LOGIT_BIAS:
        raise ValueError(f"logit_bias takes at most {MAX_LOGIT_BIAS} tokens, got {len(c.bias)}")
    for token, value in c.bias.items():
        if not 0 <= token < vocab_size:
            raise ValueError(f"logit_bias: token id {token} is not in [0, {vocab_size})")
        if not -100 <= value <= 100:
            raise ValueError(f"logit_bias: {value} for token {token} is not in [-100, 100]")
    if len(c.stop_ids) > MAX_STOP_IDS:
        raise ValueError(f"at most {MAX_STOP_IDS} stop token ids, got {len(c.stop_ids)}")
    if c.min_tokens < 0:
        raise ValueError(f"min_tokens must be >= 0, got {c.min_tokens}")


def init_controls(slots: int, vocab_size: int) -> dict[str, jax.Array]:
    """The engine's per-slot control state, all neutral."""
    return {
        "presence": jnp.zeros((slots,), jnp.float32),
        "frequency": jnp.zeros((slots,), jnp.float32),
        "repetition": jnp.ones((slots,), jnp.float32),
        "min_tokens": jnp.zeros((slots,), jnp.int32),
        "stop_ids": jnp.full((slots, MAX_STOP_IDS), -1, jnp.int32),
        "logprobs": jnp.zeros((slots,), bool),
        "active": jnp.zeros((slots,), bool),  # any logit-shaping control at all
        "bias": jnp.zeros((slots, vocab_size), jnp.float32),
        "counts": jnp.zeros((slots, vocab_size), jnp.int32),  # output tokens
        "prompt": jnp.zeros((slots, vocab_size), bool),  # the prompt's tokens
    }


def control_arrays(controls: list[Controls]) -> dict[str, np.ndarray]:
    """The per-request inputs of a prefill call (bias as (id, value) pairs, -1 for none)."""
    n = len(controls)
    bias_ids = np.full((n, MAX_LOGIT_BIAS), -1, np.int32)
    bias_values = np.zeros((n, MAX_LOGIT_BIAS), np.float32)
    stop_ids = np.full((n, MAX_STOP_IDS), -1, np.int32)
    for i, c in enumerate(controls):
        items = sorted(c.bias.items())
        bias_ids[i, : len(items)] = [t for t, _ in items]
        bias_values[i, : len(items)] = [v for _, v in items]
        stop_ids[i, : len(c.stop_ids)] = c.stop_ids
    return {
        "presence": np.asarray([c.presence for c in controls], np.float32),
        "frequency": np.asarray([c.frequency for c in controls], np.float32),
        "repetition": np.asarray([c.repetition for c in controls], np.float32),
        "min_tokens": np.asarray([c.min_tokens for c in controls], np.int32),
        "stop_ids": stop_ids,
        "logprobs": np.asarray([c.logprobs for c in controls], bool),
        "active": np.asarray([c.shapes_logits for c in controls], bool),
        "bias_ids": bias_ids,
        "bias_values": bias_values,
    }


def admit_controls(ctl: dict, new: dict, tokens, lengths, slot_ids, first, fresh) -> tuple:
    """Write prefilled rows' controls into rows `slot_ids` (past the last slot: dropped): a
    request's `first` chunk writes its controls and starts its prompt's token set, a later
    chunk adds its (n, P) tokens to that set; output counts restart where `fresh` (a request
    resumed after preemption keeps the counts the engine restored). Returns (the whole state,
    the n rows' view of it)."""
    n, P = tokens.shape
    S, V = ctl["bias"].shape
    rows = jnp.arange(n)[:, None]
    bias_ids = jnp.where(new["bias_ids"] < 0, V, new["bias_ids"])  # V: out of range, dropped
    bias = jnp.zeros((n, V), jnp.float32).at[rows, bias_ids].add(new["bias_values"], mode="drop")
    in_prompt = jnp.arange(P)[None, :] < lengths[:, None]
    prompt = (
        jnp.zeros((n, V), bool).at[rows, jnp.where(in_prompt, tokens, V)].set(True, mode="drop")
    )
    values = {k: new[k] for k in ("presence", "frequency", "repetition", "min_tokens", "stop_ids")}
    values |= {"logprobs": new["logprobs"], "active": new["active"], "bias": bias}
    old = {k: v[jnp.clip(slot_ids, 0, S - 1)] for k, v in ctl.items()}
    pick = lambda cond, a, b: jnp.where(cond.reshape(-1, *[1] * (a.ndim - 1)), a, b)  # noqa: E731
    merged = {k: pick(first, v, old[k]) for k, v in values.items()}
    merged["prompt"] = prompt | pick(first, jnp.zeros_like(prompt), old["prompt"])
    merged["counts"] = pick(first & fresh, jnp.zeros_like(old["counts"]), old["counts"])
    return {k: ctl[k].at[slot_ids].set(merged[k], mode="drop") for k in ctl}, merged


def restore_counts(ctl: dict, slot, output) -> dict:
    """Row `slot`'s output counts := those of `output` (a resumed request's tokens so far; ids
    past the vocabulary are padding)."""
    V = ctl["counts"].shape[1]
    counts = jnp.zeros((V,), jnp.int32).at[output].add(1, mode="drop")
    return {**ctl, "counts": ctl["counts"].at[slot].set(counts)}


def mask_words(vocab_size: int) -> int:
    """int32 words of a token bitmask (bit t % 32 of word t // 32 allows token t)."""
    return (vocab_size + 31) // 32


def adjust(logits: jax.Array, c: dict, generated: jax.Array, mask: jax.Array) -> jax.Array:
    """The logits as the rows' controls shape them. logits (B, V) float32; `c` the B rows'
    controls; `generated` (B,): tokens each row has produced so far; `mask` (B, W) int32: each
    row's allowed tokens as a bitmask (all ones: every token), a grammar's for constrained rows.
    """
    B, V = logits.shape

    def shaped():
        ids = jnp.arange(V)
        allowed = (jnp.right_shift(mask[:, ids // 32], ids % 32) & 1).astype(bool)
        x = jnp.where(allowed, logits + c["bias"], -jnp.inf)
        early = (generated < c["min_tokens"])[:, None]
        stop_ids = jnp.where(c["stop_ids"] < 0, V, c["stop_ids"])
        stop = jnp.zeros((B, V), bool).at[jnp.arange(B)[:, None], stop_ids].set(True, mode="drop")
        x = jnp.where(early & stop, -jnp.inf, x)
        r = c["repetition"][:, None]
        counts = c["counts"].astype(jnp.float32)
        seen = c["prompt"] | (counts > 0)
        x = jnp.where(seen, jnp.where(x > 0, x / r, x * r), x)
        x = x - c["frequency"][:, None] * counts - c["presence"][:, None] * (counts > 0)
        return jnp.where(c["active"][:, None], x, logits)

    return jax.lax.cond(jnp.any(c["active"]), shaped, lambda: logits)


def record(ctl: dict, tokens: jax.Array, rows: jax.Array) -> dict:
    """Count each row's new token (rows: their slot ids; past the last slot: dropped)."""
    return {
        **ctl,
        "counts": ctl["counts"].at[rows, tokens].add(1, mode="drop"),
    }


def logprobs(logits: jax.Array, tokens: jax.Array, wanted: jax.Array):
    """(log-probability of each row's token (B,), the top ids (B, K), their log-probabilities
    (B, K)) from the raw logits, K = MAX_TOP_LOGPROBS; zeros where no row wants them."""
    B, V = logits.shape
    K = min(MAX_TOP_LOGPROBS, V)

    def compute():
        lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        top_lp, top_ids = jax.lax.top_k(lp, K)
        return jnp.take_along_axis(lp, tokens[:, None], axis=-1)[:, 0], top_ids, top_lp

    def skip():
        return jnp.zeros((B,), jnp.float32), jnp.zeros((B, K), jnp.int32), jnp.zeros((B, K))

    return jax.lax.cond(jnp.any(wanted), compute, skip)
