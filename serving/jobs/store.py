"""Job records (status, progress, timestamps, owner) and results (fsspec).

Records live in Redis (backend redis, shared by the ingress and the workers; expire after retention) or in the
ingress's memory (backend local). Results are JSON files at `<result_store>/<job id>.json` on any fsspec URI.
The cancel request is a separate flag so a worker's progress write can never overwrite it.
"""
from __future__ import annotations

import json
import threading
import time
import uuid
from typing import Any

TERMINAL = ("succeeded", "failed", "cancelled")


def new_job_id() -> str:
    return "job-" + uuid.uuid4().hex


class LocalRecords:
    def __init__(self):
        self._data: dict[str, dict] = {}
        self._cancel: set[str] = set()
        self._lock = threading.Lock()

    def put(self, rec: dict, retention_s: float) -> None:
        with self._lock:
            self._data[rec["id"]] = dict(rec)
            cutoff = time.time() - retention_s  # expire old finished jobs
            for jid in [j for j, r in self._data.items() if r["status"] in TERMINAL and r["created_at"] < cutoff]:
                del self._data[jid]

    def get(self, job_id: str) -> dict | None:
        with self._lock:
            rec = self._data.get(job_id)
            return dict(rec) if rec else None

    def queue_position(self, rec: dict) -> int:
        with self._lock:
            return sum(1 for r in self._data.values() if r["status"] == "queued" and r["seq"] < rec["seq"])

    def request_cancel(self, job_id: str, retention_s: float) -> None:
        with self._lock:
            self._cancel.add(job_id)

    def cancel_requested(self, job_id: str) -> bool:
        return job_id in self._cancel


class RedisRecords:
    def __init__(self, url: str, prefix: str = "sdserve"):
        import redis

        self.r = redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5)
        self.prefix = prefix

    def _k(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    def put(self, rec: dict, retention_s: float) -> None:
        pipe = self.r.pipeline()
        pipe.set(self._k("job", rec["id"]), json.dumps(rec), ex=int(retention_s))
        if rec["status"] == "queued":
            pipe.zadd(self._k("queued"), {rec["id"]: rec["seq"]})
        else:
            pipe.zrem(self._k("queued"), rec["id"])
        pipe.execute()

    def get(self, job_id: str) -> dict | None:
        raw = self.r.get(self._k("job", job_id))
        return json.loads(raw) if raw else None

    def queue_position(self, rec: dict) -> int:
        rank = self.r.zrank(self._k("queued"), rec["id"])
        return int(rank) if rank is not None else 0

    def request_cancel(self, job_id: str, retention_s: float) -> None:
        self.r.set(self._k("cancel", job_id), "1", ex=int(retention_s))

    def cancel_requested(self, job_id: str) -> bool:
        return bool(self.r.exists(self._k("cancel", job_id)))

    # The queue is the `queued` sorted set (score = submit order, so the queue position is its rank); a claimed
    # job moves atomically to `leases` (score = lease expiry), which its worker renews while it runs.
    _CLAIM = """
local got = redis.call('ZPOPMIN', KEYS[1])
if #got == 0 then return false end
redis.call('ZADD', KEYS[2], ARGV[1], got[1])
return got[1]
"""
    _REAP = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if #ids > 0 then redis.call('ZREM', KEYS[1], unpack(ids)) end
return ids
"""

    def claim(self, lease_s: float) -> str | None:
        """Pop the oldest queued job and lease it to the caller (atomic: a job is never both queued and leased)."""
        got = self.r.eval(self._CLAIM, 2, self._k("queued"), self._k("leases"), time.time() + lease_s)
        return got.decode() if isinstance(got, bytes) else got

    def renew(self, job_ids: list[str], lease_s: float) -> list[str]:
        """Extend the leases of `job_ids`; returns those whose lease was gone (reaped: another worker owns them)."""
        if not job_ids:
            return []
        pipe = self.r.pipeline()
        for jid in job_ids:
            pipe.zadd(self._k("leases"), {jid: time.time() + lease_s}, xx=True, ch=True)
            pipe.zscore(self._k("leases"), jid)
        res = pipe.execute()
        return [jid for jid, score in zip(job_ids, res[1::2]) if score is None]

    def release(self, job_id: str) -> None:
        self.r.zrem(self._k("leases"), job_id)

    def expired_leases(self) -> list[str]:
        """Remove and return the jobs whose lease lapsed (each goes to exactly one caller)."""
        ids = self.r.eval(self._REAP, 1, self._k("leases"), time.time())
        return [i.decode() if isinstance(i, bytes) else i for i in ids]


class JobStore:
    def __init__(self, cfg):
        import fsspec

        self.cfg = cfg
        self.records = RedisRecords(cfg.redis_url, cfg.queue_name) if cfg.backend == "redis" else LocalRecords()
        self.fs, self.root = fsspec.core.url_to_fs(cfg.result_store)
        self.fs.makedirs(self.root, exist_ok=True)

    # records
    def create(self, request: dict, owner: str | None) -> dict:
        now = time.time()
        rec = {"id": new_job_id(), "status": "queued", "owner": owner, "request": request, "created_at": now,
               "started_at": None, "finished_at": None, "updated_at": now, "progress": None, "error": None,
               "attempts": 0, "seq": time.time_ns()}
        self.records.put(rec, self.cfg.retention_s)
        return rec

    def get(self, job_id: str) -> dict | None:
        return self.records.get(job_id)

    def update(self, job_id: str, **fields: Any) -> dict | None:
        rec = self.records.get(job_id)
        if rec is None:
            return None
        rec.update(fields, updated_at=time.time())
        self.records.put(rec, self.cfg.retention_s)
        return rec

    def queue_position(self, rec: dict) -> int:
        return self.records.queue_position(rec)

    def request_cancel(self, job_id: str) -> None:
        self.records.request_cancel(job_id, self.cfg.retention_s)

    def cancel_requested(self, job_id: str) -> bool:
        return self.records.cancel_requested(job_id)

    # results
    def _path(self, job_id: str) -> str:
        return f"{self.root.rstrip('/')}/{job_id}.json"

    def write_result(self, job_id: str, result_json: dict) -> str:
        path = self._path(job_id)
        with self.fs.open(path, "w") as fh:
            json.dump(result_json, fh)
        return path

    def read_result(self, job_id: str) -> dict | None:
        try:
            with self.fs.open(self._path(job_id), "r") as fh:
                return json.load(fh)
        except FileNotFoundError:
            return None

    def sweep_results(self) -> int:
        """Delete results older than the retention; returns how many."""
        cutoff, n = time.time() - self.cfg.retention_s, 0
        for info in self.fs.ls(self.root, detail=True):
            mtime = info.get("mtime") or info.get("LastModified")
            ts = mtime.timestamp() if hasattr(mtime, "timestamp") else mtime
            if info["name"].endswith(".json") and ts is not None and ts < cutoff:
                self.fs.rm(info["name"])
                n += 1
        return n
