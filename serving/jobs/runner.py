"""Running one job: stream it through the model deployment, record progress, honour cancel, retry on replica loss."""
from __future__ import annotations

import asyncio
import logging
import time

from core.schemas import GenerationError, GenerationRequest

log = logging.getLogger("ray.serve")
PROGRESS_EVERY_S = 0.1  # at most ~10 record writes a second per job


def _is_replica_loss(err: BaseException) -> bool:
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
    from ray.serve.exceptions import DeploymentUnavailableError

    return isinstance(err, (RayActorError, ActorDiedError, ActorUnavailableError, DeploymentUnavailableError))


async def run_job(store, handles: dict, job_id: str, default_model: str, max_retries: int) -> None:
    """Run a queued job to a terminal state. Never raises: every failure ends as status 'failed' with a reason."""
    from serving.ingress import result_json

    rec = store.get(job_id)
    if rec is None or rec["status"] in ("succeeded", "failed", "cancelled"):
        return
    if store.cancel_requested(job_id):  # cancelled while queued: never runs
        store.update(job_id, status="cancelled", finished_at=time.time())
        return
    req = GenerationRequest.model_validate(rec["request"])
    handle = handles[req.model or default_model].options(stream=True)
    attempt = rec["attempts"]
    while True:
        attempt += 1
        store.update(job_id, status="running", started_at=rec["started_at"] or time.time(), attempts=attempt)
        try:
            outcome, last = None, 0.0
            stream = handle.generate_stream.remote(req)
            async for event in stream:
                if event["event"] == "progress":
                    if store.cancel_requested(job_id):
                        stream.cancel()
                        store.update(job_id, status="cancelled", finished_at=time.time(),
                                     progress={"step": event["step"], "total": event["total"]})
                        return
                    now = time.monotonic()
                    if now - last >= PROGRESS_EVERY_S or event["step"] == event["total"]:
                        store.update(job_id, progress={"step": event["step"], "total": event["total"]})
                        last = now
                else:
                    outcome = event["outcome"]
            break
        except Exception as err:  # noqa: BLE001 - classified below; a job must end in a recorded state
            if _is_replica_loss(err) and attempt <= max_retries:
                log.warning("job %s: model replica lost (%s); retry %d/%d", job_id, type(err).__name__, attempt,
                            max_retries)
                await asyncio.sleep(min(2.0 * attempt, 10))
                continue
            reason = "model replica died" if _is_replica_loss(err) else "error"
            store.update(job_id, status="failed", finished_at=time.time(),
                         error=f"{reason} after {attempt} attempt(s): {type(err).__name__}: {err}"[:2000])
            return
    if isinstance(outcome, GenerationError):
        status = "cancelled" if outcome.kind == "cancelled" else "failed"
        store.update(job_id, status=status, finished_at=time.time(), error=outcome.message,
                     error_kind=outcome.kind, error_field=outcome.field)
        return
    store.write_result(job_id, result_json(outcome))
    progress = {"step": outcome.steps, "total": outcome.steps}
    store.update(job_id, status="succeeded", finished_at=time.time(), progress=progress,
                 seeds=[i.seed for i in outcome.images])


class LocalJobs:
    """Backend 'local': jobs run as asyncio tasks of the ingress, at most `concurrency` at once, FIFO."""

    def __init__(self, cfg, handles: dict, default_model: str):
        from serving.jobs.store import JobStore

        self.cfg, self.handles, self.default_model = cfg, handles, default_model
        self.store = JobStore(cfg)
        self.store.sweep_results()
        self._slots: asyncio.Semaphore | None = None
        self._tasks: set[asyncio.Task] = set()

    def submit(self, rec: dict) -> None:
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.cfg.concurrency)  # created on the replica's event loop
        task = asyncio.get_running_loop().create_task(self._run(rec["id"]))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, job_id: str) -> None:
        async with self._slots:  # asyncio.Semaphore wakes waiters in FIFO order
            await run_job(self.store, self.handles, job_id, self.default_model, self.cfg.max_retries)
