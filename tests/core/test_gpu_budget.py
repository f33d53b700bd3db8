"""GPU-only (marked gpu; skipped without CUDA): the VRAM budget is enforced, and memory does not leak."""
from __future__ import annotations

import pytest

from core.engine import Engine
from core.memory import GiB
from core.schemas import GenerationError, GenerationRequest

pytestmark = pytest.mark.gpu


def test_budget_is_enforced_by_the_allocator(make_config):
    import torch

    engine = Engine(make_config(device="cuda", memory={"vram_budget_gib": 2.0})).load()
    assert engine.budget == 2 * GiB
    out = engine.generate([GenerationRequest(prompt="a", seed=1)])[0]
    assert out.images and out.peak_vram_bytes is not None and out.peak_vram_bytes < 2 * GiB
    with pytest.raises(torch.cuda.OutOfMemoryError):  # a neighbour-sized allocation is refused
        torch.empty(3 * GiB, dtype=torch.uint8, device="cuda")
    torch.cuda.set_per_process_memory_fraction(1.0)


def test_a_streamed_level_loads_and_serves_under_a_cap_the_whole_model_would_not_fit(make_config):
    """The random-weight models are built on the GPU (fast) and must leave it before the cap is set: with the build
    still there, an SDXL BALANCED replica under 5 GiB could not allocate its first copy slot (H100, 2026-11-25)."""
    import gc

    import torch

    gc.collect()  # earlier tests' engines must not count against this one's cap
    torch.cuda.empty_cache()
    try:
        engine = Engine(make_config(source="embedded:sd15", device="cuda", dtype="fp16",
                                    memory={"level": "balanced", "vram_budget_gib": 3.0},
                                    optimization={"warmup_steps": 1, "warmup_shapes": [(256, 256, 1)]})).load()
        out = engine.generate([GenerationRequest(prompt="a red fox", width=256, height=256, steps=4, seed=3)])[0]
        assert not isinstance(out, GenerationError), out
        assert torch.cuda.memory_reserved() <= 3 * GiB
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)


@pytest.mark.slow
def test_allocated_memory_returns_to_its_post_warmup_baseline(make_config):
    import torch

    engine = Engine(make_config(source="embedded:sd15", device="cuda", limits={"max_batch_size": 4},
                                optimization={"warmup_steps": 1, "warmup_shapes": [(256, 256, 4)]})).load()
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated()
    sizes = [(256, 256), (320, 256), (256, 384)]
    for i in range(125):  # 500 requests, mixed sizes and batch compositions
        w, h = sizes[i % len(sizes)]
        outs = engine.generate([GenerationRequest(prompt=f"p{i}-{j}", width=w, height=h, steps=2, seed=i * 4 + j)
                                for j in range(4)])
        assert not any(isinstance(o, GenerationError) for o in outs)
    torch.cuda.synchronize()
    # what the bytes-bounded caches keep (500 distinct prompts fill the 64 MiB prompt-embedding cache) is held on
    # purpose; anything beyond it is a leak (H100, 2026-12-07: +66 MiB without this term, the cache's 64 MiB)
    cached = sum(c.bytes for c in engine.caches.all())
    assert 0 < cached <= sum(c.max_bytes for c in engine.caches.all())
    assert torch.cuda.memory_allocated() <= baseline + cached + 16 * 1024**2


@pytest.mark.slow
@pytest.mark.parametrize("offload", ["stream", "model", "group-block"])
def test_balanced_offload_lowers_the_peak_and_keeps_the_pixels(make_config, offload):
    """BALANCED keeps weights off the GPU between uses: a lower peak than NONE, and the same images."""
    import gc
    import io

    import numpy as np
    import torch
    from PIL import Image

    def run(level, strategy="auto"):
        engine = Engine(make_config(source="embedded:sd15", device="cuda", dtype="fp16",
                                    memory={"level": level, "offload": strategy},
                                    optimization={"warmup_steps": 1, "warmup_shapes": [(512, 512, 1)]})).load()
        out = engine.generate([GenerationRequest(prompt="a red fox", width=512, height=512, steps=4, seed=7)])[0]
        assert not isinstance(out, GenerationError), out
        del engine  # its weights must not count in the next engine's peak
        gc.collect()
        torch.cuda.empty_cache()
        return out.peak_vram_bytes, np.asarray(Image.open(io.BytesIO(out.images[0].data)), dtype=np.int16)

    none_peak, none_px = run("none")
    peak, px = run("balanced", offload)
    # model offload: the SD1.5 UNet (1.6 GiB) stays while it runs, so only the text encoder and VAE (~0.4 GiB) go
    # (H100, 2026-12-07: 1.83 vs 2.25 GiB); stream: its transformer blocks (0.45 GiB) and CLIP layers stream, the
    # copy slots stay (H100 bench, 512² b1: 2.32 vs 2.69 GiB)
    saved = 0.25 if offload in ("stream", "model") else 0.5
    assert peak < none_peak - saved * GiB, (peak / GiB, none_peak / GiB)
    assert np.abs(px - none_px).mean() < 1.0  # same weights, same math: at most fp16 rounding differences
