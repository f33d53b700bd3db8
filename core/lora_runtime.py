"""The engine's LoRA support: request resolution, waiting for adapters off the GPU thread, per-call slots.

Flow of a request with LoRAs: `resolve` takes `<lora:name:weight>` tags out of the prompt, merges them with the
`loras` field and checks names (unknown -> validation error on `loras.N.name` listing what exists), base family and
total rank; `prepare` tells the engine when the job's adapters are in the host cache, and only then does the job go
to the step scheduler (loading runs on the cache's loader thread, so other requests keep denoising); in the scheduler, the job's text is encoded with
its text-encoder LoRAs (`text_encoding`), a call holds at most `gpu_slots` distinct adapter sets (`limit_sets`),
and `prepare_call` fills the slots and the row -> slot index before each UNet call (core/lora_apply.py).
"""
from __future__ import annotations

import logging
import weakref
from concurrent.futures import Future

from core.lora_library import LoraLibrary
from core.prompt_syntax import extract_loras, merge_loras
from core.schemas import GenerationError, GenerationRequest, LoraRef

log = logging.getLogger(__name__)
LISTED_NAMES = 50  # an unknown-name error lists at most this many


def unet_targets(layers: dict, mode: str) -> list[str]:
    """UNet layers that get adapter slots: attention = everything inside transformer models (`attentions.`:
    attn q/k/v/out, feed-forward, proj_in/out); all = every Linear and Conv2d but conv_in/conv_out."""
    names = [name for comp, name in layers if comp == "unet"]
    if mode == "all":
        return [n for n in names if n not in ("conv_in", "conv_out")]
    return [n for n in names if ".attentions." in f".{n}"]


