"""`sdserve` command line. Each subcommand imports only what it needs (generate never imports Ray)."""
from __future__ import annotations

import argparse
import functools
import importlib
import logging
import os
import sys

from core.request_flags import add_request_flags, request_fields

EXAMPLES = """examples (from a fresh shell after `make serve`, use .venv/bin/sdserve or `source .venv/bin/activate`):
  sdserve serve                                          embedded tiny-sd at http://127.0.0.1:8000 (Ctrl-C stops)
  sdserve serve configs/serve-two-models-h100.yaml --dry-run --gpus   computed Serve options, no Ray started
  sdserve check configs/serve-deploy.yaml                validate a config before `serve deploy`
  sdserve generate "a lighthouse at dusk" -o out.png --seed 42 --steps 4      local engine, no Ray
  sdserve make-prompts 200 prompts.parquet
  sdserve batch prompts.parquet out/ --config configs/batch-tiny.yaml         Ray Data, resumable
  sdserve precompile configs/serve-sd15-bench.yaml       compile here, write the artifacts replicas start from
  sdserve bench serve --url http://127.0.0.1:8000 --no-offline --steps 4      load test a running server
"""


def _generate(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from core.config import format_validation_error, load_engine_config
    from core.engine import Engine
    from core.loading import ModelLoadError
    from core.schemas import GenerationError, GenerationRequest

    try:
        cfg = load_engine_config(args.config, source=args.model_source, device=args.device)
        req = GenerationRequest(prompt=args.prompt, **request_fields(args, args.request_fields))
    except (ValidationError, ValueError) as err:
        print(f"error: {format_validation_error(err)}", file=sys.stderr)
        return 2
    try:
        engine = Engine(cfg).load()
    except ModelLoadError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from core.prompt_length import overlong_prompt_note

    long_note = overlong_prompt_note(engine.pipe.tokenizer, req.prompt, req.negative_prompt, cfg.name)
    out = engine.generate([req])[0]
    if isinstance(out, GenerationError):
        print(f"error: {out.message}", file=sys.stderr)
        return 2
    if long_note and long_note not in (out.note or ""):  # until the engine adds it to the result itself
        print(f"warning: {long_note}", file=sys.stderr)
    stem, ext = os.path.splitext(args.output)  # the file's extension, not the first dot in the path
    paths = [args.output] if len(out.images) == 1 else [f"{stem}-{i}{ext}" for i in range(len(out.images))]
    for path, img in zip(paths, out.images):
        with open(path, "wb") as fh:
            fh.write(img.data)
        print(f"{path}  seed={img.seed}  {out.width}x{out.height}  {out.steps} steps  {out.scheduler}  "
              f"denoise {out.timings.denoise_s:.2f}s decode {out.timings.decode_s:.2f}s")
    if out.note:
        print(f"note: {out.note}")
    return 0


def _precompile(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from core.config import EngineConfig, format_validation_error, load_yaml
    from core.loading import ModelLoadError
    from core.precompile import precompile
    from serving.config import load_serving_config  # (no Ray)

    try:  # a serving YAML (models:), a batch YAML (engine: + job keys) or a bare engine YAML
        data = load_yaml(args.config)
        if "models" in data:
            engines = [m.engine for m in load_serving_config(args.config).models]
        else:
            engines = [EngineConfig.model_validate(data.get("engine", data))]
    except (ValidationError, ValueError, OSError) as err:
        print(f"error: {args.config}: {format_validation_error(err)}", file=sys.stderr)
        return 2
    failed = 0
    for cfg in engines:
        try:
            out = precompile(cfg, force=args.force)
        except (ModelLoadError, RuntimeError) as err:
            print(f"error: {cfg.name}: {err}", file=sys.stderr)
            failed += 1
            continue
        if "skipped" in out:
            print(f"{cfg.name}: skipped ({out['skipped']})")
        elif out["path"] is None:
            print(f"{cfg.name}: key {out['key']} already in {out['store']} ({out['bytes']} bytes); nothing compiled")
        else:
            print(f"{cfg.name}: key {out['key']}  {out['bytes']} bytes -> {out['path']}  ({out['seconds']} s)")
    return 1 if failed else 0


# The Ray-based packages register their subcommands; importing them pulls in Ray but not torch. A broken module
# of ours must fail loudly here (never silently drop its subcommands).
SUBCOMMAND_MODULES = ("serving.cli", "batch_jobs.cli", "benchmarks.cli")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sdserve", description="Stable Diffusion / SDXL generation on Ray.",
                                epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate locally with the engine (no Ray)",
                       epilog='example: sdserve generate "a lighthouse at dusk" -o out.png --seed 42 --steps 4',
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    g.add_argument("prompt", help="what to draw")
    g.add_argument("-o", "--output", default="out.png", help="image path (several images: out-0.png, ...)")
    g.add_argument("--config", help="engine config YAML")
    g.add_argument("--model-source", help="override the config's model source")
    g.add_argument("--device", help="auto | cpu | cuda[:N]")
    g.set_defaults(func=_generate, request_fields=add_request_flags(g, exclude=("model",)))

    pc = sub.add_parser("precompile", help="compile a config's models here, warm up every bucket and write the "
                        "compile artifacts to optimization.compile_artifacts.store (no Ray)",
                        epilog="example: sdserve precompile configs/serve-sd15-bench.yaml   (on a GPU host of the "
                        "replicas' kind: the artifacts are keyed by GPU, torch, CUDA, model, settings and shapes)")
    pc.add_argument("config", help="serving, batch or engine YAML")
    pc.add_argument("--force", action="store_true", help="compile even when the store holds the key (overwrite)")
    pc.set_defaults(func=_precompile)

    for module in SUBCOMMAND_MODULES:
        importlib.import_module(module).register(sub)
    check = sub.choices["check"]  # serving's check, taught batch job configs here (serving never imports batch_jobs)
    check.set_defaults(func=functools.partial(_check_any, serving_check=check.get_default("func")))
    return p


def _check_any(args: argparse.Namespace, serving_check) -> int:
    """`sdserve check`: a batch job config (top-level `engine:`, no `models:`) is validated as BatchJobConfig, with
    its model's source; serving and `serve deploy` configs go to serving's check."""
    from core.config import format_validation_error, load_yaml

    try:
        data = load_yaml(args.config)
    except (OSError, ValueError):
        data = None  # serving's check says what is wrong with the file
    if not (isinstance(data, dict) and "engine" in data and "models" not in data):
        return serving_check(args)
    from pydantic import ValidationError

    from batch_jobs.config import load_job_config
    from core.loading import ModelLoadError, check_source

    try:
        cfg = load_job_config(args.config)
        if not args.no_sources:
            check_source(cfg.engine)
    except (ValidationError, ValueError, OSError, ModelLoadError) as err:
        print(f"error: {args.config}: {format_validation_error(err)}", file=sys.stderr)
        return 2
    print(f"{args.config}: ok: batch job config, model {cfg.engine.name!r}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
