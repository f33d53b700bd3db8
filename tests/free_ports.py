"""Free TCP ports for servers the tests start (Serve's proxy, `ray start`, the CLI).

Why not bind(0): the kernel hands out ports from the ephemeral range (32768-60999 here), which Ray's own gRPC
servers and outgoing connections draw from too, so a port that was free when picked could be taken by the time
Serve's proxy binds it ("Failed to bind to address", seen once in CI). Ports 20000-32000 are below the ephemeral
range and above Ray's worker ports (10002-19999 by default), so nothing else takes them between pick and bind.
"""
from __future__ import annotations

import random
import socket

LOW, HIGH = 20000, 32000
_handed_out: set[int] = set()


def _bindable(port: int) -> bool:
    for host in ("127.0.0.1", "0.0.0.0"):
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                return False
    return True


def free_ports(n: int = 1) -> list[int]:
    """n distinct ports that bind now on 127.0.0.1 and 0.0.0.0 and were not handed out before in this process."""
    ports: list[int] = []
    rng = random.Random()
    while len(ports) < n:
        port = rng.randint(LOW, HIGH)
        if port not in _handed_out and _bindable(port):
            _handed_out.add(port)
            ports.append(port)
    return ports


def free_port() -> int:
    return free_ports(1)[0]
