"""A small LRU for vision features, bounded in entries and in bytes, safe across threads.

Keys carry the image's content hash (not the session), so two visitors sending the same photo
share the work but never see each other's state: the values are model features only.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass

import torch


@dataclass
class CacheStats:
    entries: int
    bytes: int
    hits: int
    misses: int
    evictions: int
    max_entries: int
    max_bytes: int


class FeatureCache:
    def __init__(self, max_entries: int = 256, max_bytes: int = 512 * 1024 * 1024):
        if max_entries < 0 or max_bytes < 0:
            raise ValueError("Cache limits must be zero (disabled) or positive.")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._items: OrderedDict[Hashable, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = self.evictions = 0

    @staticmethod
    def _size(value: torch.Tensor) -> int:
        return value.numel() * value.element_size()

    def get(self, key: Hashable) -> torch.Tensor | None:
        with self._lock:
            value = self._items.get(key)
            if value is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key: Hashable, value: torch.Tensor) -> None:
        size = self._size(value)
        with self._lock:
            if size > self.max_bytes or self.max_entries == 0:
                return
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= self._size(old)
            self._items[key] = value
            self._bytes += size
            while len(self._items) > self.max_entries or self._bytes > self.max_bytes:
                _, evicted = self._items.popitem(last=False)
                self._bytes -= self._size(evicted)
                self.evictions += 1

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(
                len(self._items),
                self._bytes,
                self.hits,
                self.misses,
                self.evictions,
                self.max_entries,
                self.max_bytes,
            )
