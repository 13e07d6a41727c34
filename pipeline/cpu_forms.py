"""The products and the recomputation of the model in the forms XLA's CPU compiler runs
fastest. They exist because autodiff's default forms ran slowly there: projections as rows took
the small model's training step from 3,608-3,691 to 4,372-4,472 tokens/s, the widening
gradients to 4,842-4,959, and the block recomputation cut gpt2-124m's temporaries from 6.9 to
2.0 GB (`pipeline bench train`; see docs/performance-notes.md). Other backends get the plain
forms.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


class Linear(nnx.Linear):
    """`nnx.Linear` applied to its inputs as rows (N, features), then reshaped back.

    The same product, but autodiff of the (B, T, D) form contracts the weight gradient over
    two dimensions, which XLA's CPU compiler runs through transposed copies of the activations
    and gradients and a slower kernel: the small model's training step went from 3,608-3,691 to
    4,372-4,472 tokens/s with the rows form (`bench train --cases small`).
    A widening projection's gradients take the forms `rows_dot_general` gives.
    """

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("dot_general", rows_dot_general)
        super().__init__(*args, **kwargs)

    def __call__(self, inputs: jax.Array, out_sharding=None) -> jax.Array:
        if inputs.ndim <= 2 or out_sharding is not None:
            return super().__call__(inputs, out_sharding)
        y = super().__call__(inputs.reshape(-1, inputs.shape[-1]))
        return y.reshape(*inputs.shape[:-1], y.shape[-1])


_ROWS = (((1,), (0,)), ((), ()))
# The largest matrix (elements) whose gradients take `_widening_matmul`'s forms: they copy w,
# x^T and dx^T, memory traffic and memory that the faster kernels repay at `small`'s output
# layer (2.6M) but not at gpt2-124m's (38.6M: that layer alone 2-3% faster, its step no faster
# and its process up to 8.1 GiB RSS against 6.0-6.5, alternated runs).
WIDENING_MAX = 1 << 22


def rows_dot_general(lhs, rhs, dimension_numbers, precision=None, **kwargs) -> jax.Array:
    """`lax.dot_general`, except (N, D_in) rows times a widening (D_in, D_out > D_in) matrix
    of at most `WIDENING_MAX` elements on CPU, whose gradients `_widening_matmul` takes in the
    forms XLA's CPU kernels run fastest. On CPU a narrow (D_in, D_out) matrix waits for `lhs`
    before its conversion (`tied`): one matrix's float32 form at a time, not a layer's.
    """
    rhs = tied(rhs, lhs)
    plain = (
        lhs.ndim != 2
        or rhs.ndim != 2
        or rhs.shape[1] <= rhs.shape[0]
        or rhs.size > WIDENING_MAX
        or dimension_numbers != _ROWS
        or precision is not None
        or any(v is not None for v in kwargs.values())
        or jax.default_backend() != "cpu"
    )
    if plain:
        return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision, **kwargs)
    return _widening_matmul(lhs, rhs)


@jax.custom_vjp
def _widening_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """x (N, D_in) @ w (D_in, D_out), with D_out > D_in (an MLP's up-projection, the output
    layer).

    Autodiff's gradients are dx = g w^T, contracting over the wide D_out, and dw = x^T g. XLA's
    CPU compiler folds transposes into its matmuls, and for these shapes the folded forms run
    slowly: the small model's output layer ([4096, 320] x [320, 8192]) took 200 ms forward and
    backward. Here w and x^T are made as arrays of their own, dx comes out transposed,
    (w g^T)^T, and barriers keep the compiler from folding the transposes back: 160 ms, and an
    up-projection's 26.5 ms become 24. The values are the same up to float32 summation order.
    """
    return x @ w


def _widening_fwd(x, w):
    return x @ w, (x, w)


def _widening_bwd(residuals, g):
    x, w = residuals
    barrier = jax.lax.optimization_barrier
    dx_t = barrier(jax.lax.dot_general(barrier(w), g, (((1,), (1,)), ((), ()))))  # (D_in, N)
    dw = barrier(barrier(x.T) @ g)
    return dx_t.T, dw


_widening_matmul.defvjp(_widening_fwd, _widening_bwd)


# The most elements of a narrow tied table converted to float32 at once on CPU (64 MB).
HEAD_CHUNK = 1 << 24


def attend(embed: nnx.Module, rows: jax.Array) -> jax.Array:
    """The tied head, rows (N, D) -> (N, V): `nnx.Embed.attend`'s product through
    `rows_dot_general`; another embedding (int8's) with its own `attend`.

    On CPU a table narrower than float32 is converted before the product, and a large
    vocabulary's table is the largest matrix of the model (Llama 3.2 1B's 128,256 x 2,048: a
    1.05 GB float32 copy, most of the serving engine's decode temporaries). There it goes in
    slices of at most `HEAD_CHUNK` elements, the first made to wait for the rows and each next
    one for the previous slice's logits (as `after` ties a layer's weights to its input), so one
    slice's copy is alive at a time."""
    if not isinstance(embed, nnx.Embed):
        return after(embed, rows).attend(rows)
    table = embed.embedding[...]
    if not converts_weights(table):
        rows, table = embed.promote_dtype((rows, table), dtype=embed.dtype)
        return rows_dot_general(rows, table.T, _ROWS)
    # (the first slice waits for the rows: a whole-table tie would copy the table)
    step, parts, last = max(1, HEAD_CHUNK // table.shape[1]), [], rows
    for start in range(0, table.shape[0], step):
        first = last.reshape(-1)[0]
        part = table[start : start + step] + (first != first).astype(table.dtype)
        x, part = embed.promote_dtype((rows, part), dtype=embed.dtype)
        last = rows_dot_general(x, part.T, _ROWS)
        parts.append(last)
    return jnp.concatenate(parts, axis=-1)


def remat(fn, policy: str):
    """`fn(block, *arrays)` recomputed in the backward pass instead of keeping its activations.

    The block goes in as (graph, state) and is merged again inside `jax.checkpoint`, a pure
    function of arrays: `nnx.remat` would update the block's variables in place, which fails
    when they come from an outer transform (LoRA's frozen base under `jax.grad`).
    """
    if policy == "none":
        return fn
    # "dots": keep matmul outputs, recompute the cheap elementwise work in the backward pass.
    kept = jax.checkpoint_policies.dots_with_no_batch_dims_saveable if policy == "dots" else None

    def step(block, *args):
        graphdef, state = nnx.split(block)
        inner = lambda state, *args: fn(nnx.merge(graphdef, state), *args)  # noqa: E731
        if policy == "block" and jax.default_backend() == "cpu":
            return _recomputed_after_cotangent(inner)(state, *args)
        return jax.checkpoint(inner, policy=kept)(state, *args)

    return step


def _recomputed_after_cotangent(f):
    """`jax.checkpoint(f)` that also saves memory on XLA's CPU compiler.

    `jax.checkpoint` keeps the recomputation apart from the forward pass with optimization
    barriers; the CPU compiler drops them and merges the two again (same temporaries with and
    without remat: jax-ml/jax#19822). Here the recomputation's input depends on the incoming
    cotangent (x + 0 * one of its elements): it cannot be merged with the forward pass nor
    run before the backward pass reaches this block. `f(state, x, *rest)` -> (x, aux).
    """

    @jax.custom_vjp
    def g(state, x, *rest):
        return f(state, x, *rest)

    def fwd(state, x, *rest):
        return f(state, x, *rest), (state, x, rest)

    def bwd(saved, cotangent):
        state, x, rest = saved
        x = x + jax.tree.leaves(cotangent)[0].ravel()[0].astype(x.dtype) * 0
        return jax.vjp(f, state, x, *rest)[1](cotangent)

    g.defvjp(fwd, bwd)
    return g


# XLA's CPU compiler multiplies bfloat16 and float16 matrices in float32 and dequantises int8
# ones: each weight goes through a conversion before its product. In a loop (generation's
# decode loop, the serving engine's multi-step decode call) loop-invariant code motion hoists
# those conversions out of the body, so a float32 copy of every weight stays alive while the
# loop runs: a 1.24B bfloat16 model (2.5 GB) peaked at 16 GB generating. Without that pass a
# step converts each weight as it reaches it, one at a time.
_KEEP_CONVERSIONS_IN_LOOPS = {"xla_disable_hlo_passes": "while-loop-invariant-code-motion"}


def converts_weights(params) -> bool:
    """Whether XLA converts these weights (a pytree of arrays or shapes) before their
    products: on CPU, when any matrix is narrower than float32."""
    return jax.default_backend() == "cpu" and any(
        len(np.shape(x)) >= 2 and np.dtype(x.dtype) != np.float32 for x in jax.tree.leaves(params)
    )


def compiler_options(params) -> dict | None:
    """The compiler options of a program that reads the weights `params`: where they are
    converted before their products, keep the conversions in their loops (see above);
    otherwise None, the defaults."""
    return dict(_KEEP_CONVERSIONS_IN_LOOPS) if converts_weights(params) else None


def tied(w: jax.Array, x: jax.Array) -> jax.Array:
    """On CPU, a matrix narrower than float32 made to wait for `x` (see `after`): converted
    for its product when its input exists, not with its layer's others (a 1B Llama's layer
    is 0.24 GB of float32 matrices, its largest 67 MB). Elsewhere, `w` as it is."""
    if len(np.shape(w)) < 2 or not converts_weights(w):
        return w
    first = x.reshape(-1)[0]  # XLA does not fold `first != first` for floats: a real dependency
    return w + (first != first).astype(w.dtype)


def after(module: nnx.Module, x: jax.Array) -> nnx.Module:
    """`module` with its matrices made to wait for `x`, on CPU where a matrix narrower than
    float32 is converted before its product (see above). XLA schedules a conversion as soon
    as its input exists, so every layer's weights were converted at the start of the program
    and all kept at once (3.9 GB of float32 copies for a 1.24B bfloat16 model's forward of
    one token; an optimisation barrier is dropped by the CPU compiler before it schedules).
    Here each matrix gets `x[0] != x[0]` added (0, or 1 where the input is already NaN): a
    layer's conversions depend on its input, so they run, one matrix at a time, as the layer
    does. Elsewhere, or with float32 weights, `module` as it is."""
    graphdef, state = nnx.split(module)
    if not converts_weights(state):
        return module
    return nnx.merge(graphdef, jax.tree.map(lambda w: tied(w, x), state))
