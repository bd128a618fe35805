"""A chat's cached prefix: the language model's keys and values of the last prompt and answer.

Turn N+1 of a chat starts with everything turn N read and wrote (the image tokens, the earlier
turns, the answer), so a backend that keeps turn N's key/value cache only has to prefill the new
question. Each chat session holds one `PrefixSlot` (in its `ChatSession`, so it goes when Gradio
drops the session); one `PrefixBudget` per app bounds the bytes held by all slots together,
emptying the least recently used one when a new prefix needs room.

What is cached is opaque here (a transformers cache on the local backend): this module only
counts bytes and decides which prefix may stay. Whether a cached prefix fits the next prompt is
the backend's check (token ids compared, see `common_prefix_length`). Torch-free.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class CachedPrefix:
    """The state after a turn: `cache` holds the keys and values of exactly `token_ids`."""

    key: Hashable  # what the ids alone do not say: the model and the image behind the image tokens
    token_ids: tuple[int, ...]
    cache: Any
    nbytes: int


def common_prefix_length(first: Sequence[int], second: Sequence[int]) -> int:
    """How many leading token ids the two sequences share."""
    length = 0
    for a, b in zip(first, second, strict=False):  # sequences of any lengths
        if a != b:
            break
        length += 1
    return length


class PrefixSlot:
    """One chat session's place for at most one cached prefix.

    `take()` hands the prefix over and empties the slot: a request that uses (and extends) the
    cache owns it until it `keep()`s the result, so two requests of one session never share a
    cache, and a prefix in use is never evicted under it.
    """

    def __init__(self, budget: PrefixBudget):
        self._budget = budget
        self._prefix: CachedPrefix | None = None

    @property
    def held(self) -> CachedPrefix | None:
        """The prefix waiting for the next turn (None: nothing kept)."""
        return self._prefix

    def take(self) -> CachedPrefix | None:
        with self._budget.lock:
            prefix, self._prefix = self._prefix, None
            return prefix

    def keep(self, prefix: CachedPrefix) -> None:
        """Keep `prefix` for the next turn (in place of any other), if the budget allows."""
        self._budget.keep(self, prefix)

    def clear(self) -> None:
        self.take()


class PrefixBudget:
    """At most `max_bytes` of cached prefixes at once, over all chat sessions of one app.

    Slots are held by weak reference: a session Gradio drops (its time to live, --max-sessions)
    frees its prefix as before, and the budget forgets it. Thread-safe: requests run in worker
    threads, and the local backend keeps a prefix from its generation thread.
    """

    def __init__(self, max_bytes: int):
        if max_bytes < 1:
            raise ValueError(f"PrefixBudget needs at least 1 byte; got {max_bytes}.")
        self.max_bytes = max_bytes
        self.lock = threading.Lock()
        self._order: OrderedDict[int, weakref.ref[PrefixSlot]] = OrderedDict()  # oldest first
        self.evictions = 0

    def slot(self) -> PrefixSlot:
        """A new, empty slot for one chat session."""
        return PrefixSlot(self)

    def keep(self, slot: PrefixSlot, prefix: CachedPrefix) -> None:
        with self.lock:
            key = id(slot)
            self._order.pop(key, None)
            slot._prefix = None
            if prefix.nbytes > self.max_bytes:
                return  # would push out every other session's prefix and still not fit
            slot._prefix = prefix
            self._order[key] = weakref.ref(slot)
            self._evict_over_limit(keep=key)

    def _live(self) -> list[tuple[int, PrefixSlot]]:
        """The slots that hold a prefix, oldest first (dropped and emptied ones are forgotten)."""
        live = []
        for key, ref in list(self._order.items()):
            slot = ref()
            if slot is None or slot._prefix is None:
                del self._order[key]
            else:
                live.append((key, slot))
        return live

    def _evict_over_limit(self, keep: int) -> None:
        live = self._live()
        held = sum(slot._prefix.nbytes for _, slot in live if slot._prefix is not None)
        for key, slot in live:
            if held <= self.max_bytes:
                break
            if key == keep or slot._prefix is None:
                continue
            held -= slot._prefix.nbytes
            slot._prefix = None
            del self._order[key]
            self.evictions += 1

    @property
    def held_bytes(self) -> int:
        with self.lock:
            return sum(slot._prefix.nbytes for _, slot in self._live() if slot._prefix is not None)

    def __len__(self) -> int:
        """How many sessions hold a cached prefix now."""
        with self.lock:
            return len(self._live())
