"""LoRAs per request: latency with 0/1/3 LoRAs, adapter switch cost by tier, and 8 requests with 8 different LoRAs
in one mixed batch vs grouped by adapter set vs sequential (JSON).

    python -m benchmarks.lora_bench --model sdxl --steps 30 --rank 32 -o lora-sdxl.json
    python -m benchmarks.lora_bench --model sd15 --steps 30 --compile reduce-overhead
    python -m benchmarks.lora_bench --model tiny-sd --device cpu --steps 2 --rounds 1   (smoke test)

The embedded full-size random-weight sd15/sdxl (speed does not depend on weight values) with LoRAs of random
weights written to a temp folder in kohya layout, on every attention layer of the UNet (what kohya trains by
default) at `--rank`. Measured through the engine's own path (request resolution, host cache, GPU slots, the
step scheduler):
- latency_s: one request alone, 0 / 1 / 3 LoRAs (median of --rounds);
- switch_ms: putting a new adapter set in a GPU slot when it is already in a slot (gpu), in the host cache (host:
  the issue's goal is <= 50 ms), or only on disk (disk: read + key conversion + slot write); plus the compiled
  graphs counted before/after (recompiles: must stay 0);
- mixed8: images/s for 8 concurrent requests with 8 different LoRAs in one mixed batch (per-sample deltas), the
  same grouped by adapter set (one set per UNet call: gpu_slots 1), one after another (sequential), and 8
  requests sharing one LoRA (shared: the goal is mixed >= 0.85 x shared).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.json_report import emit
from benchmarks.model_args import add_model_args, output_size


def _sync(device) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def write_loras(engine, folder: Path, count: int, rank: int) -> list[str]:
    """`count` random kohya-layout LoRAs on every attention layer of the engine's UNet."""
    import torch
    from safetensors.torch import save_file

    from core.lora_convert import model_layers
    from core.lora_runtime import unet_targets

    layers = model_layers(engine.pipe)
    names = []
    for i in range(count):
        gen = torch.Generator().manual_seed(i)
        tensors = {}
        for name in unet_targets(layers, "attention"):
            shape = layers[("unet", name)]
            kernel = shape.kernel if shape.kind == "conv" else ()
            base = "lora_unet_" + name.replace(".", "_")
            tensors[base + ".lora_down.weight"] = torch.randn(rank, shape.in_features, *kernel, generator=gen,
                                                              dtype=torch.float16) * 0.01
            tensors[base + ".lora_up.weight"] = torch.randn(shape.out_features, rank, *((1, 1) if kernel else ()),
                                                            generator=gen, dtype=torch.float16) * 0.01
            tensors[base + ".alpha"] = torch.tensor(float(rank))
        save_file(tensors, str(folder / f"bench{i}.safetensors"))
        names.append(f"bench{i}")
    return names


