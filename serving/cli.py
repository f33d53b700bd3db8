"""`sdserve serve` and `sdserve bench serve`. register() only adds parsers; Ray is imported inside the commands."""
from __future__ import annotations

import argparse
import json
import sys


def _load_config(path: str | None):
    from pydantic import ValidationError

    from core.config import format_validation_error
    from serving.config import load_serving_config

    try:
        return load_serving_config(path)
    except (ValidationError, ValueError, OSError) as err:
        print(f"error: {path or 'default config'}: {format_validation_error(err)}", file=sys.stderr)
        return None


def _serve(args: argparse.Namespace) -> int:
    config = _load_config(args.config)
    if config is None:
        return 2
    if args.dry_run:
        from serving.builder import deployment_options

        print(json.dumps(deployment_options(config, cluster_has_gpus=args.gpus), indent=2, default=str))
        return 0
    import signal
    import threading

    import ray
    from ray import serve

    from serving.builder import build_app
    from serving.drain import drain_app
    from serving.local_ray import init_ray

    init_ray(args.address)  # no address: a local Ray on loopback only (serving/local_ray.py)
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(build_app(config), name=config.app_name, route_prefix=config.route_prefix)
    url = f"http://{args.host}:{args.port}{config.route_prefix.rstrip('/')}"
    print(f"sdserve: serving {', '.join(config.model_names)} at {url}  (docs: {url}/docs; Ctrl-C stops)",
          flush=True)
    if any(m.engine.is_noise_model for m in config.models):
        print("note: embedded models have random weights: images are noise", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1.0):  # keep serving until a signal
        pass
    drain_app(config)  # 503 for new requests, in-flight ones finish, running jobs queued again (serving/drain.py)
    print("sdserve: shutting down", flush=True)
    serve.shutdown()
    ray.shutdown()
    return 0


def _bench_serve(args: argparse.Namespace) -> int:
    from serving.bench import run_bench

    config = _load_config(args.config)
    if config is None:
        return 2
    report = run_bench(config, url=args.url, concurrency=[int(c) for c in args.concurrency.split(",")],
                       requests_per_level=args.requests, body=json.loads(args.body) if args.body else {},
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
    s = sub.add_parser("serve", help="run the Ray Serve app (HTTP) until Ctrl-C")
    s.add_argument("config", nargs="?", help="serving YAML (configs/serve-*.yaml); default: embedded tiny-sd")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--address", help="Ray cluster address (default: start a local Ray)")
    s.add_argument("--dry-run", action="store_true", help="print the computed deployment options and exit")
    s.add_argument("--gpus", action="store_true", help="with --dry-run: assume the cluster has GPUs")
    s.set_defaults(func=_serve)

    b = bench_subparsers(sub).add_parser("serve", help="HTTP load generator: throughput, p50/p95/p99 vs offline "
                                         "engine throughput (JSON)")
    b.add_argument("config", nargs="?", help="serving YAML (for the local app and the offline baseline)")
    b.add_argument("--url", help="benchmark a running server (default: start the app locally)")
    b.add_argument("--port", type=int, default=8011, help="HTTP port of the locally started app")
    b.add_argument("--concurrency", default="1,4,16", help="comma-separated concurrency levels")
    b.add_argument("--requests", type=int, default=32, help="requests per concurrency level")
    b.add_argument("--body", help='JSON request body fields, e.g. \'{"steps": 4, "width": 64}\'')
    b.add_argument("--api-key")
    b.add_argument("--no-offline", action="store_true", help="skip the offline engine baseline")
    b.add_argument("-o", "--output", help="also write the JSON report here")
    b.set_defaults(func=_bench_serve)
