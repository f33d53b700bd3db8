"""The newcomer path: every example the docs mark runs as written against a server started the way `make serve`
starts it (embedded tiny-sd, CPU).

A fenced block right after `<!-- newcomer-test -->` (bash: one command per line, `\\` continues a line, `#` lines
are comments) or `<!-- newcomer-test: python -->` (a script) in README.md or docs/*.md is extracted and run
verbatim, in a fresh folder that holds the repository's `configs/` and a `.venv` link to this interpreter's
environment. The only substitution: the server's port (8000 in the docs) is a free one here.
"""
from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.free_ports import free_port as _free_port

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARKED = re.compile(r"<!-- newcomer-test(?::\s*(?P<kind>\w+))? -->\s*\n```(?P<lang>\w+)\n(?P<code>.*?)\n```", re.S)
DOC_ADDRESS = "127.0.0.1:8000"


def marked_blocks(paths=DOC_FILES) -> list[tuple[str, str, str]]:
    """(file name, kind 'bash' | 'python', code) of every marked block."""
    out = []
    for path in paths:
        for m in MARKED.finditer(path.read_text(encoding="utf-8")):
            out.append((path.name, m.group("kind") or m.group("lang"), m.group("code")))
    return out


def bash_commands(code: str) -> list[str]:
    """One command per logical line: continuations joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", code)
    return [ln.strip() for ln in joined.splitlines() if ln.strip() and not ln.strip().startswith("#")]


def serve_recipe() -> list[str]:
    """`make serve`'s command line, read from the Makefile (its variables filled with their defaults)."""
    text = (ROOT / "Makefile").read_text()
    defaults = dict(re.findall(r"^(\w+) \?= (.+)$", text, re.M))
    recipe = re.search(r"^serve:.*\n\t(.+)$", text, re.M).group(1)
    return shlex.split(re.sub(r"\$\((\w+)\)", lambda m: defaults[m.group(1)], recipe))


def test_docs_mark_runnable_examples():
    blocks = marked_blocks()
    files = {f for f, _, _ in blocks}
    kinds = {k for _, k, _ in blocks}
    assert "README.md" in files and {"bash", "python"} <= kinds, blocks
    assert any(f != "README.md" for f in files), "docs/*.md mark no example"
    for _, kind, code in blocks:
        if kind != "bash":
            continue
        for cmd in bash_commands(code):
            program = cmd.split()[0]
            # Works from a fresh shell: no bare sdserve/serve/ray (they are not on PATH without activation).
            assert program in ("curl", "make") or program.startswith(".venv/bin/"), cmd


def test_readme_blocks_with_bare_programs_activate_first():
    """README blocks that say `sdserve ...`/`serve ...`/`ray ...` bare show the activation line before them."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    for block in re.findall(r"```bash\n(.*?)\n```", text, re.S):
        activated = False
        for cmd in bash_commands(block):
            activated = activated or cmd.startswith("source .venv/bin/activate")
            if cmd.split()[0] in ("sdserve", "serve", "ray"):
                assert activated, f"{cmd!r} needs `source .venv/bin/activate` earlier in its block"


def test_makefile_serves_the_default_config():
    assert serve_recipe() == [".venv/bin/sdserve", "serve", "configs/serve-default.yaml", "--host", "127.0.0.1",
                              "--port", "8000"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("newcomer")
    (path / ".venv").symlink_to(sys.prefix)
    (path / "configs").symlink_to(ROOT / "configs")
    return path


@pytest.fixture(scope="module")
def server(workdir, sdserve_cache_dir):
    """`make serve`'s command (port changed to a free one), output kept; stopped with Ctrl-C (SIGINT)."""
    port = _free_port()
    cmd = serve_recipe()
    cmd[cmd.index("--port") + 1] = str(port)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    log = open(workdir / "serve.log", "w+")
    proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    text = ""
    while "sdserve: serving" not in text:
        assert proc.poll() is None and time.time() < deadline, f"server did not start:\n{text[-3000:]}"
        time.sleep(0.2)
        text = (workdir / "serve.log").read_text()
    address = re.search(r"sdserve: Ray address (\S+)", text).group(1)
    yield {"port": port, "address": address, "proc": proc, "log": workdir / "serve.log", "env": env}
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    log.close()


@pytest.mark.integration
@pytest.mark.slow
def test_server_start_tells_how_to_connect(server):
    text = server["log"].read_text()
    assert f"at http://127.0.0.1:{server['port']}" in text
    assert re.search(r"metrics \(Prometheus, ray_sdserve_\*.*\) at http://\S+:\d+/metrics", text)
    assert 'app_name="sdserve"' in text


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("index", range(len([b for b in marked_blocks()])))
def test_marked_example_runs_as_written(index, server, workdir):
    name, kind, code = marked_blocks()[index]
    code = code.replace(DOC_ADDRESS, f"127.0.0.1:{server['port']}")
    if kind == "python":
        script = workdir / f"example_{index}.py"
        script.write_text(code)
        # "auto" would pick whichever Ray started last on this shared box: point it at the server's
        # (RAY_ADDRESS is what ray.init(address="auto") reads first).
        env = {**server["env"], "RAY_ADDRESS": server["address"]}
        proc = subprocess.run([".venv/bin/python", script.name], cwd=workdir, env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, f"{name} python example failed:\n{proc.stderr[-3000:]}"
        return
    for cmd in bash_commands(code):
        proc = subprocess.run(["bash", "-c", cmd], cwd=workdir, env=server["env"], capture_output=True, text=True,
                              timeout=400)
        assert proc.returncode == 0, f"{name}: {cmd}\nexit {proc.returncode}\n{proc.stdout[-1500:]}\n" \
                                     f"{proc.stderr[-3000:]}"
    if "out.png" in code:
        assert (workdir / "out.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.integration
@pytest.mark.slow
def test_ctrl_c_stops_the_server(server, request):
    # Runs after the examples (same module, defined last): Ctrl-C ends `make serve` cleanly.
    proc = server["proc"]
    proc.send_signal(signal.SIGINT)
    assert proc.wait(90) == 0
    assert "sdserve: shutting down" in server["log"].read_text()
