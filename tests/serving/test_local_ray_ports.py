"""`sdserve serve`'s local Ray (serving/local_ray.py) listens on loopback only: every listening socket of every
process it started (GCS, raylet, workers, agents, metrics) is bound to 127.0.0.1. A real Ray, in a subprocess."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration

_PROBE = """
import json, psutil, ray
from serving.local_ray import init_ray
init_ray(None, num_cpus=1, log_to_driver=False)

@ray.remote
def ping():
    return ray.util.get_node_ip_address()

node_ip = ray.get(ping.remote())  # a worker ran: its ports are open too
listening = []
children = {p.pid: p for p in psutil.Process().children(recursive=True)}
children[psutil.Process().pid] = psutil.Process()
for c in psutil.net_connections("inet"):
    if c.status == psutil.CONN_LISTEN and c.pid in children:
        listening.append([c.laddr.ip, c.laddr.port, children[c.pid].name()])
print(json.dumps({"node_ip": node_ip, "gcs": ray.get_runtime_context().gcs_address, "listening": listening}))
ray.shutdown()
"""


def test_default_local_ray_listens_on_loopback_only():
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    proc = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, env=env, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    names = {name for _, _, name in out["listening"]}
    assert any("gcs_server" in n for n in names) and any("raylet" in n for n in names), out  # the probe saw Ray
    exposed = [s for s in out["listening"] if s[0] not in ("127.0.0.1", "::ffff:127.0.0.1", "::1")]
    assert not exposed, f"Ray ports reachable from other machines: {exposed}"
    assert out["node_ip"] == "127.0.0.1" and out["gcs"].startswith("127.0.0.1:")
