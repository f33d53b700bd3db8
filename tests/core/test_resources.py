"""core.resources: the one rule for GPU/CPU reservations and the engine config of Serve replicas and Ray Data
actors, and that both callers apply it alike."""
from __future__ import annotations

import pytest

from core.config import EngineConfig
from core.resources import actor_num_cpus, actor_num_gpus, engine_for_actor


@pytest.mark.parametrize("requested", ["auto", None])
def test_auto_gpus_one_when_the_cluster_has_gpus_and_the_engine_may_use_one(requested):
    assert actor_num_gpus(requested, cluster_has_gpus=True) == 1.0
    assert actor_num_gpus(requested, cluster_has_gpus=False) == 0.0
    assert actor_num_gpus(requested, cluster_has_gpus=True, device="cpu") == 0.0
    assert actor_num_gpus(requested, cluster_has_gpus=True, device="cuda:1") == 1.0


def test_explicit_gpus_taken_as_is():
    assert actor_num_gpus(0.25, cluster_has_gpus=False) == 0.25
    assert actor_num_gpus(0, cluster_has_gpus=True) == 0.0
    assert actor_num_gpus(2, cluster_has_gpus=True, device="cpu") == 2.0


def test_default_cpus_leave_room_for_the_data_tasks():
    assert actor_num_cpus(None, cluster_cpus=16, actors=4) == 1.0
    assert actor_num_cpus(None, cluster_cpus=4, actors=4) == 0.5  # (4 - 2) / 4
    assert actor_num_cpus(None, cluster_cpus=2, actors=1) == 0.0
    assert actor_num_cpus(1.5, cluster_cpus=2, actors=8) == 1.5


@pytest.mark.parametrize("num_gpus, configured, expected", [
    (1.0, 1.0, 1.0), (0.5, 1.0, 0.5), (0.25, 1.0, 0.25), (2.0, 1.0, 1.0),
    (0.5, 0.4, 0.4),  # a smaller budget asked for is kept
    (0.5, 0.8, 0.5),  # never more VRAM than the GPU share reserved
])
def test_vram_fraction_within_the_reserved_share(num_gpus, configured, expected):
    engine = EngineConfig.model_validate({"memory": {"gpu_fraction": configured}})
    out = engine_for_actor(engine, num_gpus)
    assert out.memory.gpu_fraction == expected
    assert out.device == "auto"
    assert engine.memory.gpu_fraction == configured  # the input is not changed


def test_no_gpu_reserved_pins_an_auto_engine_to_cpu():
    assert engine_for_actor(EngineConfig(), 0.0).device == "cpu"
    assert engine_for_actor(EngineConfig(device="cuda:0"), 0.0).device == "cuda:0"  # an explicit device is kept


def test_serve_replicas_and_batch_actors_get_the_same_engine():
    from batch_jobs.config import BatchJobConfig
    from serving.builder import model_deployment_options
    from serving.config import ModelConfig

    for num_gpus in (0.5, 0.25, 1.0, 0.0):
        engine = {"name": "tiny-sd", "memory": {"gpu_fraction": 1.0}}
        model = ModelConfig.model_validate({"engine": engine, "deployment": {"num_gpus": num_gpus}})
        served = model_deployment_options(model, cluster_has_gpus=True)["init_kwargs"]["engine_config"]
        batch = BatchJobConfig.model_validate({"engine": engine, "num_gpus": num_gpus}).apply_gpu_fraction().engine
        assert served == batch, num_gpus
