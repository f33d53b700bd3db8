"""Job records in Redis (backend `redis`): shared by every ingress replica; keys expire after the retention.

Keys under the prefix: `job:<id>` (the record, JSON), `cancel:<id>` (the cancel flag, separate so a progress write
never overwrites it), `queued` (sorted set, score = submit order: the queue position is the rank), `leases` (sorted
set of claimed jobs, score = lease expiry) and `active:<owner>` (unfinished jobs per API key, for the quota).
"""
from __future__ import annotations

import json
import time

from serving.jobs.states import TERMINAL, JobRejected

NO_OWNER = "-"


class RedisRecords:
    def __init__(self, url: str, prefix: str = "sdserve"):
        import redis

        self.r = redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=2)
        self.prefix = prefix

    def _k(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    def _write(self, pipe, rec: dict, retention_s: float) -> None:
        pipe.set(self._k("job", rec["id"]), json.dumps(rec), ex=int(retention_s))
        if rec["status"] == "queued":
            pipe.zadd(self._k("queued"), {rec["id"]: rec["seq"]})
        else:
            pipe.zrem(self._k("queued"), rec["id"])
        if rec["status"] in TERMINAL:
            pipe.zrem(self._k("active", rec["owner"] or NO_OWNER), rec["id"])

    # Bounds and insert in one script: concurrent submits on several replicas never overshoot them.
    _CREATE = """
if tonumber(ARGV[4]) > 0 and redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[4]) then return 'queue_full' end
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', ARGV[7])
if tonumber(ARGV[5]) > 0 and redis.call('ZCARD', KEYS[3]) >= tonumber(ARGV[5]) then
  return 'quota:' .. redis.call('ZCARD', KEYS[3])
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[8])
redis.call('ZADD', KEYS[3], ARGV[6], ARGV[8])
return 'ok'
"""

    def create(self, rec: dict, retention_s: float, max_queued: int, owner_quota: int | None) -> None:
        quota = owner_quota if (owner_quota is not None and rec["owner"] is not None) else 0
        got = self.r.eval(self._CREATE, 3, self._k("job", rec["id"]), self._k("queued"),
                          self._k("active", rec["owner"] or NO_OWNER), json.dumps(rec), rec["seq"],
                          int(retention_s), max_queued, quota, rec["created_at"], time.time() - retention_s,
                          rec["id"])
        got = got.decode() if isinstance(got, bytes) else got
        if got == "queue_full":
            raise JobRejected(503, "the job queue is full; retry later", "queue_full")
        if got.startswith("quota:"):
            raise JobRejected(429, f"this API key has {got[6:]} unfinished jobs (quota {owner_quota}); wait for "
                              "some to finish", "job_quota_exceeded")

    def get(self, job_id: str) -> dict | None:
        raw = self.r.get(self._k("job", job_id))
        return json.loads(raw) if raw else None

    def update(self, job_id: str, fields: dict, retention_s: float, expect=None) -> dict | None:
        """Merge `fields` into the record atomically (WATCH/MULTI, retried on a concurrent write)."""
        key = self._k("job", job_id)

        def txn(pipe):
            raw = pipe.get(key)
            if raw is None:
                return None
            rec = json.loads(raw)
            if expect is not None and rec["status"] not in expect:
                return None
            rec.update(fields)
            pipe.multi()
            self._write(pipe, rec, retention_s)
            return rec

        return self.r.transaction(txn, key, value_from_callable=True)

    def queue_position(self, rec: dict) -> int:
        rank = self.r.zrank(self._k("queued"), rec["id"])
        return int(rank) if rank is not None else 0

    def queued_count(self) -> int:
        return int(self.r.zcard(self._k("queued")))

    def request_cancel(self, job_id: str, retention_s: float) -> None:
        self.r.set(self._k("cancel", job_id), "1", ex=int(retention_s))

    def cancel_requested(self, job_id: str) -> bool:
        return bool(self.r.exists(self._k("cancel", job_id)))

    def delete_finished_before(self, cutoff: float) -> list[str]:
        return []  # records expire by their TTL (retention_s after the last write)

    def ping(self) -> None:
        self.r.ping()

    # The queue is the `queued` sorted set; a claimed job moves atomically to `leases` (score = lease expiry),
    # which its worker renews while it runs.
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

    def close(self) -> None:
        self.r.close()
