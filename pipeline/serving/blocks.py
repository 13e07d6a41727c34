"""The paged KV cache's bookkeeping: a pool of fixed-size blocks, reference counts and a prefix
cache, all on the host (the block contents live on the device, in the engine's pools).

A request's keys and values occupy whole blocks of `block_size` positions, listed in its row of
the engine's block table. Blocks come from a free list as a request grows and go back when it
ends, so memory follows the tokens alive, not slots x context.

Prefix caching follows vLLM's scheme: a block full of prompt tokens is named by a digest of its
tokens and of its predecessor's digest (so a name stands for the whole prefix up to it, and for
the adapter that computed it). A new request walks its prompt's full blocks through that index
and shares the longest run already computed (reference counts); a block no request holds any
more stays cached in an LRU and is reused only when no never-cached block is free.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np


class OutOfBlocksError(Exception):
    """The pool has no block to give: the caller preempts a request or waits."""


def block_digests(tokens: list[int], block_size: int, salt: str = "") -> list[bytes]:
    """The prefix digest of each full block of `tokens` (a partial last block has none)."""
    digests, parent = [], salt.encode()
    for start in range(0, len(tokens) - block_size + 1, block_size):
        chunk = np.asarray(tokens[start : start + block_size], np.int64).tobytes()
        parent = hashlib.blake2b(parent + chunk, digest_size=16).digest()
        digests.append(parent)
    return digests


class BlockPool:
    """`num_blocks` blocks: allocation, sharing, freeing and the prefix cache."""

    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.prefix_caching = prefix_caching
        self.refs = np.zeros(num_blocks, np.int32)
        self.free: list[int] = list(range(num_blocks - 1, -1, -1))  # never cached: pop() first
        self.cached: OrderedDict[int, None] = OrderedDict()  # free but cached, oldest first
        self.by_digest: dict[bytes, int] = {}
        self.digest_of: dict[int, bytes] = {}
        self.hits = 0  # prompt tokens served from the prefix cache
        self.queries = 0  # prompt tokens looked up

    @property
    def available(self) -> int:
        """Blocks that can be handed out now (free, or cached and evictable)."""
        return len(self.free) + len(self.cached)

    @property
    def used(self) -> int:
        return self.num_blocks - self.available

    def allocate(self) -> int:
        if self.free:
            block = self.free.pop()
        elif self.cached:
            block, _ = self.cached.popitem(last=False)  # least recently used
            del self.by_digest[self.digest_of.pop(block)]
        else:
            raise OutOfBlocksError
        self.refs[block] = 1
        return block

    def share(self, block: int) -> int:
        if self.refs[block] == 0:
            self.cached.pop(block)
        self.refs[block] += 1
        return block

    def release(self, blocks: list[int]) -> None:
        """Drop one reference to each block; a block nobody holds is free again (kept in the
        prefix cache, most recently used last, if it has a digest)."""
        for block in reversed(blocks):  # a prefix's tail is evicted before its head
            self.refs[block] -= 1
            assert self.refs[block] >= 0, f"block {block} released twice"
            if self.refs[block] == 0:
                if block in self.digest_of:
                    self.cached[block] = None
                else:
                    self.free.append(block)

    def lookup(self, digests: list[bytes], usable: int) -> list[int]:
        """Share the longest run of cached blocks naming the prompt's first full blocks, at
        most `usable` of them (a request recomputes at least its last prompt token)."""
        found = []
        if self.prefix_caching:
            for digest in digests[:usable]:
                block = self.by_digest.get(digest)
                if block is None:
                    break
                found.append(self.share(block))
        self.queries += len(digests[:usable]) * self.block_size
        self.hits += len(found) * self.block_size
        return found

    def register(self, block: int, digest: bytes) -> None:
        """`block` now holds the full prefix block named `digest`: later prompts may share it."""
        if not self.prefix_caching or block in self.digest_of:
            return
        if digest in self.by_digest:  # computed twice (two requests at once): keep the first
            return
        self.by_digest[digest] = block
        self.digest_of[block] = digest

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (e.g. an adapter's weights changed)."""
        for block in list(self.cached):
            self.free.append(block)
        self.cached.clear()
        self.by_digest.clear()
        self.digest_of.clear()

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0
