"""Proof for issue #7: several model replicas share one GPU at fractional num_gpus under mixed-size load.

    sdserve bench replicas configs/serve-four-replicas-h100.yaml --out $OUT/replica-proof.json
    python -m benchmarks.replica_proof configs/serve-four-replicas-h100.yaml --out ...        (the same)

Starts Ray (its own local instance unless --address is given) and Serve with the config, records every model
replica (replica id, actor id, pid, GPU ids, GPU fraction, VRAM budget), then fires a seeded random mix of
requests at every model over HTTP, concurrently: sizes from well below the model's default up to the largest
its limits accept (some of them too big for a replica's VRAM budget), 1..max_images_per_request images, a few
step counts. nvidia-smi is polled meanwhile (when there is one) for per-process and total GPU memory.

The proof holds (exit code 0) when: no request ran out of memory (error kind `oom`, HTTP 503 code `oom`); no
request got any other 5xx except clean queue-full backpressure (503 `overloaded`); the only 4xx are clean
capacity rejections; every model served requests; every replica at the end is the one recorded at the start
(same replica ids and pids, no dead or restarted replica actor) and every deployment is HEALTHY. Capacity
rejections are counted; `rejections_exercised` says whether the mix hit the rejection path at all.

On a host without CUDA (smoke test), `--num-gpus 1` gives Ray a logical GPU: placement by fractions is real,
but the engines run on CPU and no VRAM budget exists unless the config sets `memory.vram_budget_gib`.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import logging
import os
import shutil
import sys
import time
from typing import Any

from benchmarks.replica_inventory import GpuPoller, env_info, expected_replicas, replica_pids, snapshot, \
    snapshot_replicas
from benchmarks.replica_load import FAILED_OUTCOMES, clean_rejections, outcome_totals, request_plan, run_load, \
    summarize

log = logging.getLogger("replica_proof")


# ---------------------------------------------------------------------------------------------- the proof
def verdict(report: dict[str, Any]) -> tuple[bool, list[str]]:
    """(passed, failures): the conditions of the module doc, checked on a finished report."""
    failures = []
    totals = outcome_totals(report["requests"])
    for kind in FAILED_OUTCOMES:
        if totals[kind]:
            failures.append(f"{totals[kind]} request(s) with outcome {kind}")
    for name, m in report["by_model"].items():
        if not m["outcomes"].get("ok"):
            failures.append(f"model {name} served no request")
    start, end = report["replicas_start"], report["replicas_end"]
    for name, m in end["models"].items():
        expected = report["expected_replicas"][name]
        first = start["models"][name]["replicas"]
        before = {(r["replica"], r["pid"]) for r in first if r["state"] == "ALIVE"}
        after = {(r["replica"], r["pid"]) for r in m["replicas"] if r["state"] == "ALIVE"}
        if len(before) != expected:
            failures.append(f"model {name}: {len(before)} replica(s) at the start, expected {expected}")
        if after != before:
            failures.append(f"model {name}: replicas changed: {sorted(before)} -> {sorted(after)}")
        known = {r["replica"] for r in first}
        new = [f"{r['replica']} ({r['state']})" for r in m["replicas"] if r["replica"] not in known]
        if new:
            failures.append(f"model {name}: replica actor(s) created during the run: {new}")
        gone = [r["replica"] for r in m["replicas"] if r["replica"] in {b[0] for b in before} and r["state"] != "ALIVE"]
        if gone:
            failures.append(f"model {name}: replica actor(s) died: {gone}")
        if any(r["num_restarts"] for r in m["replicas"]):
            failures.append(f"model {name}: a replica actor restarted")
        if m["status"] != "HEALTHY":
            failures.append(f"model {name}: deployment {m['status']} at the end")
        if m["replica_states"] != {"RUNNING": expected}:
            failures.append(f"model {name}: replica states {m['replica_states']} at the end")
    return not failures, failures


def run_proof(config, *, requests: int = 160, concurrency: int = 16, duration_s: float | None = None,
              seed: int = 0, steps: list[int] | None = None, port: int = 8012, address: str | None = None,
              num_cpus: int | None = None, num_gpus: int | None = None, api_key: str | None = None,
              request_timeout_s: float = 900.0, poll_interval_s: float = 0.5, config_path: str | None = None,
              logs_dir: str | None = None) -> dict[str, Any]:
    """Deploy `config`, load it, check it; the report (with `passed` and `failures`). See the module doc."""
    import ray
    from ray import serve

    from serving.builder import build_app, deployment_options, model_deployment_name

    steps = steps or [4, 6, 8]
    report: dict[str, Any] = {"date": dt.datetime.now().isoformat(timespec="seconds"), "config": config_path,
                              "app": config.app_name, "args": {"requests": requests, "concurrency": concurrency,
                              "duration_s": duration_s, "seed": seed, "steps": steps}}
    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(address=address or "local", num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False,
                 log_to_driver=False)
    report["env"] = env_info()
    resources = ray.cluster_resources()
    report["cluster"] = {"CPU": resources.get("CPU", 0), "GPU": resources.get("GPU", 0)}
    opts = deployment_options(config, cluster_has_gpus=resources.get("GPU", 0) > 0)
    gpus_needed = sum(opts[model_deployment_name(m.name)]["ray_actor_options"]["num_gpus"] * expected_replicas(m)
                      for m in config.models)
    report["deployments"] = {name: {"ray_actor_options": o["ray_actor_options"],
                                    "num_replicas": o.get("num_replicas"), "max_ongoing_requests":
                                    o["max_ongoing_requests"], "max_queued_requests": o["max_queued_requests"]}
                             for name, o in opts.items()}
    report["expected_replicas"] = {m.name: expected_replicas(m) for m in config.models}
    from ray.serve.context import _get_global_client

    started_serve = _get_global_client(raise_if_no_controller_running=False) is None
    try:
        if gpus_needed > resources.get("GPU", 0) + 1e-9:
            raise RuntimeError(f"the config needs {gpus_needed:g} GPUs, the Ray cluster has "
                               f"{resources.get('GPU', 0):g}; on a host without CUDA pass --num-gpus 1 (a logical GPU)")
        serve.start(http_options={"host": "127.0.0.1", "port": port})  # joins a running Serve (keeps its port)
        http_port = _get_global_client().http_config.port
        t0 = time.perf_counter()
        serve.run(build_app(config), name=config.app_name, route_prefix=config.route_prefix)
        report["deploy_s"] = round(time.perf_counter() - t0, 1)
        url = f"http://127.0.0.1:{http_port}{config.route_prefix.rstrip('/')}"
        report["replicas_start"] = snapshot(config, config.app_name)
        report["gpu_available_after_deploy"] = ray.available_resources().get("GPU", 0)

        plan = request_plan(config.models, requests, seed, steps)
        headers = {"Accept": "application/json"}
        key = api_key or next(iter(config.security.effective_api_keys()), None)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        poller = GpuPoller(poll_interval_s).start()
        try:
            records, wall = asyncio.run(run_load(url, plan, concurrency, duration_s, headers, request_timeout_s))
        finally:
            poller.stop()
        report["load"] = {"planned": len(plan), "sent": len(records), "wall_s": round(wall, 1),
                          "images_per_s": round(sum(r.get("images", 0) for r in records) / wall, 3) if wall else 0}
        report["by_model"] = summarize(records, config.model_names)
        time.sleep(2)  # let Serve's controller see any replica that died at the very end
        report["replicas_end"] = snapshot(config, config.app_name)
        # a pid in both snapshots keeps its name at the start
        report["nvidia_smi"] = poller.report(replica_pids(report["replicas_end"], report["replicas_start"]))
        report["requests"] = records
        report["totals"] = outcome_totals(records)
        report["clean_rejections"] = clean_rejections(records)
        report["rejections_exercised"] = bool(report["clean_rejections"])
        replicas = [r for _, r in snapshot_replicas(report["replicas_start"])]
        report["budgets_enforced"] = bool(replicas) and all(
            str(r["device"]).startswith("cuda") and r["vram_budget_bytes"] for r in replicas) and all(
            m.engine.memory.enforce_budget for m in config.models)
        for name, m in report["by_model"].items():
            m["vram_budget_bytes"] = sorted({r["vram_budget_bytes"] for r in
                                             report["replicas_start"]["models"][name]["replicas"]}, key=str)
        report["passed"], report["failures"] = verdict(report)
    except Exception as err:  # noqa: BLE001 - a proof that could not run failed: still write what we have
        import traceback

        report["passed"], report["failures"] = False, [f"the proof did not complete: {type(err).__name__}: {err}"]
        report["traceback"] = traceback.format_exc()
    finally:
        if logs_dir:
            copy_serve_logs(logs_dir)
        if started_ray:
            # Our own Ray: ray.shutdown() ends Serve and every replica with it. The load is over (nothing in
            # flight), so a graceful serve.shutdown() first would only wait out the replicas' shutdown loops.
            ray.shutdown()
            from ray.serve.context import _set_global_client

            _set_global_client(None)  # the dead cluster's Serve client must not outlive it in this process
        elif started_serve:
            serve.shutdown()
        elif ray.is_initialized():
            serve.delete(config.app_name)
    return report


def copy_serve_logs(dest: str) -> None:
    """Serve's controller/proxy/replica logs of this Ray session (the GPU host is gone after the run)."""
    try:
        import ray

        logs = os.path.join(ray._private.worker._global_node.get_session_dir_path(), "logs", "serve")
        shutil.copytree(logs, dest, dirs_exist_ok=True)
    except Exception as err:  # noqa: BLE001
        log.warning("could not copy the Serve logs: %s", err)


