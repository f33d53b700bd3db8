"""Job records in SQLite (backend `local`): durable without an external server (stdlib sqlite3, WAL).

One row per job: the record as JSON plus the columns the queue needs (status, submit order, owner, the cancel flag
and the lease). The queue is `status = 'queued' AND lease_until IS NULL` in submit order; a claimed job holds a
lease until its worker releases it, exactly like the Redis backend, so a job whose worker died (kill -9, crash)
is found by its lapsed lease after a restart and queued again (bounded) or failed with the reason.

WAL with synchronous=NORMAL: a committed write survives the process being killed (only an OS crash or power loss
may lose the last commits). One file per server; not for several hosts (use backend redis for several ingress
replicas): SQLite over a network filesystem is not safe.
"""
from __future__ import annotations

import json
import os
import sqlite3
import threading
import time

from serving.jobs.states import TERMINAL, JobRejected

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    status TEXT NOT NULL,
    owner TEXT,
    updated_at REAL NOT NULL,
    record TEXT NOT NULL,
    cancel INTEGER NOT NULL DEFAULT 0,
    lease_until REAL
);
CREATE INDEX IF NOT EXISTS jobs_queue ON jobs (status, seq);
CREATE INDEX IF NOT EXISTS jobs_owner ON jobs (owner, status);
CREATE INDEX IF NOT EXISTS jobs_lease ON jobs (lease_until);
"""
_TERMINAL_SQL = "(" + ", ".join(f"'{s}'" for s in sorted(TERMINAL)) + ")"


class SqliteRecords:
    def __init__(self, path: str):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.path = path
        # One connection shared by the event loop and worker threads, serialized by a lock (calls are sub-ms).
        self.db = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
        self._lock = threading.RLock()
        with self._lock:
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.executescript(_SCHEMA)

    def _txn(self, fn):
        """Run fn(cursor) in one write transaction (BEGIN IMMEDIATE: other processes on the file wait)."""
        with self._lock:
            cur = self.db.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                out = fn(cur)
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            cur.execute("COMMIT")
            return out

    @staticmethod
    def _write(cur, rec: dict) -> None:
        cur.execute("INSERT INTO jobs (id, seq, status, owner, updated_at, record) VALUES (?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT(id) DO UPDATE SET status = excluded.status, updated_at = excluded.updated_at, "
                    "record = excluded.record",
                    (rec["id"], rec["seq"], rec["status"], rec["owner"], rec["updated_at"], json.dumps(rec)))

    # ------------------------------------------------------------------ records
    def create(self, rec: dict, retention_s: float, max_queued: int, owner_quota: int | None) -> None:
        def fn(cur):
            (queued,) = cur.execute("SELECT COUNT(*) FROM jobs WHERE status = 'queued' AND lease_until IS NULL"
                                    ).fetchone()
            if queued >= max_queued:
                raise JobRejected(503, f"the job queue is full ({queued} queued); retry later", "queue_full")
            if owner_quota is not None and rec["owner"] is not None:
                (active,) = cur.execute(f"SELECT COUNT(*) FROM jobs WHERE owner = ? AND status NOT IN "
                                        f"{_TERMINAL_SQL}", (rec["owner"],)).fetchone()
                if active >= owner_quota:
                    raise JobRejected(429, f"this API key has {active} unfinished jobs (quota {owner_quota}); "
                                      "wait for some to finish", "job_quota_exceeded")
            self._write(cur, rec)
        self._txn(fn)

    def get(self, job_id: str) -> dict | None:
        with self._lock:
            row = self.db.execute("SELECT record FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return json.loads(row[0]) if row else None

    def update(self, job_id: str, fields: dict, retention_s: float, expect=None) -> dict | None:
        """Merge `fields` into the record atomically; None when missing or its status is not in `expect`."""
        def fn(cur):
            row = cur.execute("SELECT record FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                return None
            rec = json.loads(row[0])
            if expect is not None and rec["status"] not in expect:
                return None
            rec.update(fields)
            self._write(cur, rec)
            return rec
        return self._txn(fn)

    def queue_position(self, rec: dict) -> int:
        with self._lock:
            (n,) = self.db.execute("SELECT COUNT(*) FROM jobs WHERE status = 'queued' AND lease_until IS NULL "
                                   "AND seq < ?", (rec["seq"],)).fetchone()
        return n

    def queued_count(self) -> int:
        with self._lock:
            (n,) = self.db.execute("SELECT COUNT(*) FROM jobs WHERE status = 'queued' AND lease_until IS NULL"
                                   ).fetchone()
        return n

    def request_cancel(self, job_id: str, retention_s: float) -> None:
        self._txn(lambda cur: cur.execute("UPDATE jobs SET cancel = 1 WHERE id = ?", (job_id,)))

    def cancel_requested(self, job_id: str) -> bool:
        with self._lock:
            row = self.db.execute("SELECT cancel FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return bool(row and row[0])

    def delete_finished_before(self, cutoff: float) -> list[str]:
        """Retention: drop finished records last written before `cutoff`; returns their ids."""
        def fn(cur):
            ids = [r[0] for r in cur.execute(f"SELECT id FROM jobs WHERE status IN {_TERMINAL_SQL} AND "
                                             "updated_at < ?", (cutoff,))]
            cur.executemany("DELETE FROM jobs WHERE id = ?", [(i,) for i in ids])
            return ids
        return self._txn(fn)

    def ping(self) -> None:
        with self._lock:
            self.db.execute("SELECT 1").fetchone()

    # ------------------------------------------------------------------ queue + leases
    def claim(self, lease_s: float) -> str | None:
        """Lease the oldest queued job to the caller (one transaction: never claimed twice)."""
        def fn(cur):
            row = cur.execute("SELECT id FROM jobs WHERE status = 'queued' AND lease_until IS NULL "
                              "ORDER BY seq LIMIT 1").fetchone()
            if row is None:
                return None
            cur.execute("UPDATE jobs SET lease_until = ? WHERE id = ?", (time.time() + lease_s, row[0]))
            return row[0]
        return self._txn(fn)

    def renew(self, job_ids: list[str], lease_s: float) -> list[str]:
        """Extend the leases of `job_ids`; returns those whose lease was gone (reaped: another worker owns them)."""
        def fn(cur):
            lost = []
            for jid in job_ids:
                cur.execute("UPDATE jobs SET lease_until = ? WHERE id = ? AND lease_until IS NOT NULL",
                            (time.time() + lease_s, jid))
                if cur.rowcount == 0:
                    lost.append(jid)
            return lost
        return self._txn(fn) if job_ids else []

    def release(self, job_id: str) -> None:
        self._txn(lambda cur: cur.execute("UPDATE jobs SET lease_until = NULL WHERE id = ?", (job_id,)))

    def expired_leases(self) -> list[str]:
        """Remove and return the jobs whose lease lapsed (each goes to exactly one caller)."""
        def fn(cur):
            ids = [r[0] for r in cur.execute("SELECT id FROM jobs WHERE lease_until < ?", (time.time(),))]
            cur.executemany("UPDATE jobs SET lease_until = NULL WHERE id = ?", [(i,) for i in ids])
            return ids
        return self._txn(fn)

    def close(self) -> None:
        with self._lock:
            self.db.close()
