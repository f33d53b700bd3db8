"""Compiled UNet with LoRA slots (CPU torch.compile, backend "eager", as tests/core/test_step_scheduler_compile.py):
switching adapters between requests, and mixing them in one call, never traces a new graph - the adapters are
data in fixed-shape slot buffers, not weights or Python constants."""
from __future__ import annotations

import logging

import pytest

from core.step_scheduler import unique_graphs
from tests.core import lora_files as lf


@pytest.fixture(scope="module")
def compiled(make_config, tmp_path_factory):
    from core.engine import Engine

    folder = tmp_path_factory.mktemp("loras-compiled")
    eng = Engine(make_config(limits={"max_batch_size": 2}, optimization={"warmup_steps": 0},
                             loras={"uri": str(folder), "targets": "all", "gpu_slots": 2, "max_rank": 8})).load()
    for i, targets in enumerate([lf.UNET_ATTENTION, lf.UNET_ATTENTION, ["conv1", "conv2", "to_k"]]):
        lf.save_kohya(folder / f"l{i}.safetensors", {"unet": lf.peft_lora(eng.pipe.unet, targets, seed=i)})
    eng.pipe.unet.compile(backend="eager", fullgraph=True, dynamic=False)
    eng.compiled = True  # what install_fastpath sets when optimization.compile is on (CUDA-only here)
    eng.config.optimization.warmup_steps = 2
    eng.config.optimization.warmup_shapes = [(64, 64, 2)]
    eng.warmup()
    eng.scheduler.mark_warm()
    return eng


def test_switching_and_mixing_loras_never_recompiles(compiled, caplog):
    from core.schemas import GenerationRequest

    def req(seed, loras):
        return GenerationRequest(prompt="a fox", steps=2, seed=seed, loras=loras)

    graphs = unique_graphs()
    sequence = [[], [{"name": "l0"}], [{"name": "l1", "weight": -1.5}], [{"name": "l2"}],
                [{"name": "l0", "weight": 0.5}, {"name": "l2", "weight": 2.0}], [], [{"name": "l1"}]]
    with caplog.at_level(logging.WARNING, logger="core.step_scheduler"):
        alone = [compiled.generate([req(i, s)])[0] for i, s in enumerate(sequence)]  # one switch per request
        mixed = compiled.generate([req(i, s) for i, s in enumerate(sequence)])  # sets mixed in calls
    for out in alone + mixed:
        assert not hasattr(out, "kind"), out
    assert max(o.batch_size for o in mixed) == 2
    assert compiled.lora.slots.writes >= 5  # slots really were rewritten (2 slots, 6 distinct sets)
    assert unique_graphs() == graphs
    assert compiled.info()["scheduling"]["recompiles"] == 0
    assert "new graph" not in caplog.text
