"""Bytes-bounded LRU caches of what the engine computes from request content (seed 002's caching):

- prompt embeddings: the text encoders' outputs by (prompt, negative prompt, CFG on/off), so a repeated prompt
  skips the text encoders (the per-request parts - SDXL's size time ids, a guidance embedding - are not cached);
- init latents: the VAE encoder's latent distribution (its mean/logvar `parameters`, not a sample: each image
  draws its own sample with its own seed) of an init or masked image, by content hash + size;
- control maps: preprocessed ControlNet conditioning images (e.g. canny edges) by content hash + preprocessor.

Values are tensors or tuples/dicts of tensors (or numpy arrays); their size is counted in bytes. The caches are
used on the engine's GPU thread, and read by info() from others: a lock keeps the counters consistent.
No torch import here (sizes are read from the objects' own attributes).
"""
from __future__ import annotations

import collections
import threading
from typing import Any, Hashable

MiB = 1024 * 1024


def nbytes(value: Any) -> int:
    """Bytes held by a tensor / numpy array / PIL image, or a tuple, list or dict of them (None counts 0)."""
    if value is None:
        return 0
    if isinstance(value, (tuple, list)):
        return sum(nbytes(v) for v in value)
    if isinstance(value, dict):
        return sum(nbytes(v) for v in value.values())
    if hasattr(value, "element_size") and hasattr(value, "numel"):  # torch.Tensor
        return int(value.element_size() * value.numel())
    if hasattr(value, "nbytes"):  # numpy
        return int(value.nbytes)
    if hasattr(value, "size") and hasattr(value, "getbands"):  # PIL image
        return value.size[0] * value.size[1] * len(value.getbands())
    return 64  # small scalars and the like


class LRUCache:
    """A least-recently-used map bounded by the bytes of its values; counts hits, misses and evictions."""

    def __init__(self, name: str, max_mb: float):
        self.name, self.max_bytes = name, int(max_mb * MiB)
        self._items: collections.OrderedDict[Hashable, tuple[Any, int]] = collections.OrderedDict()
        self._lock = threading.Lock()
        self.bytes = self.hits = self.misses = self.evictions = 0

    def get(self, key: Hashable) -> Any | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return item[0]

    def put(self, key: Hashable, value: Any) -> None:
        size = nbytes(value)
        if size > self.max_bytes:  # larger than the whole cache (or the cache is off): not kept
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.bytes -= old[1]
            self._items[key] = (value, size)
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, (_, dropped) = self._items.popitem(last=False)
                self.bytes -= dropped
                self.evictions += 1

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.bytes = 0

    def __len__(self) -> int:
        return len(self._items)

    def stats(self) -> dict:
        with self._lock:
            return {"hits": self.hits, "misses": self.misses, "evictions": self.evictions, "entries": len(self._items),
                    "bytes": self.bytes, "max_bytes": self.max_bytes}


class EngineCaches:
    """The engine's three caches, sized from EngineConfig.caches."""

    def __init__(self, config):
        self.prompt_embeddings = LRUCache("prompt_embeddings", config.prompt_embeddings_mb)
        self.init_latents = LRUCache("init_latents", config.init_latents_mb)
        self.control_maps = LRUCache("control_maps", config.control_maps_mb)

    def all(self) -> tuple[LRUCache, ...]:
        return (self.prompt_embeddings, self.init_latents, self.control_maps)

    def stats(self) -> dict:
        return {c.name: c.stats() for c in self.all()}
