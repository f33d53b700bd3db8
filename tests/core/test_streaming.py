"""Partial weight streaming (BALANCED): which blocks stream, and the hooks' copy/prefetch/release cycle.

The CUDA stream and event calls are replaced by stand-ins that run in order on the CPU, so the cycle (and the
pixels) are checked here; the overlap itself is measured on the H100 (benchmarks/gpu_bench.py --memory-levels).
"""
from __future__ import annotations

import contextlib

import pytest
import torch

from core.embedded import build_pipeline
from core.streaming import (WeightStreamer, module_bytes, pick_streamed, slot_plan, stream_unet_share,
                            transformer_blocks)


class Sized(torch.nn.Module):
    def __init__(self, n: int):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(n))


@pytest.mark.parametrize("share", [0.2, 0.4, 0.6])
def test_streamed_blocks_take_about_the_share_and_are_spread_out(share):
    blocks = [Sized(1000) for _ in range(40)]
    total = sum(module_bytes(b) for b in blocks) * 1.25  # the rest of the model: resnets, convs...
    picked = pick_streamed(blocks, int(total), share)
    streamed = sum(module_bytes(blocks[i]) for i in picked)
    assert abs(streamed - share * total) <= module_bytes(blocks[0])
    gaps = {b - a for a, b in zip(picked, picked[1:])}
    assert max(gaps) - min(gaps) <= 1  # evenly interleaved: no long runs of streamed or resident blocks


def test_nothing_streams_at_share_zero_and_everything_at_one():
    blocks = [Sized(10) for _ in range(6)]
    total = sum(module_bytes(b) for b in blocks)
    assert pick_streamed(blocks, total, 0.0) == []
    assert pick_streamed(blocks, total, 1.0) == list(range(6))


class StandInStream:
    def wait_event(self, event):
        assert event.recorded  # a block is never computed before its copy was issued

    def synchronize(self):
        pass


class StandInEvent:
    recorded = False

    def record(self, stream=None):
        self.recorded = True


@pytest.fixture
def cpu_cuda_calls(monkeypatch):
    """torch.cuda's stream API as in-order CPU stand-ins (what the CPU box lacks)."""
    import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion  # noqa: F401 - imported before the
    # stand-ins: transformers evaluates `torch.cuda.Stream | None` annotations at import
    monkeypatch.setattr(torch.cuda, "Stream", lambda *a, **k: StandInStream())
    monkeypatch.setattr(torch.cuda, "Event", StandInEvent)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a, **k: StandInStream())
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *a, **k: self.clone())
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, s: None)


def run(pipe):
    return pipe(prompt="a red fox", num_inference_steps=3, width=64, height=64, output_type="np",
                generator=torch.Generator("cpu").manual_seed(5)).images


def test_partially_streamed_unet_keeps_the_pixels_and_prefetches_after_the_first_step(cpu_cuda_calls, monkeypatch):
    resident = run(build_pipeline("tiny-sd", 0, device="cpu", dtype=torch.float32))
    pipe = build_pipeline("tiny-sd", 0, device="cpu", dtype=torch.float32)
    blocks = transformer_blocks(pipe.unet)
    assert blocks
    loads: list[int] = []
    real_load = WeightStreamer._load
    monkeypatch.setattr(WeightStreamer, "_load", lambda self, i: (loads.append(i), real_load(self, i)))
    streamer = stream_unet_share(pipe.unet, "cpu", share=0.25, lookahead=1)
    assert streamer is not None and 0 < len(streamer.blocks) < len(blocks)

    slots = {t.untyped_storage().data_ptr() for slot in streamer.slots for t in slot.values()}
    assert all(t.untyped_storage().data_ptr() in slots for b in streamer.blocks for t in b.parameters())
    assert (run(pipe) == resident).all()
    n = len(streamer.blocks)
    # every streamed block copied once per UNet call (3 steps), never twice; plus the prefetch for the next call
    assert len(loads) == 3 * n + streamer.lookahead
    assert streamer.copied_bytes == sum(h.numel() * h.element_size() for i in loads for h in streamer.host[i].values())
    assert set(streamer.ready) == set(range(streamer.lookahead))  # prefetched for the next call's first step
    assert (run(pipe) == resident).all()
    assert len(loads) == 6 * n + streamer.lookahead


@pytest.mark.parametrize("lookahead", [1, 2, 3])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 16, 33, 50, 70])
def test_blocks_in_flight_together_never_share_a_device_slot(n, lookahead):
    slots = slot_plan(n, lookahead)
    window = min(n, lookahead + 1)  # the block computing and those prefetched, cyclically
    for i in range(n):
        assert len({slots[(i + k) % n] for k in range(window)}) == window
    assert max(slots) + 1 <= min(n, 2 * lookahead + 1)  # a few slots, not one per block


