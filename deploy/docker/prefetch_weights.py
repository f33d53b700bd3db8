"""Build-time weight pre-fetch for the sdserve image (Dockerfile `ARG MODEL_ID`).

MODEL_ID empty: a no-op (the image carries no weights; replicas download on first load into the shared cache).
MODEL_ID set (a Hugging Face hub id such as `stabilityai/stable-diffusion-xl-base-1.0`): exactly the files the
engine's `from_pretrained(..., use_safetensors=True)` will ask for are downloaded into the hub cache under
$HF_HOME, which the engine reads at run time. A gated model needs a token: pass it as a BuildKit secret
(`--secret id=hf_token,env=HF_TOKEN`), never as a build ARG (ARGs end up in the image history).
"""
from __future__ import annotations

import os
import sys

SECRET_PATH = "/run/secrets/hf_token"


def _token() -> str | None:
    if os.path.isfile(SECRET_PATH):
        with open(SECRET_PATH, encoding="utf-8") as fh:
            return fh.read().strip() or None
    return os.environ.get("HF_TOKEN") or None


def main() -> int:
    model_id = os.environ.get("MODEL_ID", "").strip()
    if not model_id:
        print("prefetch: MODEL_ID not set, no weights baked into the image")
        return 0
    revision = os.environ.get("MODEL_REVISION", "").strip() or None
    from diffusers import DiffusionPipeline

    # safety_checker=None: the engine never loads it (SD1.5 pipelines are built without it), so skip its weights.
    path = DiffusionPipeline.download(model_id, revision=revision, use_safetensors=True, token=_token(),
                                      safety_checker=None)
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path, followlinks=True)
               for f in files)
    print(f"prefetch: {model_id}@{revision or 'main'} -> {path} ({size / 2**30:.2f} GiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
