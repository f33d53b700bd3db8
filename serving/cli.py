"""`sdserve serve`, `sdserve check` and `sdserve bench serve`. register() only adds parsers; Ray is imported
inside the commands."""
from __future__ import annotations

import argparse
import json
import re
import sys

from core.request_flags import add_request_flags, request_fields

SERVE_EXAMPLES = """examples:
  sdserve serve                                              embedded tiny-sd, local Ray, http://127.0.0.1:8000
  sdserve serve configs/serve-default.yaml --port 8001
  sdserve serve configs/serve-two-models-h100.yaml --dry-run --gpus   the computed Serve options only
  sdserve serve configs/serve-default.yaml --address auto    add the app to a running cluster (Ctrl-C removes
                                                             only this app)
"""


def _error(message: str) -> int:
    print(f"error: {message}", file=sys.stderr, flush=True)
    return 2


def _load_config(path: str | None):
    from pydantic import ValidationError

    from core.config import format_validation_error
    from serving.config import load_serving_config

    try:
        return load_serving_config(path)
    except (ValidationError, ValueError, OSError) as err:
        _error(f"{path or 'default config'}: {format_validation_error(err)}")
        return None


def serving_demands(config, cluster_has_gpus: bool) -> list:
    """What the app asks Ray for (per replica), with the config key that sets each resource."""
    from core.preflight import Demand
    from serving.builder import resolve_num_gpus

    demands = []
    for i, m in enumerate(config.models):
        d = m.deployment
        count = d.num_replicas or 1
        if d.autoscaling_config is not None:
            a = d.autoscaling_config
            count = a.initial_replicas if a.initial_replicas is not None else a.min_replicas
        key = f"models[{i}].deployment"
        demands.append(Demand(f"model {m.name!r} replicas", count,
                              {"CPU": d.num_cpus, "GPU": resolve_num_gpus(m, cluster_has_gpus)},
                              {"CPU": f"{key}.num_cpus", "GPU": f"{key}.num_gpus"}))
    i = config.ingress
    demands.append(Demand("ingress replicas", i.num_replicas, {"CPU": i.num_cpus},
                          {"CPU": "ingress.num_cpus"}))
    return demands


def deployment_messages(app_name: str) -> str:
    """Every deployment's status message of `app_name` (a failed replica constructor's traceback is there)."""
    from ray import serve

    try:
        app = serve.status().applications.get(app_name)
    except Exception:  # noqa: BLE001 - best effort: only used to explain a failure
        return ""
    return "\n".join(dep.message for dep in (app.deployments.values() if app else ()) if dep.message)


def one_line(err: BaseException, details: str = "") -> str:
    """A deploy failure carries the replica's whole traceback; the ModelLoadError line is what the user needs."""
    text = f"{err}\n{details}"
    found = re.findall(r"ModelLoadError: (.+)", text)
    if found:
        return found[-1].strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else type(err).__name__


def pending_messages(app_name: str) -> list[str]:
    """Serve's own explanation for deployments of `app_name` that are not running yet (e.g. replicas that
    could not be scheduled for lack of resources), one message per deployment."""
    from ray import serve

    app = serve.status().applications.get(app_name)
    if app is None:
        return []
    out = []
    for name, dep in app.deployments.items():
        status = str(getattr(dep.status, "value", dep.status))
        if status in ("UPDATING", "UPSCALING", "DOWNSCALING") and dep.message:
            out.append(f"{name} is {status.lower()}: {dep.message}")
    return out


def _pending_check_s() -> float:
    """How often `sdserve serve` asks Serve about replicas still pending: 10 s, or SDSERVE_PENDING_CHECK_S (the
    pending-replicas test sets 1 s: Serve states the reason after RAY_SERVE_SLOW_STARTUP_WARNING_S, and the test
    then only waited for this poll)."""
    import os

    return float(os.environ.get("SDSERVE_PENDING_CHECK_S", "10"))


def ray_connection_info(app_name: str) -> list[str]:
    """How other Ray code reaches this app, and where Ray exports the app's metrics (printed at start)."""
    import os

    import ray

    ctx = ray.get_runtime_context()
    node = next((n for n in ray.nodes() if n.get("NodeID") == ctx.get_node_id()), {})
    auth = os.environ.get("RAY_AUTH_MODE", "disabled")
    lines = [f"sdserve: Ray address {ctx.gcs_address} (handles on this machine: serving.local_ray.init_ray(\"{ctx.gcs_address}\") "
             f"with RAY_AUTH_MODE={auth}; then serve.get_deployment_handle(..., app_name=\"{app_name}\"))"]
    port = node.get("MetricsExportPort")
    if port:
        lines.append(f"sdserve: metrics (Prometheus, ray_sdserve_* and ray_serve_*) at "
                     f"http://{node.get('NodeManagerAddress', '127.0.0.1')}:{port}/metrics on this node")
    return lines


