"""The Ray that `sdserve serve` starts when no cluster address is given: single node, every port on loopback.

Ray's own ports (GCS, raylet, object manager, workers, the dashboard agent, the runtime-env agent, the metrics
export) accept work from anyone who can reach them; the local default must not expose them when its HTTP server
binds 127.0.0.1. Ray 2.60 has no bind-address option for its C++ servers: they listen on the node's IP. With
`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` (Ray's single-node mode, the default on macOS/Windows) the node's IP is
127.0.0.1, so every Ray process binds loopback and no other machine can join. Ray's token auth (on by default
for a new local cluster in 2.60 unless RAY_AUTH_MODE=disabled) stays as it is. A cluster (`--address`) is
configured by its own `ray start` (docs/deploy.md#ports).
"""
from __future__ import annotations

import os

LOOPBACK = "127.0.0.1"
SINGLE_NODE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def init_ray(address: str | None, **kwargs):
    """ray.init for the CLI and for drivers on the same machine: no address starts a local single-node Ray on
    loopback only; an address (or "auto") that leads to such a Ray joins it in the same mode. Ray would otherwise
    rewrite a 127.0.0.1 address to this machine's network IP (services.resolve_ip_for_localhost), where a
    loopback-only Ray does not listen."""
    if address is None or _is_loopback(_bootstrap_host(address)):
        _single_node_mode()
    import ray

    return ray.init(address=address, include_dashboard=False, dashboard_host=LOOPBACK, ignore_reinit_error=True,
                    **kwargs)


def _single_node_mode() -> None:
    os.environ[SINGLE_NODE_ENV] = "0"  # read by Ray at import, and inherited by the processes it starts
    from ray._private import ray_constants  # ... and set where it is read, if Ray was imported already

    ray_constants.ENABLE_RAY_CLUSTER = False


def _bootstrap_host(address: str) -> str | None:
    """The host part of the cluster address `address` stands for ("auto": RAY_ADDRESS or the latest local
    cluster), without Ray's rewriting of loopback addresses."""
    if address == "auto":
        from ray._private.services import get_ray_address_from_environment

        try:
            address = get_ray_address_from_environment("auto", None)
        except Exception:  # noqa: BLE001 - no local cluster: ray.init reports it
            return None
    if not address or address == "local":
        return None
    return address.split("://")[-1].rsplit(":", 1)[0]


def _is_loopback(host: str | None) -> bool:
    return host in ("127.0.0.1", "localhost", "::1")
