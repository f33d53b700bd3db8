"""Async job routes: submit, status, result, cancel and SSE events under /v1/jobs (404 'jobs are not enabled'
when the serving config has no `jobs:`). The jobs backend is the ingress's (`request.app.state.jobs`,
serving/jobs/runner.py); a caller sees only its own key's jobs.
"""
# No `from __future__ import annotations`: FastAPI must see real annotation objects.
import asyncio
import base64
import json
import time

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from core.schemas import GenerationRequest
from serving.http.auth import authorize
from serving.http.errors import ApiError, generation_error
from serving.http.routes_native import BODY_DOC, checked_images
from serving.http.uploads import generation_body, request_body_doc
from serving.jobs.states import TERMINAL, JobRejected, JobStatus
from serving.metrics import count_error
from serving.request_limits import limits_error
from serving.security import retry_after_header

router = APIRouter()

JOB_FIELDS = ("id", "status", "created_at", "started_at", "finished_at", "updated_at", "progress", "error",
              "attempts", "seeds")


def _jobs(request: Request):
    jobs = getattr(request.app.state, "jobs", None)
    if jobs is None:
        raise ApiError(404, {"message": "async jobs are not enabled (set `jobs:` in the serving config)",
                             "code": "jobs_disabled"})
    return jobs


def _owned(request: Request, job_id: str, caller: str) -> dict:
    jobs = _jobs(request)
    rec = jobs.store.get(job_id) if job_id.startswith("job-") and len(job_id) < 100 else None
    # Another key's job answers 404 too: ids are not an oracle across keys.
    if rec is None or (rec["owner"] is not None and rec["owner"] != caller):
        raise ApiError(404, {"message": f"unknown job id {job_id!r}", "field": "id", "code": "job_not_found"})
    return rec


def _view(jobs, rec: dict) -> dict:
    out = {k: rec.get(k) for k in JOB_FIELDS if k in rec}
    out["model"] = rec["request"].get("model")
    if rec["status"] == JobStatus.QUEUED:
        out["queue_position"] = jobs.store.queue_position(rec)
    return out


@router.post("/v1/jobs", status_code=202, summary="Submit an async generation job (same body as /v1/generate)",
             openapi_extra=request_body_doc("GenerationRequest", BODY_DOC))
async def submit_job(request: Request, caller: str = Depends(authorize),
                     body: GenerationRequest = Depends(generation_body)):
    jobs = _jobs(request)
    ingress = request.app.state.ingress
    name = request.state.model = ingress.check_request(body, openai=False)
    body = await checked_images(body, ingress)  # a bad image is refused now, not found by the job later
    # The model's own limits, before a job id exists: the same 422 naming the field as /v1/generate.
    err = limits_error(next(m.engine for m in ingress.config.models if m.name == name), body)
    if err is not None:
        raise generation_error(err, openai=False)
    owner = caller if ingress.keys.enabled else None
    request_json = body.model_copy(update={"model": name}).model_dump(mode="json")
    try:
        rec = await asyncio.to_thread(jobs.store.create, request_json, owner,
                                      jobs.cfg.max_unfinished_per_key if owner is not None else None)
    except JobRejected as rej:
        raise ApiError(rej.status, {"message": rej.message, "code": rej.code},
                       {"Retry-After": retry_after_header(jobs.cfg.queue_full_retry_after_s)}) from None
    jobs.submit(rec)
    # url_for includes the app's root path, which Serve sets to the route prefix (a bare "/v1/jobs/..." would
    # point outside an app deployed under, say, /sd).
    location = request.url_for("get_job", job_id=rec["id"]).path
    return JSONResponse({"id": rec["id"], "status": "queued"}, 202, headers={"Location": location})


@router.get("/v1/jobs/{job_id}", summary="Job status, progress, queue position, timestamps")
async def get_job(job_id: str, request: Request, caller: str = Depends(authorize)):
    rec = _owned(request, job_id, caller)
    return _view(_jobs(request), rec)


@router.get("/v1/jobs/{job_id}/result", summary="Job result: JSON (base64 images + seeds), or one image as bytes")
async def get_job_result(job_id: str, request: Request, caller: str = Depends(authorize)):
    rec = _owned(request, job_id, caller)
    if rec["status"] != JobStatus.SUCCEEDED:
        raise ApiError(409, {"message": f"job is {rec['status']}, no result", "status": rec["status"],
                             "error": rec.get("error"), "code": "not_ready"})
    result = await asyncio.to_thread(_jobs(request).store.read_result, job_id)
    if result is None:
        raise ApiError(410, {"message": "result expired or deleted (retention)", "code": "result_gone"})
    accept = request.headers.get("accept", "")
    if len(result["images"]) == 1 and accept.startswith("image/"):
        img = result["images"][0]
        return Response(base64.b64decode(img["b64_json"]), media_type=img["media_type"],
                        headers={"X-Seed": str(img["seed"])})
    return result


@router.delete("/v1/jobs/{job_id}", summary="Cancel: a queued job never runs, a running one stops at its next step")
async def cancel_job(job_id: str, request: Request, caller: str = Depends(authorize)):
    jobs = _jobs(request)
    rec = _owned(request, job_id, caller)
    if rec["status"] in TERMINAL:
        return _view(jobs, rec)
    jobs.store.request_cancel(job_id)
    # A queued job is cancelled now (it never runs); a running one is `cancelling` until its next step.
    cancelled = jobs.store.update(job_id, expect=[JobStatus.QUEUED], status=JobStatus.CANCELLED,
                                  finished_at=time.time())
    if cancelled is not None:
        count_error("cancelled", rec["request"].get("model"))
    rec = (cancelled or jobs.store.update(job_id, expect=[JobStatus.RUNNING], status=JobStatus.CANCELLING)
           or jobs.store.get(job_id) or rec)
    return _view(jobs, rec)


@router.get("/v1/jobs/{job_id}/events", summary="Server-Sent Events until the job ends: job views (status, "
            "progress, queue position) and `preview` events (base64 JPEGs every previews.every_n_steps)")
async def job_events(job_id: str, request: Request, caller: str = Depends(authorize)):
    jobs = _jobs(request)
    ingress = request.app.state.ingress
    _owned(request, job_id, caller)

    async def events():
        last, shown = None, None
        while True:
            rec = jobs.store.get(job_id)
            if rec is None:
                return
            preview = rec.get("preview")  # {step, total, images: [base64 JPEG]} from the model's stream
            if preview and rec["status"] == JobStatus.RUNNING and preview["step"] != shown:
                yield f"event: preview\ndata: {json.dumps(preview)}\n\n"
                shown = preview["step"]
            view = _view(jobs, rec)
            if view != last:
                yield f"data: {json.dumps(view)}\n\n"
                last = view
            if rec["status"] in TERMINAL or ingress.gate.draining:  # draining: the client reconnects elsewhere
                return
            await asyncio.sleep(0.2)

    return StreamingResponse(events(), media_type="text/event-stream")