def _serve(args: argparse.Namespace) -> int:
    config = _load_config(args.config)
    if config is None:
        return 2
    if args.dry_run:
        from serving.builder import deployment_options

        print(json.dumps(deployment_options(config, cluster_has_gpus=args.gpus), indent=2, default=str))
        return 0
    from core.loading import ModelLoadError, check_source

    if args.address is None:  # local Ray: the replicas read the same paths and cache as this process
        try:
            for m in config.models:
                check_source(m.engine)
        except ModelLoadError as err:
            return _error(str(err))
    import signal
    import threading

    import ray
    from ray import serve

    from core.preflight import PendingWatcher, ResourceError, check_resources
    from serving.builder import build_app
    from serving.drain import drain_app
    from serving.local_ray import init_ray
    from serving.startup import StartupReporter

    init_ray(args.address)  # no address: a local Ray on loopback only (serving/local_ray.py)
    app = config.app_name
    ours = args.address is None  # a Ray we started: shut all of it down at the end; else only our app

    def stop_all(serve_started: bool = True) -> None:
        if ours:
            if serve_started:
                serve.shutdown()
            ray.shutdown()

    def remove_app(graceful: bool = True) -> None:
        """Our app gone: the whole local Ray if we started it, else only this app (other apps stay).

        graceful=False (Ctrl-C before the app ever served): with our own Ray, skip Serve's graceful shutdown, which
        waits its full 30 s for replicas still pending on resources; ray.shutdown() ends every actor anyway."""
        if ours:
            stop_all(serve_started=graceful)
            return
        try:
            serve.delete(app)
        except TimeoutError as err:  # replicas still pending or draining: Serve finishes the deletion itself
            print(f"warning: {err}; Serve keeps deleting it in the background", file=sys.stderr, flush=True)

    resources = ray.cluster_resources()
    if not args.no_resource_check:
        try:
            check_resources(serving_demands(config, resources.get("GPU", 0) > 0), resources)
        except ResourceError as err:
            stop_all(serve_started=False)
            return _error(f"{args.config or 'default config'}: {err}")
    stop = threading.Event()
    # SIGTERM counts from here: one that lands while the app deploys or while the start-up lines print (a
    # readiness probe may already pass then) drains once the app is up, instead of killing the process with
    # requests in flight. Ctrl-C until the app is up removes what started (_deploy).
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    interrupted = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: interrupted.set())  # Ctrl-C while deploying: see _deploy
    serve.start(http_options={"host": args.host, "port": args.port})
    watcher = PendingWatcher(lambda: pending_messages(app),
                             lambda msg: print(f"warning: {msg}", file=sys.stderr, flush=True),
                             every_s=_pending_check_s()).start()
    try:
        with StartupReporter(config):  # per-model replica states, load stages, warm-up and compile results
            _deploy(build_app(config), app, config.route_prefix, interrupted)
    except (RuntimeError, ModelLoadError) as err:
        watcher.stop()
        details = deployment_messages(app)
        remove_app()  # never leave a failed app behind
        return _error(f"app {app!r} failed to deploy: {one_line(err, details)}")
    except KeyboardInterrupt:  # Ctrl-C while deploying: remove what was started, ours only
        watcher.stop()
        remove_app(graceful=False)
        return 130
    url = f"http://{args.host}:{args.port}{config.route_prefix.rstrip('/')}"
    print(f"sdserve: serving {', '.join(config.model_names)} at {url}  (docs: {url}/docs; Ctrl-C stops)",
          flush=True)
    for line in ray_connection_info(app):
        print(line, flush=True)
    if any(m.engine.is_noise_model for m in config.models):
        print("note: embedded models have random weights: images are noise", flush=True)
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    if interrupted.is_set():  # a Ctrl-C between the app coming up and here
        stop.set()
    while not stop.wait(1.0):  # keep serving until a signal
        pass
    watcher.stop()
    drain_app(config)  # 503 for new requests, in-flight ones finish, running jobs queued again (serving/drain.py)
    print(f"sdserve: shutting down {'' if ours else f'app {app!r} (the cluster and its other apps stay)'}",
          flush=True)
    remove_app()
    return 0


