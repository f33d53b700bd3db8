"""`sdserve bench gpu`: the side-by-side GPU benchmark (benchmarks/gpu_bench.py)."""
from __future__ import annotations

import argparse


def _bench_gpu(args: argparse.Namespace) -> int:
    from benchmarks.gpu_bench import main

    return main(args.bench_args)


def register(sub) -> None:
    from serving.cli import bench_subparsers  # the one shared `bench` command (argparse refuses two)

    p = bench_subparsers(sub).add_parser("gpu", help="diffusers eager / compiled vs sdserve on the GPU (JSON)",
                                         add_help=False)
    p.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments of python -m benchmarks.gpu_bench")
    p.set_defaults(func=_bench_gpu)
