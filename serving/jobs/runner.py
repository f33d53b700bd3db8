"""Running jobs: stream each through the model deployment, record progress, honour cancel, retry on replica loss.

One worker per ingress replica (`JobWorker`), the same for both backends: it claims queued jobs in submit order
(a claim leases the job to this worker), renews its leases every lease_s/3 while they run, and recovers jobs
whose lease lapsed (their worker died: ingress killed, server killed with kill -9, node lost): queued again ahead
of newer jobs, or failed with the reason once they used max_retries + 1 attempts. Retention runs here too.
On shutdown (`drain`) running jobs are queued again, their interrupted attempt not counted.
"""
from __future__ import annotations

import asyncio
import logging
import time

from core.schemas import GenerationError, GenerationRequest
from serving.jobs.states import TERMINAL, JobStatus
from serving.metrics import count_error
from serving.payloads import result_json

log = logging.getLogger("ray.serve")
PROGRESS_EVERY_S = 0.1  # at most ~10 record writes a second per job
RUNNABLE = (JobStatus.QUEUED, JobStatus.RUNNING)


def _is_replica_loss(err: BaseException) -> bool:
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
    from ray.serve.exceptions import DeploymentUnavailableError

    return isinstance(err, (RayActorError, ActorDiedError, ActorUnavailableError, DeploymentUnavailableError))


def _cancelled(store, job_id: str, progress=None) -> None:
    fields = {"finished_at": time.time()}
    if progress is not None:
        fields["progress"] = progress
    store.update(job_id, status=JobStatus.CANCELLED, **fields)


async def _cancel_on_exit(stream):
    """The stream's events; when the consuming task is cancelled (a drain queues the job again, a shutdown) the
    model replica's generation is cancelled too. Serve does not do that for a background task: the replica would
    finish the abandoned job, holding its slot and delaying its own shutdown up to graceful_shutdown_timeout_s."""
    try:
        async for event in stream:
            yield event
    except asyncio.CancelledError:
        stream.cancel()
        raise


async def run_job(store, handles: dict, job_id: str, default_model: str, max_retries: int) -> None:
    """Run a queued job to a terminal state. Never raises (but asyncio cancellation): every failure ends as
    status 'failed' with a reason."""
    rec = store.get(job_id)
    if rec is None or rec["status"] in TERMINAL:
        return
    if store.cancel_requested(job_id):  # cancelled while queued: never runs
        _cancelled(store, job_id)
        return
    req = GenerationRequest.model_validate(rec["request"])
    handle = handles[req.model or default_model].options(stream=True)
    attempt = rec["attempts"]
    while True:
        attempt += 1
        running = store.update(job_id, expect=RUNNABLE, status=JobStatus.RUNNING,
                               started_at=rec["started_at"] or time.time(), attempts=attempt)
        if running is None:  # cancelled (or finished elsewhere) meanwhile
            return
        try:
            outcome, last = None, 0.0
            stream = handle.generate_stream.remote(req)
            async for event in _cancel_on_exit(stream):
                if event["event"] == "progress":
                    progress = {"step": event["step"], "total": event["total"]}
                    if store.cancel_requested(job_id):
                        stream.cancel()
                        _cancelled(store, job_id, progress)
                        count_error("cancelled", req.model or default_model)
                        return
                    now = time.monotonic()
                    if now - last >= PROGRESS_EVERY_S or event["step"] == event["total"]:
                        store.update(job_id, progress=progress)
                        last = now
                elif event["event"] == "preview":  # the latest only: the events route streams it once
                    store.update(job_id, preview={k: event[k] for k in ("step", "total", "images")})
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
            store.update(job_id, status=JobStatus.FAILED, finished_at=time.time(),
                         error=f"{reason} after {attempt} attempt(s): {type(err).__name__}: {err}"[:2000])
            return
    if isinstance(outcome, GenerationError):
        status = JobStatus.CANCELLED if outcome.kind == "cancelled" else JobStatus.FAILED
        store.update(job_id, status=status, finished_at=time.time(), error=outcome.message,
                     error_kind=outcome.kind, error_field=outcome.field)
        return
    await asyncio.to_thread(store.write_result, job_id, result_json(outcome))
    progress = {"step": outcome.steps, "total": outcome.steps}
    store.update(job_id, status=JobStatus.SUCCEEDED, finished_at=time.time(), progress=progress,
                 seeds=[i.seed for i in outcome.images])


