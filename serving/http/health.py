"""Health routes: /healthz (liveness: the ingress answers) and /readyz (every model deployment HEALTHY, the jobs
store reachable, not draining).

Readiness asks the Serve controller for the status of this application's model deployments; no auth, so
load balancers and Kubernetes probes can call them.
"""
# No `from __future__ import annotations`: FastAPI must see real annotation objects.
import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from serving.config import ServingConfig, model_deployment_name

router = APIRouter()


def model_statuses(config: ServingConfig) -> dict[str, str]:
    """Each model deployment's Serve status (HEALTHY when every replica loaded); called inside the app."""
    from ray import serve

    try:
        app = serve.status().applications.get(serve.get_replica_context().app_name)
    except Exception as err:  # noqa: BLE001 - the controller may be briefly unreachable
        return {m.name: f"UNKNOWN ({type(err).__name__})" for m in config.models}
    out = {}
    for m in config.models:
        dep = app.deployments.get(model_deployment_name(m.name)) if app else None
        out[m.name] = str(getattr(dep.status, "value", dep.status)) if dep else "MISSING"
    return out


@router.get("/healthz", summary="Liveness: the ingress answers")
async def healthz():
    return {"status": "ok"}


async def jobs_store_status(jobs) -> str:
    """'ok', or why the jobs store (Redis / the SQLite file) cannot be used."""
    try:
        await asyncio.wait_for(asyncio.to_thread(jobs.store.ping), 3.0)
        return "ok"
    except Exception as err:  # noqa: BLE001 - any failure means not ready
        return f"unavailable: {type(err).__name__}: {err}"[:300]


@router.get("/readyz", summary="Readiness: every model deployment healthy, the jobs store reachable, not draining")
async def readyz(request: Request):
    ingress = request.app.state.ingress
    status = await asyncio.to_thread(model_statuses, ingress.config)
    ready = all(s == "HEALTHY" for s in status.values())
    body = {"ready": ready, "models": status}
    if ingress.jobs is not None:
        body["jobs_store"] = await jobs_store_status(ingress.jobs)
        ready = ready and body["jobs_store"] == "ok"
    if ingress.gate.draining:
        body["draining"], ready = True, False
    if ingress.gate.inflight > 1:  # other HTTP requests this ingress replica holds (this one not counted)
        body["in_flight"] = ingress.gate.inflight - 1
    body["ready"] = ready
    return JSONResponse(body, 200 if ready else 503)
