"""Compile artifacts in a shared store (core/compile_cache.py): a replica that compiled writes torch's portable cache
artifacts under its key; a fresh process with empty local caches loads them and its warm-up compiles nothing; a
broken store or unusable bytes only cost a warning. CPU: Inductor compiles the tiny model with a C++ compiler.

The suite's one CPU Inductor compile is here: the UNet with the CFG combine and Euler step around it
(optimization.capture_step, core/captured_step.py), so the same compile also shows that compiled captured steps,
freshly compiled or loaded from the store, stay within float noise of the eager engine."""
from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from core.config import EngineConfig, format_validation_error

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
needs_cxx = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                               reason="Inductor on CPU needs a C++ compiler")

_REPLICA = """
import base64, json, sys, yaml
from core.config import EngineConfig
from core.engine import Engine
from core.schemas import GenerationRequest
e = Engine(EngineConfig.model_validate(yaml.safe_load(open(sys.argv[1])))).load()
a = e.applied
from torch._dynamo.utils import compilation_time_metrics as t
lowering_s = sum(t.get("fx_codegen_and_compile", []))  # the start's compile (the image below is serving)
c = e.captured_step  # None unless capture_step is on
rows, calls = (sorted(c.rows), c.calls) if c else (None, 0)
png = e.generate([GenerationRequest(**json.loads(sys.argv[2]))])[0].images[0].data
print(json.dumps({"lowering_s": lowering_s, "hit": a["compile_cache_hit"],
                  "loaded": a["compile_artifacts"], "warmup_s": e.warmup_s,
                  "counters": a["compile_counters"], "saved": a.get("compile_artifacts_saved"),
                  "capture_step": a.get("capture_step"), "captured_rows": rows,
                  "captured_calls": c.calls - calls if c else 0, "png": base64.b64encode(png).decode()}), flush=True)
import os
os._exit(0)  # skip interpreter teardown: Inductor's compile workers sometimes abort there ("terminate called")
"""


def _config(tmp_path, store: str, cache: str) -> str:
    """tiny-sd compiled (the captured UNet step, no VAE) at one shape and one bucket: the smallest real compile."""
    path = tmp_path / f"engine-{cache}.yaml"
    path.write_text(yaml.safe_dump({
        "name": "tiny-sd", "device": "cpu", "cache_dir": str(tmp_path / cache),
        "optimization": {"compile": "default", "compile_vae": False, "warmup_steps": 1, "capture_step": True,
                         "batch_buckets": [1], "compile_artifacts": {"store": store}},
        "limits": {"max_batch_size": 1}}))
    return str(path)


def _env(tmp_path, tag: str) -> dict:
    # every process gets its own Inductor dir: nothing of the compile is shared but the store (a fresh node; the
    # second one is handed the first one's g++ kernel builds, see _copy_kernel_builds)
    return dict(os.environ, HF_HUB_OFFLINE="1", TORCHINDUCTOR_CACHE_DIR=str(tmp_path / f"inductor-{tag}"),
                PYTHONPATH=ROOT)


def _run(args: list[str], tmp_path, tag: str) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, env=_env(tmp_path, tag),
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


# 4 steps: more than the 1-step warm-up, each one through the compiled captured step
IMAGE_REQUEST = {"prompt": "a fox", "seed": 5, "steps": 4, "guidance_scale": 7.5}


def _replica(config: str, tmp_path, tag: str) -> dict:
    out = _run(["-c", _REPLICA, config, json.dumps(IMAGE_REQUEST)], tmp_path, tag)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _pixels(png: bytes):
    import io

    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(png)) as img:
        return np.asarray(img.convert("RGB"), dtype=np.int16)  # int16: differences may be negative


def _assert_compiled_captured_steps_near_eager(replica: dict, eager_png: bytes) -> None:
    """Compiled during warm-up, all 4 steps through the compiled captured step, and within float noise of eager:
    8-bit pixels may differ by 2 (Inductor's fused float math rounds a little differently)."""
    import numpy as np

    assert replica["capture_step"] and replica["captured_rows"], replica["captured_rows"]
    assert replica["captured_calls"] == IMAGE_REQUEST["steps"]
    diff = np.abs(_pixels(base64.b64decode(replica["png"])) - _pixels(eager_png))
    assert diff.max() <= 2, diff.max()


