"""VRAM budgets: arithmetic, AUTO level choice, batch capping and clean rejection (CPU: explicit GiB budgets)."""
from __future__ import annotations

import pytest

from core.config import MemoryConfig, MemoryLevel
from core.engine import Engine
from core.memory import (GiB, LEVEL_ORDER, ModelFootprint, budget_bytes, estimate_peak_bytes, max_batch_within,
                         pick_level, usable)
from core.schemas import GenerationError, GenerationRequest

# fp16 weight bytes of the real SDXL architecture (unet 2.57B params, text encoders 0.82B, VAE 84M).
SDXL = ModelFootprint(unet=int(5.14e9), text_encoders=int(1.64e9), vae=int(0.17e9))


def test_budget_is_explicit_gib_or_fraction_of_total_and_none_on_cpu():
    assert budget_bytes(MemoryConfig(vram_budget_gib=4), "cpu") == 4 * GiB
    assert budget_bytes(MemoryConfig(gpu_fraction=0.25), "cpu") is None  # no VRAM to take a fraction of


def test_estimates_shrink_level_by_level_and_grow_with_batch_and_size():
    peaks = [estimate_peak_bytes(SDXL, "sdxl", lv, 1024, 1024, 1) for lv in LEVEL_ORDER]
    assert peaks == sorted(peaks, reverse=True) and peaks[0] > peaks[1] > peaks[2]  # fastest level, largest peak
    batch4 = [estimate_peak_bytes(SDXL, "sdxl", lv, 1024, 1024, 4) for lv in LEVEL_ORDER]
    assert batch4[2] > batch4[3]  # ULTRA decodes one image at a time
    none = peaks[0]
    assert estimate_peak_bytes(SDXL, "sdxl", MemoryLevel.NONE, 1024, 1024, 4) > none
    assert estimate_peak_bytes(SDXL, "sdxl", MemoryLevel.NONE, 512, 512, 1) < none
    less_streamed = estimate_peak_bytes(SDXL, "sdxl", MemoryLevel.BALANCED, 1024, 1024, 1, streamed_share=0.3)
    assert less_streamed > peaks[1]


@pytest.mark.parametrize("budget_gib", [4, 8, 16, 40])
def test_auto_picks_the_fastest_level_that_fits(budget_gib):
    level = pick_level(SDXL, "sdxl", budget_gib * GiB, 1024, 1024)
    room = usable(budget_gib * GiB)  # the cap holds reserved memory: estimates leave the allocator headroom
    assert room < budget_gib * GiB
    if budget_gib > 4:
        assert estimate_peak_bytes(SDXL, "sdxl", level, 1024, 1024, 1) <= room
    faster = LEVEL_ORDER[:LEVEL_ORDER.index(level)]
    assert all(estimate_peak_bytes(SDXL, "sdxl", lv, 1024, 1024, 1) > room for lv in faster)


def test_auto_with_no_budget_is_none_and_with_a_tiny_budget_the_smallest_estimate():
    assert pick_level(SDXL, "sdxl", None, 1024, 1024) == MemoryLevel.NONE
    smallest = min(LEVEL_ORDER, key=lambda lv: estimate_peak_bytes(SDXL, "sdxl", lv, 1024, 1024, 1))
    assert pick_level(SDXL, "sdxl", 1, 1024, 1024) == smallest


def test_max_batch_within_budget_is_monotonic_and_zero_when_nothing_fits():
    caps = [max_batch_within(SDXL, "sdxl", MemoryLevel.NONE, b * GiB, 1024, 1024, 16) for b in (8, 12, 20, 40)]
    assert caps == sorted(caps) and caps[0] == 0 and caps[-1] >= 2
    assert max_batch_within(SDXL, "sdxl", MemoryLevel.NONE, None, 1024, 1024, 16) == 16


@pytest.fixture(scope="module")
def budget_engine(make_config):
    """tiny-sd with a VRAM budget that fits a few 64x64 images per call, nothing near 1024x1024."""
    return Engine(make_config(memory={"vram_budget_gib": 0.03}, limits={"max_batch_size": 8})).load()


def test_batches_are_capped_to_the_budget(budget_engine):
    cap = budget_engine.max_batch_for(64, 64)
    assert 1 <= cap < 8
    out = budget_engine.generate([GenerationRequest(prompt="a", seed=1, num_images=8)])[0]
    assert len(out.images) == 8 and out.batch_size == cap


def test_request_that_cannot_fit_is_rejected_cleanly_and_the_engine_stays_usable(budget_engine):
    big, small = budget_engine.generate([GenerationRequest(prompt="a", width=1024, height=1024, seed=1),
                                         GenerationRequest(prompt="b", seed=2)])
    assert isinstance(big, GenerationError) and big.kind == "capacity" and big.field == "width"
    assert "budget" in big.message and "1024x1024" in big.message
    assert small.images[0].seed == 2


def test_a_shared_gpu_budget_leaves_room_for_each_process_context():
    from core.memory import CONTEXT_RESERVE, fraction_budget

    total = 80 * GiB
    assert fraction_budget(total, 1.0) == total  # a whole GPU: nothing else shares it
    quarters = [fraction_budget(total, 0.25) for _ in range(4)]
    assert quarters[0] == 20 * GiB - CONTEXT_RESERVE
    assert sum(quarters) + 4 * CONTEXT_RESERVE == total  # four replicas and their contexts fit exactly


