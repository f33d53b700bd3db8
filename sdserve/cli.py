"""`sdserve` command line. Each subcommand imports only what it needs (generate never imports Ray)."""
from __future__ import annotations

import argparse
import logging
import os
import sys


def _generate(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from core.config import format_validation_error, load_engine_config
    from core.engine import Engine
    from core.schemas import GenerationError, GenerationRequest

    try:
        cfg = load_engine_config(args.config, source=args.model_source, device=args.device)
        fields = {k: getattr(args, k) for k in ("negative_prompt", "width", "height", "steps", "guidance_scale",
                                                "scheduler", "seed", "num_images", "output_format")}
        req = GenerationRequest(prompt=args.prompt, **{k: v for k, v in fields.items() if v is not None})
    except (ValidationError, ValueError) as err:
        print(f"error: {format_validation_error(err)}", file=sys.stderr)
        return 2
    out = Engine(cfg).load().generate([req])[0]
    if isinstance(out, GenerationError):
        print(f"error: {out.message}", file=sys.stderr)
        return 2
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sdserve", description="Stable Diffusion / SDXL generation on Ray.")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate locally with the engine (no Ray)")
    g.add_argument("prompt")
    g.add_argument("-o", "--output", default="out.png")
    g.add_argument("--config", help="engine config YAML")
    g.add_argument("--model-source", help="override the config's model source")
    g.add_argument("--device", help="auto | cpu | cuda[:N]")
    g.add_argument("--negative-prompt")
    g.add_argument("--width", type=int)
    g.add_argument("--height", type=int)
    g.add_argument("--steps", type=int)
    g.add_argument("--guidance-scale", type=float)
    g.add_argument("--scheduler")
    g.add_argument("--seed", type=int)
    g.add_argument("--num-images", type=int)
    g.add_argument("--output-format", choices=["png", "jpeg", "webp"])
    g.set_defaults(func=_generate)

    # Subcommands of the Ray-based packages register themselves lazily (importing them pulls in Ray).
    for module in ("serving.cli", "batch_jobs.cli", "benchmarks.cli"):
        try:
            mod = __import__(module, fromlist=["register"])
        except ImportError as err:
            if err.name and err.name.split(".")[0] in ("serving", "batch_jobs", "benchmarks"):
                continue
            raise
        mod.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
