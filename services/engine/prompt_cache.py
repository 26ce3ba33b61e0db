"""An LRU cache of text-encoder outputs, keyed by model and token ids.

Prompts repeat (the empty negative prompt above all): a hit skips the text encoder.
The unconditional embedding (token ids of "") is pinned, so it is computed once per model.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import numpy as np


class PromptCache:
    def __init__(self, capacity: int, on_lookup: Callable[[str, bool], None] | None = None):
        self.capacity = capacity
        self._entries: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._pinned: dict[tuple, np.ndarray] = {}
        self._on_lookup = on_lookup  # (model, hit) -> None, for metrics

    @staticmethod
    def key(model: str, ids: np.ndarray) -> tuple:
        return (model, ids.tobytes())

    def get(self, model: str, ids: np.ndarray) -> np.ndarray | None:
        key = self.key(model, ids)
        value = self._pinned.get(key)
        if value is None:
            value = self._entries.get(key)
            if value is not None:
                self._entries.move_to_end(key)
        if self._on_lookup is not None:
            self._on_lookup(model, value is not None)
        return value

    def put(self, model: str, ids: np.ndarray, embedding: np.ndarray, pin: bool = False) -> None:
        key = self.key(model, ids)
        if pin:
            self._pinned[key] = embedding
            return
        if self.capacity <= 0:
            return
        self._entries[key] = embedding
        self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries) + len(self._pinned)