@needs_cxx
@pytest.mark.slow  # ~50 s on 2 cores: one CPU compile of the tiny UNet, two starts from the store at once
def test_a_fresh_process_starts_from_the_stores_artifacts_without_compiling(tmp_path, request):
    from concurrent.futures import ThreadPoolExecutor

    from core.schemas import GenerationRequest

    store = f"file://{tmp_path}/store/"
    with ThreadPoolExecutor(1) as pool:
        # The eager reference is made while the first process compiles (Inductor's code generation there is
        # single-threaded Python: a core is free), not before it.
        first_run = pool.submit(_replica, _config(tmp_path, store, "a"), tmp_path, "a")
        eager_png = request.getfixturevalue("eager_engine").generate(
            [GenerationRequest(**IMAGE_REQUEST)])[0].images[0].data
        first = first_run.result()
    _assert_compiled_captured_steps_near_eager(first, eager_png)
    assert first["hit"] is False and first["counters"]["fxgraph_cache_miss"] > 0
    key = first["loaded"]["key"]
    assert first["saved"]["key"] == key and first["saved"]["bytes"] > 0
    assert sorted(os.listdir(tmp_path / "store")) == [f"{key}.bin", f"{key}.json"]  # no temporary left behind

    # The second node gets the first one's g++ builds of the kernel sources (.so files keyed by the hash of their
    # C++ source and flags), nothing else of its Inductor dir: on CPU the store's artifacts carry each kernel's C++
    # source, which a fresh node would otherwise spend ~25 s of the test rebuilding with g++ (torch's step, not
    # ours; on CUDA the artifacts carry the built Triton kernels). Whether it compiles is decided before that, by
    # its FX graph cache (fxgraph/, aotautograd/: left empty), asserted below: hits only, no lowering.
    _copy_kernel_builds(tmp_path / "inductor-a", tmp_path / "inductor-b")

    # `sdserve precompile` with the same config on the node that compiled (its Inductor dir), while the second
    # process starts: the key is in the store, nothing is compiled or written (asserted below). It runs beside the
    # second start instead of after it (each one mostly imports torch and loads the model): neither writes the store.
    log = open(tmp_path / "precompile.log", "w+")
    cli = subprocess.Popen([sys.executable, "-m", "sdserve", "precompile", _config(tmp_path, store, "c")], cwd=ROOT,
                           env=_env(tmp_path, "a"), stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        second = _replica(_config(tmp_path, store, "b"), tmp_path, "b")  # other cache_dir, no FX graph cache
        assert cli.wait(600) == 0, (tmp_path / "precompile.log").read_text()[-3000:]
    finally:
        if cli.poll() is None:
            cli.kill()
        log.close()
    assert f"key {key} already in {store}" in (tmp_path / "precompile.log").read_text()
    assert sorted(os.listdir(tmp_path / "store")) == [f"{key}.bin", f"{key}.json"]  # nothing else written
    assert second["hit"] is True and second["loaded"]["key"] == key
    assert second["counters"]["fxgraph_cache_hit"] > 0 and not second["counters"].get("fxgraph_cache_miss")
    assert second["saved"] is None  # a complete hit uploads nothing
    # Inductor's lowering and code generation ran only in the first process. (Its wall time is no test here: on
    # CPU the C++ kernels are rebuilt from the cached source, they are not in the artifacts; on CUDA the Triton
    # kernels are. benchmarks/cold_start.py measures the GPU's ready time.)
    assert first["lowering_s"] > 0 and second["lowering_s"] == 0
    _assert_compiled_captured_steps_near_eager(second, eager_png)  # the store's code makes the same images


def _copy_kernel_builds(src, dst) -> None:
    """Only the compiled kernel libraries (*.so at their hashed paths): no FX graph or AOTAutograd cache entry."""
    builds = list(src.rglob("*.so"))
    assert builds, "the first process built no C++ kernel"
    for so in builds:
        target = dst / so.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(so, target)
    assert not (dst / "fxgraph").exists() and not (dst / "aotautograd").exists()


def test_precompile_skips_an_uncompiled_model_and_names_a_bad_key(tmp_path):
    """`sdserve precompile` says plainly when a model has nothing to compile, and exits 2 naming a bad key."""
    cfg = tmp_path / "eager.yaml"
    cfg.write_text(yaml.safe_dump({"name": "tiny-sd", "device": "cpu", "cache_dir": str(tmp_path)}))
    out = _run(["-m", "sdserve", "precompile", str(cfg)], tmp_path, "x")
    assert "tiny-sd: skipped (optimization.compile is 'none'" in out.stdout
    cfg.write_text(yaml.safe_dump({"name": "tiny-sd", "optimization": {"compile_artifacts": "aot"}}))
    bad = subprocess.run([sys.executable, "-m", "sdserve", "precompile", str(cfg)], capture_output=True, text=True,
                         cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))
    assert bad.returncode == 2 and "optimization.compile_artifacts" in bad.stderr and "store" in bad.stderr


