"""Host tier of the adapter caches: converted LoRAs in host RAM (pinned on CUDA), a bytes-bounded LRU.

Loading (read the file through fsspec, convert its keys, check it against the model, pin) runs on this cache's own
loader thread, never on the engine's GPU thread: a request waits for its adapters before the step scheduler sees
it, while other requests keep denoising. The GPU tier (fixed-rank slots) is core/lora_apply.py.

Eviction drops the cache's reference: its bytes leave `bytes_held` at once, and the memory goes back as soon as no
queued or running request still holds the adapter (requests keep theirs alive until they finish).
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from core.lora_library import LoraInfo, LoraLibrary

log = logging.getLogger(__name__)


@dataclass(eq=False)
class LoadedLora:
    name: str
    mtime: float
    layers: dict  # (component, module) -> (down, up, scale), see core/lora_convert.py
    nbytes: int
    rank: int
    load_s: float = 0.0
    components: set = field(default_factory=set)


class HostLoraCache:
    def __init__(self, library: LoraLibrary, layers: dict, budget_bytes: int, pin: bool = False,
                 unet_config=None, targets: set[str] | None = None, dtype=None):
        self.library, self.layers, self.budget, self.dtype = library, layers, budget_bytes, dtype
        self.pin, self.unet_config, self.targets = pin, unet_config, targets
        self._lock = threading.Lock()
        self._lru: collections.OrderedDict[str, LoadedLora] = collections.OrderedDict()
        self._pending: dict[str, Future] = {}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lora-load")
        self.loads = self.hits = self.evictions = 0

    @property
    def bytes_held(self) -> int:
        with self._lock:
            return sum(a.nbytes for a in self._lru.values())

    def resident(self) -> list[str]:
        with self._lock:
            return list(self._lru)

    def get(self, info: LoraInfo) -> LoadedLora | None:
        """The resident adapter for this file version (touching its LRU position), or None."""
        with self._lock:
            got = self._lru.get(info.name)
            if got is not None and got.mtime == info.mtime:
                self._lru.move_to_end(info.name)
                return got
            return None

    def fetch(self, infos: list[LoraInfo]) -> Future:
        """A Future of [LoadedLora] in order: done at once when all are resident, else when the loader thread
        has read them (its exception: a LoraMismatch or OSError of the first that failed)."""
        futures = []
        for info in infos:
            got = self.get(info)
            if got is not None:
                self.hits += 1
                done: Future = Future()
                done.set_result(got)
                futures.append(done)
                continue
            with self._lock:
                fut = self._pending.get(info.name)
                if fut is None:
                    fut = self._pending[info.name] = self._pool.submit(self._load, info)
            futures.append(fut)
        with self._lock:  # a smaller budget (or hits only) still trims, keeping the most recent
            if self._lru:
                self._evict_over_budget(keep=next(reversed(self._lru)))
        return _gather(futures)

    def _load(self, info: LoraInfo) -> LoadedLora:
        from core.lora_convert import convert

        t0 = time.perf_counter()
        try:
            tensors, meta = self.library.read(info)
            layers = convert(tensors, meta, info.layout, self.layers, self.unet_config, self.targets)
            # alpha/rank folded into up once here, in the model's dtype: a GPU slot write is two plain copies
            layers = {k: (d.to(self.dtype), (u * s).to(self.dtype), s) for k, (d, u, s) in layers.items()}
            if self.pin:
                layers = {k: (d.pin_memory(), u.pin_memory(), s) for k, (d, u, s) in layers.items()}
            nbytes = sum(d.numel() * d.element_size() + u.numel() * u.element_size() for d, u, _ in layers.values())
            loaded = LoadedLora(info.name, info.mtime, layers, nbytes, max(int(d.shape[0]) for d, _, _ in
                                                                           layers.values()),
                                time.perf_counter() - t0, {c for c, _ in layers})
            with self._lock:
                self._lru[info.name] = loaded
                self._lru.move_to_end(info.name)
                self.loads += 1
                self._evict_over_budget(keep=info.name)
            log.info("LoRA %s loaded to host (%.1f MB, rank %d) in %.3fs", info.name, nbytes / 2**20, loaded.rank,
                     loaded.load_s)
            return loaded
        finally:
            with self._lock:
                self._pending.pop(info.name, None)

    def _evict_over_budget(self, keep: str) -> None:
        while sum(a.nbytes for a in self._lru.values()) > self.budget and len(self._lru) > 1:
            name = next(iter(self._lru))
            if name == keep:
                break
            self._lru.pop(name)
            self.evictions += 1
            log.info("LoRA %s evicted from the host cache", name)

    def evict(self, name: str) -> bool:
        with self._lock:
            if self._lru.pop(name, None) is None:
                return False
            self.evictions += 1
            return True

    def stats(self) -> dict:
        return {"host_bytes": self.bytes_held, "host_budget_bytes": self.budget, "resident": self.resident(),
                "loads": self.loads, "hits": self.hits, "evictions": self.evictions}

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _gather(futures: list[Future]) -> Future:
    out: Future = Future()
    if not futures:
        out.set_result([])
        return out
    left = [len(futures)]
    lock = threading.Lock()

    def one_done(_f: Future) -> None:
        with lock:
            left[0] -= 1
            if left[0] or out.done():
                return
        err = next((f.exception() for f in futures if f.exception() is not None), None)
        if err is not None:
            out.set_exception(err)
        else:
            out.set_result([f.result() for f in futures])

    for f in futures:
        f.add_done_callback(one_done)
    return out