# ---------------------------------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="serving YAML, e.g. configs/serve-four-replicas-h100.yaml")
    p.add_argument("--requests", type=int, default=160, help="requests in the plan (models in turn)")
    p.add_argument("--concurrency", type=int, default=16, help="requests in flight at once")
    p.add_argument("--duration-s", type=float, help="stop sending new requests after this long")
    p.add_argument("--seed", type=int, default=0, help="seed of the request plan")
    p.add_argument("--steps", default="4,6,8", help="comma-separated step counts to draw from")
    p.add_argument("--port", type=int, default=8012, help="HTTP port of the Serve proxy it starts")
    p.add_argument("--address", help="Ray cluster to join (default: start a local one)")
    p.add_argument("--num-cpus", type=int, help="CPUs of the local Ray (default: all)")
    p.add_argument("--num-gpus", type=int, help="GPUs of the local Ray (default: detected; 1 on a CPU host gives "
                   "a logical GPU for the smoke test)")
    p.add_argument("--vram-budget-gib", type=float, help="override every model's memory.vram_budget_gib")
    p.add_argument("--api-key", help="Bearer key (default: the config's first key, if any)")
    p.add_argument("--timeout-s", type=float, default=900, help="client timeout per request")
    p.add_argument("--poll-s", type=float, default=0.5, help="nvidia-smi polling interval")
    p.add_argument("--logs", help="copy Serve's logs of the run into this folder")
    p.add_argument("-o", "--out", help="write the JSON report here (a folder: replica-proof.json in it)")