def test_the_removed_aot_value_names_its_replacement_and_cache_keeps_its_meaning():
    with pytest.raises(ValueError) as err:
        EngineConfig(optimization={"compile_artifacts": "aot"})
    text = format_validation_error(err.value)
    assert text.startswith("optimization.compile_artifacts:") and "{store:" in text
    assert EngineConfig(optimization={"compile_artifacts": "cache"}).optimization.compile_artifacts.store is None


def test_a_store_uri_with_an_unknown_protocol_is_refused():
    with pytest.raises(ValueError) as err:
        EngineConfig(optimization={"compile_artifacts": {"store": "s4://bucket/x"}})
    assert "optimization.compile_artifacts.store" in format_validation_error(err.value)
    for ok in ("s3://bucket/sdserve-cache/", "file:///mnt/nfs/cache", "/shared/cache", "memory://x"):
        assert EngineConfig(optimization={"compile_artifacts": {"store": ok}}).optimization.compile_artifacts.store


def test_store_round_trip_is_atomic_and_a_missing_key_is_none(tmp_path):
    from core.compile_cache import ArtifactStore

    store = ArtifactStore(f"file://{tmp_path}/nested/store")
    assert store.get("k") is None
    path = store.put("k", b"blob", {"gpu": "cpu"})
    assert store.get("k") == b"blob" and path.endswith("/nested/store/k.bin")
    assert json.loads((tmp_path / "nested/store/k.json").read_text()) == {"gpu": "cpu"}
    store.put("k", b"newer", {"gpu": "cpu"})  # a second writer of the key: last one wins, whole
    assert store.get("k") == b"newer" and sorted(os.listdir(tmp_path / "nested/store")) == ["k.bin", "k.json"]


@pytest.fixture(scope="module")
def eager_engine(sdserve_cache_dir):
    from core.engine import Engine
    from tests.core.conftest import cpu_config

    return Engine(cpu_config(sdserve_cache_dir)).load()


def test_unusable_artifacts_or_an_unreachable_store_only_warn(eager_engine, tmp_path, caplog):
    """The store is consulted by key; bytes torch cannot read (another torch) or a store that fails are a warning
    and a miss, never an exception out of the replica's start."""
    from core import compile_cache

    store = tmp_path / "store"
    engine = eager_engine
    artifacts = {"store": str(store)}
    engine.config.optimization.compile_artifacts = artifacts
    key = compile_cache.cache_key(engine)
    store.mkdir()
    (store / f"{key}.bin").write_bytes(b"not torch's cache artifacts")
    result = compile_cache.load(engine)
    assert result["hit"] is False and "another torch" in result["error"]
    assert any("unusable" in r.getMessage() for r in caplog.records)

    (tmp_path / "a-file").write_text("")
    engine.config.optimization.compile_artifacts = {"store": str(tmp_path / "a-file" / "store")}
    assert compile_cache.load(engine)["hit"] is False  # reading under a file: an OSError, warned
    assert compile_cache.save(engine, force=True) is None  # nothing to save or cannot write: never raises
