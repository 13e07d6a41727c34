"""The training step every stage shares: the loss, the optimizer, the pure step.

Pre-training, fine-tuning and distillation are `Stage`s: which parameters train, which stay
frozen, which loss, which batches. The step lives here once; how it runs over the devices is
`parallel.py`, and the loop around it (checkpoints, resume, metrics, signals) `loop.py`.

The training state is a plain pytree `{"step", "params", "opt_state", "rng", "frozen"}`.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from pipeline.config import Config, OptimizerConfig
from pipeline.training.parallel import AXIS, Strategy, make_strategy

# loss_fn(params, frozen, batch, rng) -> (sum of per-token losses, number of tokens counted),
# or (sum, count, extras): extras a dict of further sums over the same count (e.g. DPO's reward
# accuracy), logged as their means beside the loss, with an eval_ prefix in evaluation
LossFn = Callable[[Any, Any, dict, jax.Array], tuple]


def loss_parts(result: tuple) -> tuple[jax.Array, jax.Array, dict]:
    """(sum, count, extras) of a loss function's result, extras {} when it has none."""
    return (*result, {}) if len(result) == 2 else tuple(result)


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the message says what to do."""


@dataclass
class Stage:
    """What a training stage trains, on what, with which loss."""

    name: str
    graphdef: nnx.GraphDef  # merges with (params, frozen) into the model
    params: nnx.State  # trained
    frozen: Any  # not trained (e.g. the base under LoRA, or a teacher); {} when none
    loss_fn: LossFn
    train_batch: Callable[[int], dict]  # step -> this process's rows of the global batch
    eval_batch: Callable[[int], dict] | None  # i -> rows of the i-th validation batch
    flops_per_token: float
    tokens_per_example: int
    bytes_per_token: float | None = None  # set where bits per byte make sense
    tokenizer: Any = None
    export: Callable[[Any, Any], None] | None = None  # (final params, run dir) -> files
    # named validation sets, each (i -> rows of its i-th batch, weight): logged as
    # eval_loss/NAME, and eval_loss is their weighted mean (a data mixture's sources)
    eval_sets: dict[str, tuple[Callable[[int], dict], float]] | None = None
    perplexity: bool = True  # the loss is a cross-entropy: log eval_perplexity beside it
    # on-policy stages (GRPO): rollout(params, rows, step) turns train_batch's rows into the
    # step's batch with the current parameters (host arrays) before the step runs, and the
    # step makes `updates_per_batch` optimizer updates on it
    rollout: Callable[[Any, dict, int], dict] | None = None
    updates_per_batch: int = 1
    # an evaluation of its own (e.g. held-out pass rate): params -> {"eval_NAME": value}
    evaluate: Callable[[Any], dict] | None = None

    @property
    def evaluates(self) -> bool:
        return bool(self.eval_batch or self.eval_sets or self.evaluate)


def lm_loss(apply: Callable, params, frozen, batch: dict, rng) -> tuple[jax.Array, jax.Array]:
    """Next-token cross-entropy summed over the counted tokens. batch["tokens"]: (B, T+1);
    optional "mask" (B, T) over targets and "segments" (B, T+1) for packed rows. `apply(...,
    targets=)` gives the (B, T) per-token losses (`token_losses`)."""
    tokens, segments = batch["tokens"], batch.get("segments")
    # packed rows: attention within a segment; no target from the previous segment
    inputs = None if segments is None else segments[:, :-1]
    losses = apply(params, frozen, tokens[:, :-1], rng, segments=inputs, targets=tokens[:, 1:])
    mask = batch.get("mask")
    mask = jnp.ones_like(losses) if mask is None else mask.astype(losses.dtype)
    if segments is not None:
        mask = mask * (segments[:, 1:] == segments[:, :-1]).astype(losses.dtype)
    return jnp.sum(losses * mask), jnp.sum(mask)


def token_losses(model, tokens, targets, segments=None) -> jax.Array:
    """(B, T) next-token cross-entropies of `targets` given `tokens` under `model` (a
    `Transformer`), float32.

    With `model.loss_chunk` > 0 the logits are made `loss_chunk` positions at a time and made
    again in the backward pass: the (B, T, V) float32 logits and their gradient never exist at
    once (the largest temporaries of a model with a large vocabulary). With `model.loss_dtype:
    compute` the logits stay in the compute dtype (`cross_entropy`).
    """
    x, _ = model.hidden(tokens, segments=segments)
    head = partial(model.head, float32=model.cfg.loss_dtype == "float32")
    chunk = model.cfg.loss_chunk
    if not chunk or chunk >= x.shape[1]:
        return cross_entropy(head(x), targets)
    return chunked_cross_entropy(head, x, targets, chunk)


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """(..., V) logits, (...) int targets -> (...) float32 cross-entropies.

    float32 logits: optax's. Narrower logits (`model.loss_dtype: compute`) are read once into a
    float32 log-sum-exp, and the backward pass writes their gradient, softmax - one-hot (taken
    in float32), in their own dtype: neither float32 logits nor a float32 gradient is stored,
    where autodiff of a float32 log-softmax keeps a (..., V) float32 array for the backward.
    """
    if logits.dtype == jnp.float32:
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return _narrow_cross_entropy(logits, targets)


@jax.custom_vjp
def _narrow_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    return _cross_entropy_fwd(logits, targets)[0]


def _cross_entropy_fwd(logits, targets):
    wide = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(wide, axis=-1)
    picked = jnp.take_along_axis(wide, targets[..., None], axis=-1)[..., 0]
    return lse - picked, (logits, lse, targets)


def _cross_entropy_bwd(residuals, g):
    logits, lse, targets = residuals
    probs = jnp.exp(logits.astype(jnp.float32) - lse[..., None])
    onehot = jax.nn.one_hot(targets, logits.shape[-1], dtype=jnp.float32)
    grad = (g[..., None] * (probs - onehot)).astype(logits.dtype)
    return grad, np.zeros(targets.shape, jax.dtypes.float0)


_narrow_cross_entropy.defvjp(_cross_entropy_fwd, _cross_entropy_bwd)


def chunked_cross_entropy(head: Callable, x: jax.Array, targets: jax.Array, chunk: int):
    """Cross-entropies of `head(x)` (B, T, V) against `targets` (B, T), `chunk` positions at a
    time in a loop whose body is recomputed in the backward pass."""
    b, t, d = x.shape
    pad = -t % chunk
    if pad:
        x = jnp.pad(x, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
    n = (t + pad) // chunk
    xs = x.reshape(b, n, chunk, d).swapaxes(0, 1)
    ts = targets.reshape(b, n, chunk).swapaxes(0, 1)

    @jax.checkpoint
    def one(carry, chunk_of):
        x_c, t_c = chunk_of
        return carry, cross_entropy(head(x_c), t_c)

    _, losses = jax.lax.scan(one, None, (xs, ts))
    return losses.swapaxes(0, 1).reshape(b, t + pad)[:, :t]


def make_optimizer(
    cfg: OptimizerConfig, steps: int, params
) -> tuple[optax.GradientTransformation, Callable]:
    """optimizer.name over the schedule, after global-norm clipping; weight decay on matrices
    only (decay_mask). Muon takes the parameters `optimizer_labels` marks "muon" and AdamW the
    rest."""
    schedule = make_schedule(cfg, steps)

    def mask(tree):  # a function: under optax.partition it sees its group's subtree
        return decay_mask(tree, cfg.decay_embeddings)

    adamw = optax.adamw(
        schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=mask
    )
    if cfg.name == "muon":
        muon = optax.contrib.muon(
            schedule,
            beta=cfg.muon_beta,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            consistent_rms=cfg.muon_rms,
        )
        tx = optax.partition({"muon": muon, "adamw": adamw}, optimizer_labels(params, "muon"))
    elif cfg.name == "lion":
        tx = optax.lion(schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay, mask=mask)
    elif cfg.name == "adafactor":
        tx = optax.adafactor(schedule, weight_decay_rate=cfg.weight_decay, weight_decay_mask=mask)
    else:
        tx = adamw
    if cfg.clip_norm:
        tx = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), tx)
    return tx, schedule


def optimizer_labels(params, name: str = "muon"):
    """Which optimizer takes each parameter: under Muon, "muon" for the 2-D weight matrices
    of the transformer blocks (attention and MLP kernels) and "adamw" for the rest (token and
    position embeddings, norms, biases, the output head, LoRA's factors); under any other
    optimizer, its name for every parameter."""

    def label(path, leaf) -> str:
        keys = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        keys = keys[:-1] if keys[-1] == "value" else keys  # an nnx.Variable's array
        matrix = leaf.ndim == 2 and "blocks" in keys and keys[-1] == "kernel"
        lora = any(k.startswith("lora") for k in keys)
        if name != "muon":
            return name
        return "muon" if matrix and not lora else "adamw"

    return jax.tree_util.tree_map_with_path(label, params)


def make_schedule(cfg: OptimizerConfig, steps: int) -> optax.Schedule:
    warmup = min(cfg.warmup_steps, max(steps - 1, 0))
    decay_steps = max(steps - warmup, 1)
    end = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "constant":
        after = optax.constant_schedule(cfg.lr)
    elif cfg.schedule == "linear":
        after = optax.linear_schedule(cfg.lr, end, decay_steps)
    elif cfg.schedule == "wsd":
        after = _stable_decay(cfg, steps, warmup)
    else:
        after = optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=cfg.min_lr_ratio)
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), after], [warmup])


def _stable_decay(cfg: OptimizerConfig, steps: int, warmup: int) -> optax.Schedule:
    """WSD after its warmup (counting from the warmup's end): lr until the last
    decay_fraction of the run's `steps`, then down to lr * min_lr_ratio, linearly or as
    1 - sqrt(progress). Where the decay starts depends on train.steps alone, so a run resumed
    with more steps stays stable for longer."""
    decay = min(max(int(round(cfg.decay_fraction * steps)), 1), max(steps - warmup, 1))
    stable, end = max(steps - warmup - decay, 0), cfg.lr * cfg.min_lr_ratio

    def schedule(count):
        progress = jnp.clip((count - stable) / decay, 0.0, 1.0)
        shape = jnp.sqrt(progress) if cfg.decay_shape == "1-sqrt" else progress
        return end + (cfg.lr - end) * (1.0 - shape)

    return schedule


def decay_mask(params, decay_embeddings: bool = False):
    """Weight decay for matrices only: never norms or biases; embeddings only if asked."""

    def decays(path, leaf) -> bool:
        name = jax.tree_util.keystr(path)
        return leaf.ndim >= 2 and (decay_embeddings or "embed" not in name)

    return jax.tree_util.tree_map_with_path(decays, params)


def create_train_state(stage: Stage, tx: optax.GradientTransformation, seed: int) -> dict:
    return {
        "step": jnp.zeros((), jnp.int32),
        "params": stage.params,
        "opt_state": tx.init(stage.params),
        "rng": jax.random.PRNGKey(seed),
        "frozen": stage.frozen,
    }


def train_step(
    state: dict,
    batch: dict,
    *,
    loss_fn: LossFn,
    tx,
    schedule,
    grad_accum: int,
    axis_name: str | None = AXIS,
    updates: int = 1,
) -> tuple[dict, dict]:
    """One step on this device's batch: `updates` optimizer updates on it (GRPO's several per
    batch of rollouts; metrics their mean), gradients summed across `axis_name`."""
    rng = jax.random.fold_in(state["rng"], state["step"])
    one = partial(
        _update, state, batch, loss_fn=loss_fn, tx=tx, grad_accum=grad_accum, axis_name=axis_name
    )
    if updates == 1:
        (params, opt_state), metrics = one((state["params"], state["opt_state"]), rng)
    else:
        keys = jax.vmap(partial(jax.random.fold_in, rng))(jnp.arange(updates))
        (params, opt_state), metrics = jax.lax.scan(
            one, (state["params"], state["opt_state"]), keys
        )
        metrics = jax.tree.map(lambda x: jnp.mean(x, axis=0), metrics)
    new_state = {**state, "step": state["step"] + 1, "params": params, "opt_state": opt_state}
    return new_state, {**metrics, "lr": schedule(state["step"])}


def _update(state, batch, carry, rng, *, loss_fn, tx, grad_accum: int, axis_name):
    """One optimizer update of `carry` = (params, opt_state): ((params, opt_state), metrics)."""
    params, opt_state = carry
    grads, loss_sum, count, extras = _accumulate(
        loss_fn, {**state, "params": params}, batch, rng, grad_accum
    )
    if axis_name is not None:
        grads, loss_sum, count, extras = jax.lax.psum((grads, loss_sum, count, extras), axis_name)
    grads = jax.tree.map(lambda g: g / count, grads)
    updates, opt_state = tx.update(grads, opt_state, params)
    metrics = {
        "loss": loss_sum / count,
        "grad_norm": optax.tree.norm(grads),
        **{name: value / count for name, value in extras.items()},
    }
    return (optax.apply_updates(params, updates), opt_state), metrics


def _accumulate(loss_fn: LossFn, state, batch, rng, grad_accum: int):
    """Gradients of the summed loss over `grad_accum` micro-batches, one at a time (lax.scan)."""
    grad_fn = jax.grad(lambda p, b: loss_fn(p, state["frozen"], b, rng), has_aux=True)

    def micro(p, b):
        grads, parts = grad_fn(p, b)
        return grads, *parts

    if grad_accum == 1:
        return micro(state["params"], batch)
    micro_batches = jax.tree.map(lambda x: x.reshape(grad_accum, -1, *x.shape[1:]), batch)

    def body(carry, b):
        return jax.tree.map(jnp.add, carry, micro(state["params"], b)), None

    first = jax.tree.map(lambda x: x[0], micro_batches)
    zeros = jax.tree.map(
        lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(micro, state["params"], first)
    )
    totals, _ = jax.lax.scan(body, zeros, micro_batches)
    return totals


def with_aux(loss_fn: LossFn) -> LossFn:
    """Adapt a `(sum, count)` loss so `jax.grad(has_aux=True)` differentiates the sum only."""

    def wrapped(params, frozen, batch, rng):
        loss_sum, count, extras = loss_parts(loss_fn(params, frozen, batch, rng))
        return loss_sum, (loss_sum, count, extras)

    return wrapped


def eval_step(state: dict, batch: dict, *, loss_fn: LossFn, axis_name: str | None = AXIS):
    loss_sum, count, extras = loss_parts(loss_fn(state["params"], state["frozen"], batch, None))
    if axis_name is not None:
        loss_sum, count, extras = jax.lax.psum((loss_sum, count, extras), axis_name)
    return {"loss_sum": loss_sum, "count": count, "extras": extras}


def build_steps(
    stage: Stage, cfg: Config, tx, schedule, strategy: Strategy, state_like
) -> tuple[Callable, Callable]:
    """The stage's train and eval steps, run over the devices by `strategy`."""
    step = partial(
        train_step,
        loss_fn=with_aux(stage.loss_fn),
        tx=tx,
        schedule=schedule,
        grad_accum=cfg.train.grad_accum,
        axis_name=strategy.axis_name,
        updates=stage.updates_per_batch,
    )
    evaluate = partial(eval_step, loss_fn=stage.loss_fn, axis_name=strategy.axis_name)
    return (
        strategy.make_parallel_step(step, state_like),
        strategy.make_parallel_step(evaluate, state_like, donate_state=False),
    )


@dataclass(frozen=True)
class RunResult:
    """How a training run ended: its status (finished, interrupted (...)), the step it reached,
    its directory, and the last and the first evaluation (`eval_loss` and every metric)."""

    status: str
    step: int
    run_dir: str = ""
    eval_loss: float | None = None
    initial_eval_loss: float | None = None
    eval: dict = field(default_factory=dict)
    initial_eval: dict = field(default_factory=dict)


class Trainer(NamedTuple):
    """A stage made trainable: its optimizer and schedule, initial state, strategy and steps."""

    tx: optax.GradientTransformation
    schedule: optax.Schedule
    state: dict
    strategy: Strategy
    train_step: Callable
    eval_step: Callable


def create_trainer(
    stage: Stage,
    cfg: Config,
    *,
    strategy: Strategy | None = None,
    steps: int | None = None,
    abstract: bool = False,
) -> Trainer:
    """The trainer setup every caller shares (the loop, `fit`, `bench train`, the tests):
    optimizer -> training state -> strategy -> parallel steps. `steps`: the schedule's length
    (default `train.steps`); `abstract`: the state as shapes only (nothing allocated)."""
    tx, schedule = make_optimizer(cfg.optimizer, steps or cfg.train.steps, stage.params)
    if abstract:
        state = jax.eval_shape(lambda: create_train_state(stage, tx, seed=0))
    else:
        state = create_train_state(stage, tx, cfg.train.seed)
    strategy = strategy or make_strategy(cfg.train)
    train_fn, eval_fn = build_steps(stage, cfg, tx, schedule, strategy, state)
    return Trainer(tx, schedule, state, strategy, train_fn, eval_fn)


class StopRequested:
    """SIGTERM / SIGINT set a flag; the loop saves a checkpoint and exits at the next step."""

    def __init__(self):
        self.signal = None
        self.previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signal = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def __bool__(self) -> bool:
        return self.signal is not None


def wait_for_previous_step(pending: list) -> None:
    """On CPU, block until the last dispatched step has finished before dispatching the next.

    XLA's CPU client reserves a program's temporaries when the call is dispatched, not when it
    runs: steps dispatched ahead of the running one hold theirs at the same time. `small`
    (1.4 GB of temporaries) peaked at 3.8 GB RSS with 8 steps dispatched ahead and at 2.5 GB
    one at a time, at the same step time. The host still prepares the next batch while a step
    runs. Accelerators keep dispatching ahead: their allocators order a step's memory after the
    previous step's.
    """
    if pending and jax.default_backend() == "cpu":
        jax.block_until_ready(pending[-1])


def to_host(tree) -> Any:
    return jax.tree.map(np.asarray, tree)