class LoraRuntime:
    def __init__(self, engine):
        from core.lora_apply import TextEncoderLoras, UnetSlots
        from core.lora_cache import HostLoraCache
        from core.lora_convert import model_layers

        cfg = engine.config.loras
        self.engine, self.cfg = engine, cfg
        pipe = engine.pipe
        self.library = LoraLibrary(cfg.uri)
        layers = model_layers(pipe)
        targets = unet_targets(layers, cfg.targets)
        cuda = str(engine.device).startswith("cuda")
        self.cache = HostLoraCache(self.library, layers, cfg.host_cache_mb * 2**20, pin=cuda,
                                   unet_config=pipe.unet.config, targets=set(targets), dtype=engine.dtype)
        compiled = engine.config.optimization.compile != "none"
        self.slots = UnetSlots(pipe.unet, targets, layers, cfg.gpu_slots, cfg.max_rank,
                               2 * engine.config.limits.max_batch_size, engine.device, engine.dtype,
                               always_on=compiled)
        self.text = TextEncoderLoras(pipe, layers, engine.device, engine.dtype)
        self._adapters: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # Job -> (set key, adapters)
        self.library.scan()
        if engine.level.value != "none" and cuda:
            log.warning("LoRA slots are meant for memory level none (level %s offloads the layers they hook)",
                        engine.level.value)
        log.info("LoRA library %s: %d file(s); %d UNet layers x %d slots of rank %d (%.1f MB)", cfg.uri,
                 len(self.library.names()), len(targets), cfg.gpu_slots, cfg.max_rank,
                 self.slots.slot_bytes / 2**20)

    # ------------------------------------------------------------------ requests (any thread)
    def resolve(self, req: GenerationRequest) -> dict:
        """{prompt, loras} for the resolved request; raises GenerationError(validation) naming the field."""
        try:
            prompt, tags = extract_loras(req.prompt)
        except ValueError as err:
            raise GenerationError(f"prompt: {err}", "validation", "prompt") from None
        if not prompt.strip():
            raise GenerationError("prompt: nothing left to draw once the <lora:...> tags are removed", "validation",
                                  "prompt")
        merged = merge_loras([(r.name, r.weight) for r in req.loras], tags)
        if len(merged) > self.cfg.max_loras:
            raise GenerationError(f"loras: at most {self.cfg.max_loras} LoRAs per request (got {len(merged)})",
                                  "validation", "loras")
        refs, rank, family = [], 0, self.engine.family
        for i, (name, weight) in enumerate(merged):
            field = f"loras.{i}.name"
            try:
                ref = LoraRef(name=name, weight=weight)
            except ValueError as err:
                from core.config import format_validation_error

                raise GenerationError(f"loras.{i}: {format_validation_error(err)}", "validation",
                                      f"loras.{i}") from None
            info = self.library.get(name)
            if info is None:
                names = self.library.names()
                listed = ", ".join(names[:LISTED_NAMES]) + (" ..." if len(names) > LISTED_NAMES else "")
                raise GenerationError(f"{field}: unknown LoRA {name!r} for model {self.engine.config.name}; "
                                      f"available: {listed or '(none)'}", "validation", field)
            if info.family not in ("unknown", family):
                raise GenerationError(f"{field}: LoRA {name!r} is for {info.family}; model "
                                      f"{self.engine.config.name} is {family}", "validation", field)
            if weight != 0:
                rank += info.rank
            refs.append(ref)
        if rank > self.cfg.max_rank:
            raise GenerationError(f"loras: the LoRAs' ranks add up to {rank}, more than this model's "
                                  f"loras.max_rank {self.cfg.max_rank}", "validation", "loras")
        return {"prompt": prompt, "loras": refs}

    def prepare(self, job) -> Future:
        """A Future done once the job's adapters are in the host cache (at once when they already are), True when
        the job may run; False when it failed (a LoRA gone or not fitting this model: the job carries the
        error). Loading runs on the cache's loader thread."""
        done: Future = Future()
        refs = [r for r in job.request.loras if r.weight != 0]
        infos = []
        for r in refs:
            info = self.library.get(r.name)
            if info is None:  # deleted since resolve
                job.fail(GenerationError(f"loras: LoRA {r.name!r} is gone from the library", "validation",
                                         "loras"))
                done.set_result(False)
                return done
            infos.append(info)

        def loaded(fut: Future) -> None:
            err = fut.exception()
            if err is not None:
                from core.lora_convert import LoraMismatch

                kind = "validation" if isinstance(err, LoraMismatch) else "internal"
                job.fail(GenerationError(f"loras: cannot apply to model {self.engine.config.name}: {err}", kind,
                                         "loras"))
                done.set_result(False)
                return
            adapters = list(zip(fut.result(), [r.weight for r in refs]))
            if adapters:
                key = tuple(sorted((a.name, a.mtime, w) for a, w in adapters))
                self._adapters[job] = (key, adapters)
            done.set_result(True)

        self.cache.fetch(infos).add_done_callback(loaded)
        return done

    # ------------------------------------------------------------------ the step scheduler (GPU thread)
    def key_of(self, job) -> tuple:
        got = self._adapters.get(job)
        return got[0] if got else ()

    def text_adapters(self, job) -> bool:
        """Whether the job's LoRAs change the text encoders (then its embeddings are its own, never cached)."""
        got = self._adapters.get(job)
        return bool(got) and any(c != "unet" for lora, _ in got[1] for c in lora.components)

    def text_encoding(self, job):
        got = self._adapters.get(job)
        return self.text.active(got[1] if got else [])

    def limit_sets(self, members: list) -> list:
        """The members whose adapter sets fit the slots of one call (in order); the others wait a call."""
        allowed: set = set()
        out = []
        for s in members:
            key = self.key_of(s.job)
            if key and key not in allowed:
                if len(allowed) >= self.cfg.gpu_slots:
                    continue
                allowed.add(key)
            out.append(s)
        return out

    def prepare_call(self, samples: list, padded: int) -> None:
        keys = [self.key_of(s.job) for s in samples]
        adapters = {k: self._adapters[s.job][1] for k, s in zip(keys, samples) if k}
        self.slots.always_on = bool(self.engine.compiled)  # compiled: hooks never toggle (no retrace)
        self.slots.prepare_call(keys, adapters, [s.cfg for s in samples], padded)

    # ------------------------------------------------------------------ info
    def entries(self) -> list[dict]:
        resident = set(self.cache.resident())
        return [dict(info.public(), resident=info.name in resident) for info in self.library.entries()]

    def stats(self) -> dict:
        return dict(self.cache.stats(), gpu_slots=self.cfg.gpu_slots, gpu_slot_bytes=self.slots.slot_bytes,
                    gpu_slot_writes=self.slots.writes,
                    gpu_resident=[[n for n, _, _ in key] for key in self.slots.resident_sets()])
