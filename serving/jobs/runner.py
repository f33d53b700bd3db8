"""Running one job: stream it through the model deployment, record progress, honour cancel, retry on replica loss."""
from __future__ import annotations

import asyncio
import logging
import time

from core.schemas import GenerationError, GenerationRequest
from serving.payloads import result_json

log = logging.getLogger("ray.serve")
PROGRESS_EVERY_S = 0.1  # at most ~10 record writes a second per job


def _is_replica_loss(err: BaseException) -> bool:
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
    from ray.serve.exceptions import DeploymentUnavailableError

    return isinstance(err, (RayActorError, ActorDiedError, ActorUnavailableError, DeploymentUnavailableError))


async def run_job(store, handles: dict, job_id: str, default_model: str, max_retries: int) -> None:
    """Run a queued job to a terminal state. Never raises: every failure ends as status 'failed' with a reason."""
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


class RedisJobs:
    """Backend 'redis': records, queue, cancel flags and leases live in Redis; every ingress replica consumes.

    A job is claimed atomically (queue -> lease), run by `run_job`, and its lease renewed every lease_s/3 while it
    runs. Whoever finds a lapsed lease (its worker died: ingress killed, node lost) queues the job again, ahead
    of newer ones, or fails it with the reason once it used max_retries + 1 attempts. A worker that finds its own
    lease gone stops (another worker owns the job now); a job with no progress for stale_after_s is failed.
    """

    POLL_S = 0.1

    def __init__(self, cfg, handles: dict, default_model: str):
        from serving.jobs.store import JobStore

        self.cfg, self.handles, self.default_model = cfg, handles, default_model
        self.store = JobStore(cfg)
        self.records = self.store.records
        self.store.sweep_results()
        self._running: dict[str, asyncio.Task] = {}
        self._loops: list[asyncio.Task] = []
        try:
            self._start(asyncio.get_running_loop())  # Serve runs the replica's constructor on its event loop
        except RuntimeError:
            pass  # no loop yet: started by the first submit()

    def _start(self, loop) -> None:
        if not self._loops:
            self._loops = [loop.create_task(self._dispatch()), loop.create_task(self._keeper())]

    def submit(self, rec: dict) -> None:
        self._start(asyncio.get_running_loop())  # the record is already queued in Redis by store.create

    async def _dispatch(self) -> None:
        while True:
            try:
                if len(self._running) >= self.cfg.concurrency:
                    await asyncio.sleep(self.POLL_S)
                    continue
                job_id = await asyncio.to_thread(self.records.claim, self.cfg.lease_s)
                if job_id is None:
                    await asyncio.sleep(self.POLL_S)
                    continue
                task = asyncio.get_running_loop().create_task(self._run(job_id))
                self._running[job_id] = task
            except asyncio.CancelledError:
                raise
            except Exception as err:  # noqa: BLE001 - Redis briefly unreachable: keep consuming
                log.warning("jobs: dispatch error %s: %s", type(err).__name__, err)
                await asyncio.sleep(1.0)

    async def _run(self, job_id: str) -> None:
        try:
            await run_job(self.store, self.handles, job_id, self.default_model, self.cfg.max_retries)
        finally:
            # Not ours any more when the keeper popped it (lease lost): the lease is another worker's, leave it.
            if self._running.pop(job_id, None) is not None:
                try:
                    await asyncio.to_thread(self.records.release, job_id)
                except Exception as err:  # noqa: BLE001 - the lease lapses; the keeper then sees the job terminal
                    log.warning("jobs: release %s failed: %s", job_id, err)

    async def _keeper(self) -> None:
        """Renew our leases, stop jobs whose lease we lost or that stalled, recover jobs of dead workers."""
        while True:
            try:
                await asyncio.sleep(self.cfg.lease_s / 3)
                lost = await asyncio.to_thread(self.records.renew, list(self._running), self.cfg.lease_s)
                for job_id in lost:
                    log.warning("jobs: lease of %s lapsed (event loop blocked?); another worker owns it", job_id)
                    task = self._running.pop(job_id, None)
                    if task:
                        task.cancel()
                now = time.time()
                for job_id, task in list(self._running.items()):
                    rec = self.store.get(job_id)
                    if rec and rec["status"] == "running" and now - rec["updated_at"] > self.cfg.stale_after_s:
                        task.cancel()
                        self.store.update(job_id, status="failed", finished_at=now,
                                          error=f"stalled: no progress for {self.cfg.stale_after_s:.0f} s")
                for job_id in await asyncio.to_thread(self.records.expired_leases):
                    self._recover(job_id)
            except asyncio.CancelledError:
                raise
            except Exception as err:  # noqa: BLE001
                log.warning("jobs: keeper error %s: %s", type(err).__name__, err)

    def _recover(self, job_id: str) -> None:
        from serving.jobs.store import TERMINAL

        rec = self.store.get(job_id)
        if rec is None or rec["status"] in TERMINAL:
            return
        used = rec["attempts"] if rec["status"] == "running" else rec["attempts"] + 1  # died before it started
        if used > self.cfg.max_retries:
            log.warning("jobs: %s lost its worker; failed after %d attempt(s)", job_id, used)
            self.store.update(job_id, status="failed", finished_at=time.time(), attempts=used,
                              error=f"worker lost (lease expired) after {used} attempt(s)")
        else:
            log.warning("jobs: %s lost its worker (attempt %d); queued again", job_id, used)
            self.store.update(job_id, status="queued", attempts=used)  # keeps its submit order: runs first


def make_jobs(cfg, handles: dict, default_model: str):
    return RedisJobs(cfg, handles, default_model) if cfg.backend == "redis" else LocalJobs(cfg, handles, default_model)