def test_streamed_text_encoder_keeps_its_embeddings(cpu_cuda_calls):
    from core.streaming import stream_text_encoder

    pipe = build_pipeline("tiny-sd", 0, device="cpu", dtype=torch.float32)
    ids = pipe.tokenizer(["a red fox"], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         return_tensors="pt").input_ids
    before = pipe.text_encoder(ids)[0]
    streamer = stream_text_encoder(pipe.text_encoder, "cpu")
    layers = dict(pipe.text_encoder.named_modules())["encoder.layers"]
    assert streamer.blocks == list(layers)  # the embeddings and final norm stay resident
    assert torch.equal(pipe.text_encoder(ids)[0], before)


def test_blocks_run_in_the_order_they_are_streamed():
    """The prefetch chain assumes transformer_blocks() lists blocks in execution order."""
    pipe = build_pipeline("tiny-sd", 0, device="cpu", dtype=torch.float32)
    blocks = transformer_blocks(pipe.unet)
    seen: list[int] = []
    for i, b in enumerate(blocks):
        b.register_forward_pre_hook(lambda m, a, i=i: seen.append(i))
    run(pipe)
    assert seen == list(range(len(blocks))) * 3


def test_a_call_that_breaks_off_mid_forward_does_not_leave_stale_blocks(cpu_cuda_calls):
    """An exception between blocks leaves prefetched blocks marked ready; the next call loads other blocks into
    their slots, so those marks must not survive (else a block would compute with another block's weights)."""
    resident = run(build_pipeline("tiny-sd", 0, device="cpu", dtype=torch.float32))
    pipe = build_pipeline("tiny-sd", 0, device="cpu", dtype=torch.float32)
    streamer = stream_unet_share(pipe.unet, "cpu", share=1.0, lookahead=1)
    assert streamer is not None and len(streamer.blocks) >= 3
    victim = streamer.blocks[len(streamer.blocks) // 2 + 1]

    def boom(module, args):
        raise RuntimeError("out of memory (simulated)")

    handle = victim.register_forward_pre_hook(boom)
    with pytest.raises(RuntimeError, match="simulated"):
        run(pipe)
    handle.remove()
    assert (run(pipe) == resident).all()


def test_fp8_storage_halves_the_copies_and_keeps_each_weight_within_e4m3_rounding(cpu_cuda_calls):
    resident = run(build_pipeline("tiny-sd", 0, device="cpu", dtype=torch.float32))
    pipe = build_pipeline("tiny-sd", 0, device="cpu", dtype=torch.float32)
    originals = [{n: t.detach().clone() for n, t in b.named_parameters()} for b in transformer_blocks(pipe.unet)]
    plain = stream_unet_share(build_pipeline("tiny-sd", 0, device="cpu", dtype=torch.float32).unet, "cpu", 1.0)
    streamer = stream_unet_share(pipe.unet, "cpu", share=1.0, lookahead=1, store_fp8=True)
    assert streamer.streamed_bytes < 0.35 * plain.streamed_bytes  # fp32 -> fp8 matrices; norms and biases exact
    for i, block in enumerate(streamer.blocks):
        streamer._before(i, block, ())  # copy into a staging slot, cast up + rescale into a work slot
        for name, t in block.named_parameters():
            want = originals[i][name]
            if t.dim() < 2:
                assert torch.equal(t, want)
                continue
            scale = want.abs().max() / 448
            # e4m3: 3 mantissa bits (relative step 1/8, rounding half of it), subnormals below 2^-6 of the scale
            assert ((t - want).abs() <= want.abs() / 16 + scale * 2**-9 + 1e-7).all(), name
            assert not torch.equal(t, want)  # the test would pass without quantization otherwise
        streamer._after(i, block, (), None)
    images = run(pipe)
    assert images.shape == resident.shape and 0 < abs(images - resident).mean() < 0.05
    assert (run(pipe) == images).all()  # the copy/cast/work-slot cycle carries over into the next call intact


@pytest.mark.parametrize("n", [16, 42, 50, 51, 70])
@pytest.mark.parametrize("lookahead", [2, 8, 12])
def test_the_fitted_lookahead_needs_no_more_slots_than_asked_and_the_estimate_counts_them(n, lookahead):
    from core.memory import MemoryLevel, fit_lookahead, stream_slots

    ahead = fit_lookahead(n, lookahead)
    top = max(1, min(lookahead, n // 5))
    assert 3 * top / 4 <= ahead <= top
    slots = max(slot_plan(n, ahead)) + 1
    assert slots <= max(slot_plan(n, top)) + 1  # never more device memory than the lookahead asked for
    if n == 70:  # SDXL, every block streamed: what the memory estimate counts is what the streamer allocates
        assert stream_slots("sdxl", MemoryLevel.AGGRESSIVE, 1.0, lookahead) == slots
