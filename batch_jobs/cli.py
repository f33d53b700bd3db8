"""`sdserve batch`, `sdserve make-prompts`, `sdserve bench batch`. register() only adds parsers; Ray is imported
inside the commands, so other subcommands never pay for it."""
from __future__ import annotations

import argparse
import json
import logging
import sys

from core.request_flags import add_request_flags, request_fields

BATCH_EXAMPLES = """examples:
  sdserve make-prompts 200 prompts.parquet
  sdserve batch prompts.parquet out/ --config configs/batch-tiny.yaml      local Ray; rerun on out/ resumes
  ray job submit --address http://127.0.0.1:8265 --working-dir . -- sdserve batch s3://b/prompts/ s3://b/runs/r1 \\
      --config configs/batch-sd15.yaml --concurrency 8 --num-gpus 0.5
"""


def add_batch_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", help="Parquet prompt set: file, directory or glob; any fsspec URI (s3://, gs://, ...)")
    p.add_argument("output", help="output folder URI; rerunning on it resumes (skips ids already written)")
    p.add_argument("--config", help="job YAML (configs/batch-*.yaml): engine + defaults + job_seed + ...")
    p.add_argument("--concurrency", type=int, help="engine actors (actor pool size)")
    p.add_argument("--num-gpus", type=float, help="GPUs per actor; 0.5 puts two actors on one GPU")
    p.add_argument("--batch-size", type=int, help="rows per Ray Data batch (map_batches batch_size)")
    p.add_argument("--rows-per-part", type=int, help="rows per output part (unit of resume; default 4 x batch size)")
    p.add_argument("--output-mode", choices=["parquet", "files"], help="images in Parquet, or files + manifest")
    p.add_argument("--job-seed", type=int, help="seed for rows without one (seed = blake2b(job_seed, id))")
    p.add_argument("--address", help="Ray address (default: RAY_ADDRESS, else start a local Ray)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--no-resource-check", action="store_true", help="run even when the cluster's live nodes lack "
                   "the CPUs/GPUs the actors ask for (an autoscaling cluster that will add them)")


def _batch(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from batch_jobs.runner import run_batch
    from core.config import format_validation_error
    from core.loading import ModelLoadError
    from core.preflight import ResourceError

    try:
        summary = run_batch(args.input, args.output, args.config, concurrency=args.concurrency,
                            num_gpus=args.num_gpus, batch_size=args.batch_size, rows_per_part=args.rows_per_part,
                            output_mode=args.output_mode, job_seed=args.job_seed, address=args.address,
                            progress=not args.no_progress, resource_check=not args.no_resource_check)
    except (ModelLoadError, ResourceError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (ValidationError, ValueError, FileNotFoundError) as err:
        print(f"error: {format_validation_error(err)}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2, sort_keys=True))
    print(f"sdserve batch: {summary['status']}: {summary['input_rows']} rows = {summary['ok_rows']} ok + "
          f"{summary['failed_rows']} failed + {summary['skipped_rows']} skipped; {summary['images']} images in "
          f"{summary['wall_s']:.1f}s ({summary['images_per_s'] or 0:.2f} images/s)", flush=True)
    if summary["failed_rows"]:
        print(f"sdserve batch: failed rows and reasons: {args.output.rstrip('/')}/errors", flush=True)
    return 0 if summary["status"] == "complete" else 1


def _make_prompts(args: argparse.Namespace) -> int:
    from batch_jobs.prompts import write_prompts

    n = write_prompts(args.n, args.output, seed=args.seed, **request_fields(args, args.request_fields))
    print(f"wrote {n} prompts to {args.output}")
    return 0


def _bench_batch(args: argparse.Namespace) -> int:
    from batch_jobs.bench import compare

    report = compare(args.config, rows=args.rows, concurrency=args.concurrency, num_gpus=args.num_gpus,
                     batch_size=args.batch_size, workdir=args.workdir)
    text = json.dumps(report, indent=2, sort_keys=True)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as fh:
            fh.write(text + "\n")
    print(text)
    return 0


def _bench_subparsers(sub):
    """The shared `bench` command (serving/cli.py uses the same protocol: the parser keeps its subparsers)."""
    parser = sub.choices.get("bench")
    if parser is None:
        parser = sub.add_parser("bench", help="benchmarks")
        parser._sdserve_sub = parser.add_subparsers(dest="bench_command", required=True)
    return parser._sdserve_sub


def register(sub) -> None:
    b = sub.add_parser("batch", help="generate a Parquet prompt set with Ray Data (resumable)",
                       epilog=BATCH_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_batch_arguments(b)
    b.set_defaults(func=_batch)

    m = sub.add_parser("make-prompts", help="write a varied sample prompt set (Parquet)")
    m.add_argument("n", type=int, help="number of rows")
    m.add_argument("output", help="output .parquet (any fsspec URI)")
    m.add_argument("--seed", type=int, default=0, help="seed of the prompt sampler (not of the images)")
    fields = add_request_flags(m, fields=("width", "height", "steps"),
                               help_suffix=dict.fromkeys(("width", "height", "steps"), "(set on every row)"))
    m.set_defaults(func=_make_prompts, request_fields=fields)

    bb = _bench_subparsers(sub).add_parser("batch", help="Ray Data batch throughput vs the engine's offline loop "
                                           "(one run, JSON with the ratio)")
    bb.add_argument("config", nargs="?", help="job YAML (configs/batch-*.yaml)")
    bb.add_argument("--rows", type=int, default=256, help="prompt rows to generate (all with the same settings)")
    bb.add_argument("--concurrency", type=int)
    bb.add_argument("--num-gpus", type=float)
    bb.add_argument("--batch-size", type=int)
    bb.add_argument("--workdir", help="where the prompt set and outputs go (default: a temp dir)")
    bb.add_argument("-o", "--output", help="also write the JSON report here")
    bb.set_defaults(func=_bench_batch)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m batch_jobs", description="Ray Data batch generation (= sdserve batch)")
    p.add_argument("-v", "--verbose", action="store_true")
    add_batch_arguments(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return _batch(args)