def run_from_args(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from core.config import format_validation_error
    from serving.config import load_serving_config

    try:
        config = load_serving_config(args.config)
        if args.vram_budget_gib is not None:
            for m in config.models:
                m.engine.memory.vram_budget_gib = args.vram_budget_gib
    except (ValidationError, ValueError, OSError) as err:
        print(f"error: {args.config}: {format_validation_error(err)}", file=sys.stderr)
        return 2
    report = run_proof(config, requests=args.requests, concurrency=args.concurrency, duration_s=args.duration_s,
                       seed=args.seed, steps=[int(s) for s in args.steps.split(",")], port=args.port,
                       address=args.address, num_cpus=args.num_cpus, num_gpus=args.num_gpus, api_key=args.api_key,
                       request_timeout_s=args.timeout_s, poll_interval_s=args.poll_s, config_path=args.config,
                       logs_dir=args.logs)
    text = json.dumps(report, indent=1, default=str)
    if args.out:
        path = os.path.join(args.out, "replica-proof.json") if os.path.isdir(args.out) else args.out
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(text + "\n")
    brief = {k: report.get(k) for k in ("passed", "failures", "totals", "rejections_exercised", "budgets_enforced",
                                        "load")}
    brief["by_model"] = {n: {k: m[k] for k in ("outcomes", "rejected_sizes", "largest_served",
                                               "peak_vram_allocated_bytes", "vram_budget_bytes")}
                         for n, m in report.get("by_model", {}).items()}
    brief["nvidia_smi"] = report.get("nvidia_smi")
    if "traceback" in report:
        print(report["traceback"], file=sys.stderr)
    print(json.dumps(brief, indent=1, default=str))
    return 0 if report["passed"] else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.replica_proof", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run_from_args(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
