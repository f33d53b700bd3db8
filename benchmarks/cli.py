"""`sdserve bench gpu` (benchmarks/gpu_bench.py), `sdserve bench replicas` (benchmarks/replica_proof.py),
`sdserve bench load` (benchmarks/load.py) and `sdserve bench previews` (benchmarks/preview_cost.py)."""
from __future__ import annotations

import argparse


def _bench_gpu(args: argparse.Namespace) -> int:
    from benchmarks.gpu_bench import main

    return main(args.bench_args)


def _bench_previews(args: argparse.Namespace) -> int:
    from benchmarks.preview_cost import main

    return main(args.bench_args)


def _bench_replicas(args: argparse.Namespace) -> int:
    from benchmarks.replica_proof import run_from_args

    return run_from_args(args)


def _bench_load(args: argparse.Namespace) -> int:
    import sys

    from benchmarks.load import check_arguments, run_from_args

    argv = sys.argv[sys.argv.index("load") + 1:] if "load" in sys.argv else []  # recorded as the command
    return run_from_args(check_arguments(args._load_parser, args), argv)


def register(sub) -> None:
    from benchmarks.load import add_arguments as add_load_arguments  # stdlib-only at import: cheap
    from benchmarks.replica_proof import add_arguments  # stdlib-only at import: cheap
    from serving.cli import bench_subparsers  # the one shared `bench` command (argparse refuses two)

    bench = bench_subparsers(sub)
    p = bench.add_parser("gpu", help="diffusers eager / compiled vs sdserve on the GPU (JSON)", add_help=False)
    p.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments of python -m benchmarks.gpu_bench")
    p.set_defaults(func=_bench_gpu)

    v = bench.add_parser("previews", help="cost of live previews (latent2rgb, TAESD) vs none, timed in turns (JSON)",
                         add_help=False)
    v.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments of python -m benchmarks.preview_cost")
    v.set_defaults(func=_bench_previews)

    r = bench.add_parser("replicas", help="issue #7 proof: fractional-GPU replicas under mixed-size concurrent "
                         "load; no OOM, no 5xx, no replica lost (JSON; exit code 1 when it fails)")
    add_arguments(r)
    r.set_defaults(func=_bench_replicas)

    ld = bench.add_parser("load", help="issue 18: open-loop Poisson load at fractions of the measured capacity, "
                          "per traffic profile and admission, in-process or HTTP (JSON records)")
    add_load_arguments(ld)
    ld.set_defaults(func=_bench_load, _load_parser=ld)
