"""Config and schemas stay cheap to import: no torch, no diffusers, no Ray (checked in a fresh interpreter)."""
from __future__ import annotations

import pytest

from tests.import_probe import heavy_imports


def test_config_and_schemas_do_not_import_torch():
    then = ('from core.config import EngineConfig\nfrom core.schemas import GenerationRequest\n'
            'EngineConfig(scheduler="euler_a")\nGenerationRequest(prompt="a fox", scheduler="dpmpp_2m")')
    assert heavy_imports(["core.config", "core.schemas", "core.batching", "core.schedulers"],
                         ("torch", "diffusers", "transformers", "ray"), then) == []


@pytest.mark.parametrize("module", ["core.engine", "core.step_scheduler", "core.loading", "core.checkpoint_export"])
def test_core_never_imports_ray(module):
    assert heavy_imports([module], ("ray",)) == []
