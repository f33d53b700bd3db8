"""Config and schemas stay cheap to import: no torch, no diffusers, no Ray (checked in a fresh interpreter)."""
from __future__ import annotations

import subprocess
import sys

import pytest

CODE = """
import sys
import core.config, core.schemas, core.batching, core.schedulers
from core.config import EngineConfig
from core.schemas import GenerationRequest
EngineConfig(scheduler="euler_a")
GenerationRequest(prompt="a fox", scheduler="dpmpp_2m")
heavy = sorted(m for m in ("torch", "diffusers", "transformers", "ray") if m in sys.modules)
print(",".join(heavy))
"""


def test_config_and_schemas_do_not_import_torch():
    proc = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "", f"heavy modules imported: {proc.stdout.strip()}"


@pytest.mark.parametrize("module", ["core.engine", "core.step_scheduler", "core.loading", "core.checkpoint_export"])
def test_core_never_imports_ray(module):
    code = f"import sys, {module}; print('ray' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"
