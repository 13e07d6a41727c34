"""How the engine's decode call runs: the model alone, several steps a call (`Steps`), or
rounds of speculative decoding with a draft model (`Speculative`). The engine holds one and
asks it, never `if draft`: the KV bytes a block costs beyond the target's, which requests it
can run, the rows of a call, the call itself, when a request's position advances, and whether
the host must see a call's tokens before the next one is dispatched.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pipeline.model import init_paged_cache
from pipeline.serving import programs


class Steps:
    """Decode calls of the model alone: up to `k` steps a call (`programs.steps`), a traced
    count, so one program per row count serves every count."""

    lookahead = 0  # positions a call writes past a slot's last token
    speculative = False
    # a draft's graph, weights and KV pool (none here): what the prefill runs beside the model
    graph = params = pool = None
    pools: tuple = ()

    def __init__(self, graphdef, k: int, options: dict | None = None):
        self.k = k
        self.program = programs.bind(
            programs.steps, ("slots", "ctl", "pool"), options=options, graphdef=graphdef, k=k
        )

    def block_bytes(self, block_size: int) -> int:
        return 0

    def init_pool(self, kv_blocks: int, block_size: int) -> None:
        pass

    def set_pools(self, pools: tuple) -> None:
        pass

    def check(self, controls, adapter: int) -> None:
        pass

    def ids(self, sched, group: list[int], num_slots: int) -> np.ndarray:
        """The slots of one call: the group's, padded with the id past the last slot."""
        ids = np.full(sched.rows(len(group)), num_slots, np.int32)
        ids[: len(group)] = group
        return ids

    def run(self, engine, ids: np.ndarray, live: np.ndarray, inputs: tuple, steps: int):
        """`steps` steps for slots `ids`: (tokens (k, rows), steps, log-probabilities).
        `inputs`: (every slot's block table, ids, live) on the device."""
        safe = np.minimum(ids, engine.num_slots - 1)
        constrained = any(
            engine.active[i] is not None and engine.active[i].grammar is not None for i in ids[live]
        )
        mask = engine.masks[safe] if constrained else engine.allow_all[len(ids)]
        tokens, info, engine.slots, engine.ctl, engine.pool = self.program(
            engine.params,
            engine.slots,
            engine.ctl,
            engine.pool,
            *inputs,  # (the device's tables, ids and live)
            mask,
            np.int32(steps),
        )
        return tokens, steps, info

    def compile_thunk(self, engine, shapes: tuple, rows: int):
        params, _, slots, ctl, pool, _ = shapes
        tables = jax.ShapeDtypeStruct((engine.num_slots, engine.width), jnp.int32)
        live = jax.ShapeDtypeStruct((rows,), jnp.bool_)
        ids = jax.ShapeDtypeStruct((rows,), jnp.int32)
        mask = programs.shapes(engine.allow_all[rows])
        args = (params, slots, ctl, pool, tables, ids, live, mask, np.int32(0))
        return programs.aot(self.program, *args)

    def dispatched(self, request, steps: int) -> None:
        request.position += steps

    def delivered(self, request, produced: int) -> None:
        pass

    def must_deliver(self) -> bool:
        """Whether a call's tokens are needed before the next call is dispatched."""
        return False


class Speculative(Steps):
    """Rounds of speculative decoding (`programs.speculative_step`): the draft proposes `k`
    tokens, the target checks them in one pass, each slot keeps 1..k + 1 of them, the target's
    distribution unchanged. The draft's keys and values live in a pool of their own, under the
    target's block tables. A round's advance is known only once delivered, so each round's
    tokens reach the host before the next is dispatched; logit controls, log-probabilities
    and adapters are refused (the round samples inside the program)."""

    speculative = True

    def __init__(self, graphdef, draft, k: int, vocab_size: int, options: dict | None = None):
        if draft.cfg.vocab_size != vocab_size:
            raise ValueError("the draft's vocabulary differs from the model's")
        self.k, self.cfg, self.lookahead = k, draft.cfg, k + 1
        self.graph, self.params = programs.split(draft)
        self.pool = None
        self.program = programs.bind(
            programs.speculative_step,
            ("slots", "pool", "dpool"),
            static=("rows",),
            options=options,
            graphdef=graphdef,
            dgraph=self.graph,
            k=k,
        )

    @property
    def pools(self) -> tuple:
        return (self.pool,)

    def block_bytes(self, block_size: int) -> int:
        return programs.block_bytes(self.cfg, block_size)

    def init_pool(self, kv_blocks: int, block_size: int) -> None:
        self.pool = init_paged_cache(self.cfg, kv_blocks, block_size)

    def set_pools(self, pools: tuple) -> None:
        (self.pool,) = pools

    def check(self, controls, adapter: int) -> None:
        if controls.shapes_logits or controls.logprobs or adapter:
            raise ValueError(
                "logprobs, penalties, logit_bias, min_tokens and adapters are not supported "
                "with speculative decoding (serve.draft)"
            )

    def ids(self, sched, group: list[int], num_slots: int) -> np.ndarray:
        """A round runs slots 0..rows-1 (those not in the group are not live)."""
        return np.arange(sched.rows(group[-1] + 1), dtype=np.int32)

    def run(self, engine, ids: np.ndarray, live: np.ndarray, inputs: tuple, steps: int):
        """One round: (tokens (rows, k + 1), how many of them each row produced, None)."""
        tables, _, live = inputs
        tokens, produced, engine.slots, engine.pool, self.pool = self.program(
            engine.params,
            self.params,
            engine.slots,
            engine.pool,
            self.pool,
            tables,
            live,
            rows=len(ids),
        )
        return tokens, produced, None

    def compile_thunk(self, engine, shapes: tuple, rows: int):
        params, dparams, slots, _, pool, dpool = shapes
        tables = jax.ShapeDtypeStruct((engine.num_slots, engine.width), jnp.int32)
        live = jax.ShapeDtypeStruct((rows,), jnp.bool_)
        args = (params, dparams, slots, pool, dpool, tables, live)
        return programs.aot(self.program, *args, rows=rows)

    def dispatched(self, request, steps: int) -> None:
        pass  # (the round's advance: known once delivered)

    def delivered(self, request, produced: int) -> None:
        request.position += produced

    def must_deliver(self) -> bool:
        return True