class JobWorker:
    """Consumes the store's queue with up to `concurrency` jobs at once (see the module docstring)."""

    POLL_S = 0.1  # Redis: other replicas' submits are seen within this; local submits wake the loop at once

    def __init__(self, cfg, handles: dict, default_model: str, store=None):
        from serving.jobs.store import JobStore

        self.cfg, self.handles, self.default_model = cfg, handles, default_model
        self.store = store if store is not None else JobStore(cfg)
        self.records = self.store.records
        self._running: dict[str, asyncio.Task] = {}
        self._loops: list[asyncio.Task] = []
        self._wake: asyncio.Event | None = None
        self._draining = False
        try:
            self._start(asyncio.get_running_loop())  # Serve runs the replica's constructor on its event loop
        except RuntimeError:
            pass  # no loop yet: started by the first submit()

    def _start(self, loop) -> None:
        if not self._loops and not self._draining:
            self._wake = asyncio.Event()
            self._loops = [loop.create_task(self._dispatch()), loop.create_task(self._keeper())]

    def submit(self, rec: dict) -> None:
        """The record is already queued by store.create; wake the dispatcher."""
        self._start(asyncio.get_running_loop())
        if self._wake is not None:
            self._wake.set()

    async def _dispatch(self) -> None:
        while not self._draining:
            try:
                job_id = None
                if len(self._running) < self.cfg.concurrency:
                    job_id = await asyncio.to_thread(self.records.claim, self.cfg.lease_s)
                if job_id is None:
                    self._wake.clear()
                    try:
                        await asyncio.wait_for(self._wake.wait(), self.POLL_S)
                    except asyncio.TimeoutError:
                        pass
                    continue
                if self._draining:  # claimed while drain began: give it straight back
                    await asyncio.to_thread(self.records.release, job_id)
                    return
                self._running[job_id] = asyncio.get_running_loop().create_task(self._run(job_id))
            except asyncio.CancelledError:
                raise
            except Exception as err:  # noqa: BLE001 - backend briefly unreachable: keep consuming
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
                if self._wake is not None:
                    self._wake.set()  # a slot is free

    async def _keeper(self) -> None:
        """Renew our leases, stop jobs whose lease we lost or that stalled, recover jobs of dead workers,
        and apply retention."""
        next_sweep = 0.0
        while not self._draining:
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
                    if rec and rec["status"] in ("running", "cancelling") and \
                            now - rec["updated_at"] > self.cfg.stale_after_s:
                        task.cancel()
                        self.store.update(job_id, status=JobStatus.FAILED, finished_at=now,
                                          error=f"stalled: no progress for {self.cfg.stale_after_s:.0f} s")
                for job_id in await asyncio.to_thread(self.records.expired_leases):
                    self.recover(job_id)
                if now >= next_sweep:
                    next_sweep = now + self.cfg.sweep_interval_s
                    await asyncio.to_thread(self.store.sweep)
            except asyncio.CancelledError:
                raise
            except Exception as err:  # noqa: BLE001
                log.warning("jobs: keeper error %s: %s", type(err).__name__, err)

    def recover(self, job_id: str) -> None:
        """A job whose worker died: queued again (keeps its submit order: runs first) or failed, bounded."""
        rec = self.store.get(job_id)
        if rec is None or rec["status"] in TERMINAL:
            return
        if rec["status"] == "cancelling":
            _cancelled(self.store, job_id)
            return
        used = rec["attempts"] if rec["status"] == "running" else rec["attempts"] + 1  # died before it started
        if used > self.cfg.max_retries:
            log.warning("jobs: %s lost its worker; failed after %d attempt(s)", job_id, used)
            self.store.update(job_id, status=JobStatus.FAILED, finished_at=time.time(), attempts=used,
                              error=f"worker lost (lease expired) after {used} attempt(s)")
        else:
            log.warning("jobs: %s lost its worker (attempt %d); queued again", job_id, used)
            self.store.update(job_id, status=JobStatus.QUEUED, attempts=used)

    async def drain(self) -> list[str]:
        """Stop claiming; queue every running job again (its interrupted attempt not counted) for the next
        worker or the next start. Returns the requeued ids."""
        self._draining = True
        for task in self._loops:
            task.cancel()
        requeued = []
        for job_id, task in list(self._running.items()):
            self._running.pop(job_id, None)  # ours to hand back, not the task's finally
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            rec = self.store.get(job_id)
            if rec is not None and rec["status"] == "running":
                self.store.update(job_id, expect=("running",), status=JobStatus.QUEUED, progress=None,
                                  attempts=max(0, rec["attempts"] - 1))
                requeued.append(job_id)
            elif rec is not None and rec["status"] == "cancelling":
                _cancelled(self.store, job_id)
            await asyncio.to_thread(self.records.release, job_id)
        if requeued:
            log.info("jobs: drained; %d running job(s) queued again: %s", len(requeued), requeued)
        return requeued


def make_jobs(cfg, handles: dict, default_model: str) -> JobWorker:
    return JobWorker(cfg, handles, default_model)
