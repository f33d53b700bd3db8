"""A simulated CUDA fault, installed in a replica's worker process by the deployment's runtime_env
(`worker_process_setup_hook: tests.serving.fault_injection.install`): no test backdoor in product code.

A pipeline call whose prompt contains MARKER raises, from inside the UNet's forward, the RuntimeError a real
illegal memory access raises in PyTorch. Every other call runs unchanged.
"""
from __future__ import annotations

import threading

MARKER = "<<inject-cuda-fault>>"
CUDA_FAULT = "CUDA error: an illegal memory access was encountered"
_state = threading.local()  # the engine runs each pipeline call on one worker thread, UNet calls included


def install() -> None:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel

    if getattr(UNet2DConditionModel.forward, "_fault_injection", False):
        return
    forward = UNet2DConditionModel.forward

    def faulty_forward(self, *args, **kwargs):
        if getattr(_state, "armed", False):
            raise RuntimeError(CUDA_FAULT)
        return forward(self, *args, **kwargs)

    faulty_forward._fault_injection = True
    UNet2DConditionModel.forward = faulty_forward

    for cls in (StableDiffusionPipeline, StableDiffusionXLPipeline):
        call = cls.__call__

        def armed_call(self, *args, _call=call, **kwargs):
            prompts = kwargs.get("prompt", args[0] if args else None)
            prompts = [prompts] if isinstance(prompts, str) else list(prompts or [])
            _state.armed = any(MARKER in (p or "") for p in prompts)
            try:
                return _call(self, *args, **kwargs)
            finally:
                _state.armed = False

        cls.__call__ = armed_call
