"""Copies between host and GPU that the step loop queues instead of waiting for (core/device_copy.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from core.device_copy import host_array, rows_to_host, to_device

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_rows_to_host_gives_each_row_as_an_array_on_the_cpu():
    t = torch.arange(2 * 3 * 4 * 3, dtype=torch.uint8).view(2, 3, 4, 3)
    rows = [host_array(r) for r in rows_to_host(t)]
    assert len(rows) == 2 and all(isinstance(r, np.ndarray) and r.shape == (3, 4, 3) for r in rows)
    assert np.array_equal(np.stack(rows), t.numpy())


@pytest.mark.gpu
@cuda
def test_decoded_rows_reach_the_host_without_the_gpu_thread_waiting():
    t = (torch.rand(3, 64, 64, 3, device="cuda") * 255).to(torch.uint8)
    expected = t.cpu().numpy()
    busy = torch.randn(4096, 4096, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host wait in what follows raises
    try:
        for _ in range(20):
            busy = busy @ busy / 64  # GPU work queued ahead of the copy
        rows = rows_to_host(t)
        scalars = to_device(torch.tensor([1.5, 2.5]), "cuda")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert np.array_equal(np.stack([host_array(r) for r in rows]), expected)  # waits here, on this thread
    assert scalars.tolist() == [1.5, 2.5]


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("model", ["tiny-sd", "tiny-sdxl"])
def test_admitting_requests_does_not_wait_for_the_gpu(sdserve_cache_dir, model):
    """Text encoding (diffusers' encode_prompt, SDXL's time ids) and every scheduler's start, as the step loop
    admits them, under CUDA's sync debug mode: a host wait raises."""
    from core.config import EngineConfig
    from core.denoise_state import Job, samples_of
    from core.engine import Engine
    from core.schemas import GenerationRequest

    eng = Engine(EngineConfig(cache_dir=sdserve_cache_dir, source=f"embedded:{model}", device="cuda", dtype="fp16",
                              optimization={"warmup_steps": 0})).load()
    jobs = []
    for i, scheduler in enumerate(["euler", "euler_a", "dpmpp_2m_karras", "unipc", "heun", "kdpm2_a", "ddim", "lcm"]):
        req = eng.resolve(GenerationRequest(prompt=f"prompt {i}", scheduler=scheduler, steps=20, width=64,
                                            height=64, seed=i))
        job = Job(request=req)
        job.samples = samples_of(job)
        jobs.append(job)
    eng.scheduler._busy_start()  # what the step loop does before its first admission (the scheduler's device)
    busy = torch.randn(4096, 4096, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(20):
            busy = busy @ busy / 64  # GPU work queued ahead, as a running batch's steps are
        eng.scheduler._prepare([s for j in jobs for s in j.samples])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for job in jobs:
        assert not job.finished, job.future.result()  # a failure (a host wait raised) settles the job
        assert job.conditioning.cond.is_cuda and job.samples[0].latents.is_cuda and job.samples[0].timesteps.is_cuda


def test_cuda_target_reads_the_device_of_a_to_call():
    from core.device_copy import _cuda_target

    t = torch.zeros(1)
    assert _cuda_target((t, "cuda"), {}) == torch.device("cuda")
    assert _cuda_target((t, "cuda:1", torch.float16), {}) == torch.device("cuda", 1)
    assert _cuda_target((t,), {"device": torch.device("cuda", 0), "dtype": torch.float16}) == torch.device("cuda", 0)
    assert _cuda_target((t, 0), {}) == torch.device("cuda", 0)
    assert _cuda_target((t, "cpu"), {}) is None
    assert _cuda_target((t, torch.float16), {}) is None  # a dtype only
    assert _cuda_target((t, t), {}) is None  # like another (CPU) tensor


def test_uploads_context_is_a_no_op_off_the_gpu():
    from core.device_copy import uploads_without_host_wait

    t = torch.arange(4)
    with uploads_without_host_wait("cpu"):
        out = t.to("cpu", torch.float64)
    assert out.dtype == torch.float64 and out.tolist() == [0.0, 1.0, 2.0, 3.0]