@pytest.mark.parametrize("level,offload,expected", [
    ("none", "group-block", None), ("balanced", "auto", "stream"), ("aggressive", "auto", "stream"),
    ("ultra", "auto", "stream"), ("balanced", "model", "model"), ("ultra", "sequential", "sequential"),
])
def test_offload_strategy_per_level(level, offload, expected):
    from core.config import MemoryLevel
    from core.memory import offload_strategy

    assert offload_strategy(MemoryLevel(level), offload) == expected


def test_unknown_offload_strategy_is_rejected_naming_the_key():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="offload"):
        MemoryConfig(offload="disk")


def tiny_run(pipe):
    import torch

    return pipe(prompt="a red fox", num_inference_steps=2, width=64, height=64, output_type="np",
                generator=torch.Generator("cpu").manual_seed(3)).images


def tiny_resident_and_fresh():
    """The images of a resident tiny-sd pipeline, and a fresh one to offload."""
    import torch

    from core.embedded import build_pipeline

    return (tiny_run(build_pipeline("tiny-sd", 0, device="cpu", dtype=torch.float32)),
            build_pipeline("tiny-sd", 0, device="cpu", dtype=torch.float32))


def test_block_streaming_groups_each_transformer_block_and_resnet_and_keeps_the_pixels():
    """group-block's grouping, checked without CUDA (no side stream): every transformer block and resnet is its own
    group (diffusers' default would make each whole down/up block one), and the output is unchanged."""
    import torch
    from diffusers.hooks.group_offloading import _GROUP_OFFLOADING

    from core.memory import apply_block_streaming

    resident, pipe = tiny_resident_and_fresh()
    apply_block_streaming(pipe, torch.device("cpu"), torch.device("cpu"), use_stream=False)
    leaders = {name for name, m in pipe.unet.named_modules()
               if getattr(m, "_diffusers_hook", None) is not None
               and (hook := m._diffusers_hook.get_hook(_GROUP_OFFLOADING)) is not None and hook.group.onload_leader is m}
    blocks = {name for name, _ in pipe.unet.named_modules()
              if name.rsplit(".", 2)[-2:-1] in (["transformer_blocks"], ["resnets"])}
    assert blocks and blocks <= leaders
    assert not {"down_blocks.0", "down_blocks.1", "up_blocks.0", "up_blocks.1"} & leaders
    text_layers = {name for name, _ in pipe.text_encoder.named_modules() if name.rsplit(".", 2)[-2:-1] == ["layers"]}
    assert text_layers and all(getattr(pipe.text_encoder.get_submodule(n), "_diffusers_hook", None) for n in text_layers)
    assert (tiny_run(pipe) == resident).all()


def test_block_streaming_with_side_streams_builds_one_prefetch_chain_and_keeps_the_pixels(monkeypatch):
    """The streamed form (what runs on CUDA) exercised on the CPU with a stand-in stream: diffusers' nested block
    modules would each register a lazy-prefetch hook and fail ("layer_execution_tracker already exists"); with
    one chain per model the first call traces every group, later calls prefetch along it, pixels unchanged."""
    import diffusers.hooks
    import diffusers.hooks.group_offloading as go
    import torch

    from core.memory import apply_block_streaming

    class StandInStream:  # CPU torch has no stream that synchronizes; order is trivially kept on the CPU
        def synchronize(self):
            pass

    def streamed_on_cpu(module, *, onload_device, offload_device, offload_type, num_blocks_per_group, use_stream,
                        record_stream, block_modules):
        assert use_stream and record_stream
        config = go.GroupOffloadingConfig(
            onload_device=onload_device, offload_device=offload_device, offload_type=go.GroupOffloadingType(offload_type),
            non_blocking=False, record_stream=False, low_cpu_mem_usage=True, num_blocks_per_group=num_blocks_per_group,
            stream=StandInStream(), block_modules=block_modules)
        go._apply_group_offloading(module, config)

    monkeypatch.setattr(diffusers.hooks, "apply_group_offloading", streamed_on_cpu)
    monkeypatch.setattr(torch.cpu, "current_stream", lambda *a, **k: StandInStream())
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *a, **k: self)  # no pinned memory without CUDA

    resident, pipe = tiny_resident_and_fresh()
    apply_block_streaming(pipe, torch.device("cpu"), torch.device("cpu"), use_stream=True)
    lazy = [name for name, m in pipe.unet.named_modules()
            if getattr(m, "_diffusers_hook", None) is not None
            and m._diffusers_hook.get_hook(go._LAZY_PREFETCH_GROUP_OFFLOADING) is not None]
    assert lazy == [""]  # the UNet itself, no nested chain
    assert (tiny_run(pipe) == resident).all()  # first call: traces the order
    chained = [h.next_group for _, m in pipe.unet.named_modules() if getattr(m, "_diffusers_hook", None) is not None
               and (h := m._diffusers_hook.get_hook(go._GROUP_OFFLOADING)) is not None and h.next_group is not None]
    blocks = [name for name, _ in pipe.unet.named_modules() if name.rsplit(".", 2)[-2:-1] in (["transformer_blocks"], ["resnets"])]
    assert len(chained) >= len(blocks)  # every block is prefetched by its predecessor
    assert (tiny_run(pipe) == resident).all()  # prefetching calls