def run(model: str, width: int, height: int, steps: int, rank: int, rounds: int, device: str, compile_mode: str,
        cache_dir: str | None) -> dict:
    import torch

    from core.config import EngineConfig
    from core.engine import Engine
    from core.schemas import GenerationRequest
    from core.step_scheduler import unique_graphs

    folder = Path(tempfile.mkdtemp(prefix="sdserve-lora-bench-"))
    extra = {"cache_dir": cache_dir} if cache_dir else {}
    # compiled: only the buckets the benchmark runs (1 and 8 images), half the default's compile time
    optimization = {"warmup_steps": 2 if compile_mode != "none" else 0, "compile": compile_mode,
                    "warmup_shapes": [(width, height, 8)], "batch_buckets": [1, 8]}
    engine = Engine(EngineConfig(name=model, source=f"embedded:{model}", device=device, optimization=optimization,
                                 limits={"max_batch_size": 8},
                                 loras={"uri": str(folder), "max_rank": 3 * rank, "gpu_slots": 8}, **extra)).load()
    names = write_loras(engine, folder, 8, rank)
    lora = engine.lora
    started = time.perf_counter()

    def note(what: str) -> None:  # progress on stderr: a run cut off by a time limit still says how far it got
        print(f"lora_bench {model}: {what} at {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
    note(f"loaded in {engine.load_s + engine.warmup_s:.1f} s, LoRAs written")

    def req(seed: int, used: list[str]) -> GenerationRequest:
        return GenerationRequest(prompt="a lighthouse at dusk", width=width, height=height, steps=steps, seed=seed,
                                 loras=[{"name": n, "weight": 0.8} for n in used])

    def timed(requests: list[GenerationRequest]) -> float:
        _sync(engine.device)
        t0 = time.perf_counter()
        outs = engine.generate(requests)
        _sync(engine.device)
        bad = [o for o in outs if hasattr(o, "kind")]
        if bad:
            raise RuntimeError(f"benchmark request failed: {bad[0]}")
        return time.perf_counter() - t0

    for used in ([], names[:1], names[:3]):  # warm-up: kernels, host cache, slots
        timed([req(0, used)])
    graphs = unique_graphs()
    note("warmed up")
    latency = {}
    for label, used in (("0", []), ("1", names[:1]), ("3", names[:3])):
        latency[label] = round(statistics.median(timed([req(r, used)]) for r in range(rounds)), 5)
    note(f"latency {latency}")

    def switch(tier: str) -> float:
        """ms to put a fresh adapter set in a GPU slot from `tier` (gpu: already in a slot)."""
        info = lora.library.get(names[5])
        if tier == "disk":
            lora.cache.evict(names[5])
        if tier != "gpu":
            lora.slots.clear()
        _sync(engine.device)
        t0 = time.perf_counter()
        (loaded,) = lora.cache.fetch([info]).result()
        lora.slots.assign((names[5], info.mtime, 0.8), [(loaded, 0.8)], set())
        _sync(engine.device)
        return (time.perf_counter() - t0) * 1000

    switch_ms = {}
    for tier in ("disk", "host", "gpu"):
        switch(tier)
        switch_ms[tier] = round(statistics.median(switch(tier) for _ in range(max(rounds, 3))), 3)

    def throughput(requests: list[GenerationRequest], sequential: bool = False) -> float:
        if sequential:
            seconds = sum(timed([r]) for r in requests)
        else:
            seconds = timed(requests)
        return len(requests) / seconds

    note(f"switch {switch_ms}")
    lora.cache.fetch([lora.library.get(n) for n in names]).result()  # all 8 in the host cache: they start together
    mixed_reqs = [req(i, [names[i]]) for i in range(8)]
    shared_reqs = [req(i, [names[0]]) for i in range(8)]
    modes: dict[str, list[float]] = {"mixed": [], "grouped": [], "sequential": [], "shared": []}
    for _ in range(rounds):  # interleaved so drift hits all alike
        modes["mixed"].append(throughput(mixed_reqs))
        modes["shared"].append(throughput(shared_reqs))
        lora.cfg.gpu_slots = 1  # one adapter set per UNet call: what splitting batches per adapter does
        try:
            modes["grouped"].append(throughput(mixed_reqs))
        finally:
            lora.cfg.gpu_slots = 8
        modes["sequential"].append(throughput(mixed_reqs, sequential=True))
        note(f"round {len(modes['mixed'])}: " + ", ".join(f"{k} {v[-1]:.3f}" for k, v in modes.items()))
    mixed8 = {k: round(statistics.median(v), 4) for k, v in modes.items()}
    mixed8["mixed_vs_shared"] = round(mixed8["mixed"] / mixed8["shared"], 4)
    stats = lora.stats()
    return {"benchmark": "lora", "model": model, "family": engine.family, "device": str(engine.device),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "width": width, "height": height, "steps": steps, "rank": rank, "rounds": rounds,
            "compile": compile_mode, "lora_file_bytes": lora.library.get(names[0]).size_bytes,
            "gpu_slot_bytes": stats["gpu_slot_bytes"], "latency_s": latency, "switch_ms": switch_ms,
            "images_per_s": mixed8, "recompiles": unique_graphs() - graphs,
            "serving_recompiles": engine.info()["scheduling"]["recompiles"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--compile", default="none", choices=["none", "default", "reduce-overhead", "max-autotune"])
    p.add_argument("--cache-dir", default=None, help="embedded models / compile caches (default: SDSERVE_CACHE_DIR)")
    p.add_argument("-o", "--output", help="also write the JSON here")
    a = p.parse_args(argv)
    width, height = output_size(a)
    report = run(a.model, width, height, a.steps, a.rank, a.rounds, a.device, a.compile,
                 a.cache_dir)
    emit(report, a.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