def _deploy(application, app: str, route_prefix: str, interrupted) -> None:
    """serve.run's deploy-and-wait, with the waiting in this loop: `interrupted` (set by SIGINT) raises
    KeyboardInterrupt here. Why not serve.run: a Ctrl-C that lands while serve.run waits inside Ray's calls for
    replicas that cannot be placed was lost in the full CI suite (the process went on deploying for minutes)."""
    from ray import serve

    serve.run_many([serve.RunTarget(application, name=app, route_prefix=route_prefix)],
                   wait_for_ingress_deployment_creation=False, wait_for_applications_running=False)
    while True:
        if interrupted.is_set():
            raise KeyboardInterrupt
        status = serve.status().applications.get(app)
        state = str(getattr(status.status, "value", status.status)) if status is not None else None
        if state == "RUNNING":
            return
        if state == "DEPLOY_FAILED":  # serve.run's message
            raise RuntimeError(f"Deploying application {app} failed: {status.message}")
        interrupted.wait(0.25)


def _check(args: argparse.Namespace) -> int:
    from serving.check import check_config_file

    try:
        for line in check_config_file(args.config, check_sources=not args.no_sources):
            print(line)
    except ValueError as err:
        return _error(str(err))
    return 0


def _bench_serve(args: argparse.Namespace) -> int:
    from serving.bench import run_bench

    config = _load_config(args.config)
    if config is None:
        return 2
    body = {**(json.loads(args.body) if args.body else {}), **request_fields(args, args.request_fields)}
    report = run_bench(config, url=args.url, concurrency=[int(c) for c in args.concurrency.split(",")],
                       requests_per_level=args.requests, body=body,
                       api_key=args.api_key, port=args.port, offline=not args.no_offline)
    text = json.dumps(report, indent=2)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as fh:
            fh.write(text + "\n")
    print(text)
    return 0


def bench_subparsers(sub) -> argparse._SubParsersAction:
    """The `bench` command's subparsers, shared with other packages (benchmarks/cli.py may add more)."""
    if "bench" in sub.choices:
        parser = sub.choices["bench"]
        existing = getattr(parser, "_sdserve_sub", None)
        if existing is not None:
            return existing
    parser = sub.add_parser("bench", help="benchmarks")
    parser._sdserve_sub = parser.add_subparsers(dest="bench_command", required=True)
    return parser._sdserve_sub


def register(sub) -> None:
    s = sub.add_parser("serve", help="run the Ray Serve app (HTTP) until Ctrl-C", epilog=SERVE_EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("config", nargs="?", help="serving YAML (configs/serve-*.yaml); default: embedded tiny-sd")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--address", help="Ray cluster address (default: start a local Ray); Ctrl-C then removes only "
                   "this app")
    s.add_argument("--dry-run", action="store_true", help="print the computed deployment options and exit")
    s.add_argument("--gpus", action="store_true", help="with --dry-run: assume the cluster has GPUs")
    s.add_argument("--no-resource-check", action="store_true", help="deploy even when the cluster's live nodes "
                   "lack the CPUs/GPUs the replicas ask for (an autoscaling cluster that will add them)")
    s.set_defaults(func=_serve)

    c = sub.add_parser("check", help="validate a serving, `serve deploy` or batch config without running it",
                       epilog="example: sdserve check configs/serve-deploy.yaml && serve deploy "
                       "configs/serve-deploy.yaml")
    c.add_argument("config", help="configs/serve-*.yaml, a `serve deploy` YAML, or configs/batch-*.yaml")
    c.add_argument("--no-sources", action="store_true", help="skip checking the model sources (paths, cache) "
                   "on this machine")
    c.set_defaults(func=_check)

    b = bench_subparsers(sub).add_parser("serve", help="HTTP load generator: throughput, p50/p95/p99 vs offline "
                                         "engine throughput (JSON)")
    b.add_argument("config", nargs="?", help="serving YAML (for the local app and the offline baseline)")
    b.add_argument("--url", help="benchmark a running server (default: start the app locally)")
    b.add_argument("--port", type=int, default=8011, help="HTTP port of the locally started app")
    b.add_argument("--concurrency", default="1,4,16", help="comma-separated concurrency levels")
    b.add_argument("--requests", type=int, default=32, help="requests per concurrency level")
    b.add_argument("--body", help='JSON request body fields, e.g. \'{"steps": 4, "width": 64}\' (the request '
                   "flags below override it)")
    b.add_argument("--api-key")
    b.add_argument("--no-offline", action="store_true", help="skip the offline engine baseline")
    b.add_argument("-o", "--output", help="also write the JSON report here")
    b.set_defaults(func=_bench_serve, request_fields=add_request_flags(b, exclude=("seed",)))
