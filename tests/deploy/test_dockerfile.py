"""The Dockerfile, checked without a Docker engine: a small instruction parser plus the rules that matter
(CUDA/Ray base, the project installed, /models as a VOLUME after the optional weight pre-fetch, a non-root user,
the `sdserve serve` entrypoint), the entrypoint script's dispatch, the pre-fetch script's no-op path, and that
.dockerignore keeps what the COPY lines need."""
from __future__ import annotations

import fnmatch
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
ENTRYPOINT = ROOT / "deploy" / "docker" / "entrypoint.sh"
PREFETCH = ROOT / "deploy" / "docker" / "prefetch_weights.py"


def parse_dockerfile(text: str) -> list[tuple[str, str]]:
    """[(INSTRUCTION, arguments)], continuation lines joined, comments and parser directives dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):  # comment lines inside a continuation are skipped by Docker too
            continue
        if line.endswith("\\"):
            buf += line[:-1].rstrip() + " "
            continue
        buf += line
        instr, _, args = buf.partition(" ")
        out.append((instr.upper(), args.strip()))
        buf = ""
    assert not buf, "dangling line continuation at the end of the Dockerfile"
    return out


KNOWN = {"FROM", "ARG", "ENV", "RUN", "COPY", "ADD", "USER", "WORKDIR", "VOLUME", "EXPOSE", "ENTRYPOINT", "CMD",
         "LABEL", "HEALTHCHECK", "SHELL", "STOPSIGNAL", "ONBUILD"}


@pytest.fixture(scope="module")
def instrs() -> list[tuple[str, str]]:
    return parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))


def _index(instrs, name, pred=lambda a: True) -> list[int]:
    return [i for i, (n, a) in enumerate(instrs) if n == name and pred(a)]


def _env(instrs) -> dict[str, str]:
    env: dict[str, str] = {}
    for name, args in instrs:
        if name == "ENV":
            for tok in shlex.split(args):
                k, _, v = tok.partition("=")
                env[k] = v
    return env


def test_parses_with_known_instructions(instrs):
    assert instrs, "empty Dockerfile"
    unknown = {n for n, _ in instrs} - KNOWN
    assert not unknown, f"unknown instructions: {unknown}"
    assert DOCKERFILE.read_text().startswith("# syntax=docker/dockerfile:1"), "BuildKit syntax (secret mounts)"


def test_single_stage_from_a_ray_cuda_base(instrs):
    froms = _index(instrs, "FROM")
    assert len(froms) == 1
    # Only ARGs may precede FROM.
    assert all(n == "ARG" for n, _ in instrs[:froms[0]])
    base_arg = dict(a.split("=", 1) for n, a in instrs[:froms[0]] if "=" in a)
    image = instrs[froms[0]][1]
    if image.startswith("${"):
        image = base_arg[image[2:-1]]
    import ray

    assert image.startswith(f"rayproject/ray:{ray.__version__}-py311"), image
    assert image.endswith(("-gpu", "-cu121", "-cu124", "-cu128")), "default base must carry CUDA"


def test_model_cache_volume_and_env(instrs):
    env = _env(instrs)
    assert env["SDSERVE_CACHE_DIR"] == "/models"
    assert env["HF_HOME"].startswith("/models/"), "hub downloads must land in the cache volume too"
    vols = _index(instrs, "VOLUME")
    assert len(vols) == 1
    assert json.loads(instrs[vols[0]][1]) == ["/models"]


def test_optional_weight_prefetch_build_arg(instrs):
    froms = _index(instrs, "FROM")[0]
    args = [a.split("=", 1)[0] for n, a in instrs[froms + 1:] if n == "ARG"]
    assert "MODEL_ID" in args, "MODEL_ID must be declared after FROM to be visible in RUN"
    assert dict(a.split("=", 1) for n, a in instrs[froms + 1:] if n == "ARG" and "=" in a)["MODEL_ID"] == "", \
        "weights are optional: MODEL_ID defaults to empty"
    prefetch = _index(instrs, "RUN", lambda a: "prefetch_weights.py" in a)
    assert len(prefetch) == 1
    run = instrs[prefetch[0]][1]
    assert "MODEL_ID" in run and "type=secret,id=hf_token" in run and "required=false" in run
    # Writes into a VOLUME path after the VOLUME instruction are discarded: the pre-fetch must come first.
    assert prefetch[0] < _index(instrs, "VOLUME")[0]
    # ... and it runs as the runtime user, so the files are readable/writable by it.
    users_before = [a for n, a in instrs[:prefetch[0]] if n == "USER"]
    assert users_before and users_before[-1].split(":")[0] not in ("root", "0")


def test_project_installed_and_entrypoint(instrs):
    runs = " ".join(a for n, a in instrs if n == "RUN")
    assert "pip install" in runs and "/opt/sdserve" in runs
    assert any(n == "COPY" and a.split()[-2:] == [".", "/opt/sdserve"] for n, a in instrs)
    entry = json.loads(instrs[_index(instrs, "ENTRYPOINT")[-1]][1])
    cmd = json.loads(instrs[_index(instrs, "CMD")[-1]][1])
    assert entry[-1] == "/usr/local/bin/sdserve-entrypoint"
    assert cmd[:3] == ["serve", "--host", "0.0.0.0"], "default: sdserve serve reachable from outside"
    assert "8000" in [a for n, a in instrs if n == "EXPOSE"]


def test_runs_as_non_root(instrs):
    last_user = [a for n, a in instrs if n == "USER"][-1]
    assert last_user.split(":")[0] not in ("root", "0")


def _dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]


def _ignored(rel: str, patterns: list[str]) -> bool:
    """Docker's rule, simplified (no `!` needed here): a path is excluded when it or a parent matches."""
    parts = rel.split("/")
    for pat in patterns:
        pat = pat.rstrip("/")
        for i in range(1, len(parts) + 1):
            prefix = "/".join(parts[:i])
            if fnmatch.fnmatchcase(prefix, pat) or (pat.startswith("**/") and fnmatch.fnmatchcase(prefix.split(
                    "/")[-1], pat[3:])):
                return True
    return False


