"""A simulated CUDA fault, installed in a replica's worker process by the deployment's runtime_env
(`worker_process_setup_hook: tests.serving.fault_injection.install`): no test backdoor in product code.

A request whose prompt contains MARKER makes the next UNet call raise, from inside the UNet's forward, the
RuntimeError a real illegal memory access raises in PyTorch. Every other call runs unchanged.
"""
from __future__ import annotations

import threading

MARKER = "<<inject-cuda-fault>>"
CUDA_FAULT = "CUDA error: an illegal memory access was encountered"
_state = threading.local()  # the engine's step loop runs on one thread: text encoding and UNet calls


def install() -> None:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel

    if getattr(UNet2DConditionModel.forward, "_fault_injection", False):
        return
    forward = UNet2DConditionModel.forward

    def faulty_forward(self, *args, **kwargs):
        if getattr(_state, "armed", False):
            _state.armed = False
            raise RuntimeError(CUDA_FAULT)
        return forward(self, *args, **kwargs)

    faulty_forward._fault_injection = True
    UNet2DConditionModel.forward = faulty_forward

    # The engine encodes a request's prompt when the request is admitted, then runs its UNet calls on the same
    # (GPU) thread: a marked prompt arms the fault for the next UNet call.
    for cls in (StableDiffusionPipeline, StableDiffusionXLPipeline):
        encode = cls.encode_prompt

        def armed_encode(self, *args, _encode=encode, **kwargs):
            prompts = kwargs.get("prompt", args[0] if args else None)
            prompts = [prompts] if isinstance(prompts, str) else list(prompts or [])
            if any(MARKER in (p or "") for p in prompts):
                _state.armed = True
            return _encode(self, *args, **kwargs)

        cls.encode_prompt = armed_encode