def test_dockerignore_keeps_build_inputs_and_drops_local_state(instrs):
    patterns = _dockerignore_patterns()
    assert not any(p.startswith("!") for p in patterns)
    for local in (".venv/bin/python", ".git/HEAD", "tests/conftest.py", "core/__pycache__/x.pyc",
                  "sdserve.egg-info/PKG-INFO", ".gpuhost/install.sh"):
        assert _ignored(local, patterns), f"{local} would be sent to the build"
    needed = ["pyproject.toml", "deploy/docker/entrypoint.sh", "deploy/docker/prefetch_weights.py",
              "core/engine.py", "sdserve/cli.py"]
    for name, args in instrs:
        if name == "COPY":
            srcs = [t for t in shlex.split(args) if not t.startswith("--")][:-1]
            needed += [s for s in srcs if s != "."]
    for rel in needed:
        assert (ROOT / rel).exists(), f"COPY source {rel} missing"
        assert not _ignored(rel, patterns), f"COPY source {rel} is excluded by .dockerignore"
    # Every package pyproject installs is in the context.
    for pkg in ("core", "serving", "batch_jobs", "sdserve", "benchmarks"):
        assert not _ignored(f"{pkg}/__init__.py", patterns), pkg


def _run_entrypoint(tmp_path, *args) -> str:
    stub = tmp_path / "sdserve"
    stub.write_text('#!/bin/sh\necho "sdserve $*"\n')
    stub.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    out = subprocess.run(["sh", str(ENTRYPOINT), *args], env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_entrypoint_dispatch(tmp_path):
    assert os.access(ENTRYPOINT, os.X_OK)
    assert _run_entrypoint(tmp_path) == "sdserve serve --host 0.0.0.0 --port 8000"
    assert _run_entrypoint(tmp_path, "serve", "cfg.yaml") == "sdserve serve cfg.yaml"
    assert _run_entrypoint(tmp_path, "batch", "s3://a/", "s3://b/") == "sdserve batch s3://a/ s3://b/"
    assert _run_entrypoint(tmp_path, "precompile", "cfg.yaml") == "sdserve precompile cfg.yaml"
    assert _run_entrypoint(tmp_path, "--help") == "sdserve --help"
    # Ray's cluster launcher starts the container with `bash`; anything that is not a subcommand runs as is.
    assert _run_entrypoint(tmp_path, "bash", "-c", "echo launcher") == "launcher"


def test_prefetch_is_a_noop_without_model_id():
    env = {k: v for k, v in os.environ.items() if k not in ("MODEL_ID",)}
    out = subprocess.run([sys.executable, str(PREFETCH)], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "no weights" in out.stdout


def test_prefetch_fails_loudly_when_the_model_cannot_be_fetched(tmp_path):
    env = {**os.environ, "MODEL_ID": "sdserve-test/does-not-exist", "HF_HUB_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf")}
    out = subprocess.run([sys.executable, str(PREFETCH)], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0, "a failed pre-fetch must fail the image build"
