# syntax=docker/dockerfile:1
# sdserve image: Ray 2.60 + CUDA + Python 3.11 (Ray's own GPU image, so KubeRay and the cluster launcher can run it
# as a Ray node), the project, and a model cache volume at /models.
#
#   docker build -t sdserve .
#   docker build -t sdserve:sdxl --build-arg MODEL_ID=stabilityai/stable-diffusion-xl-base-1.0 .
#   docker build --secret id=hf_token,env=HF_TOKEN --build-arg MODEL_ID=<gated/model> .   # gated models
#   docker run --gpus all -p 8000:8000 -v sdserve-models:/models sdserve            # sdserve serve on :8000
#   docker run --gpus all -v sdserve-models:/models sdserve batch s3://in/ s3://out/
#
# Weights baked with MODEL_ID land in the image's /models and are copied into a *named* volume the first time it
# is mounted; a bind mount or a Kubernetes PVC hides them (there the shared cache is filled on first load).
# Tested without a Docker engine in tests/deploy/test_dockerfile.py (instruction parse + checks).

# Base image; the CPU variant (rayproject/ray:2.60.0-py311-cpu) builds a CPU-only image.
ARG RAY_IMAGE=rayproject/ray:2.60.0-py311-gpu
FROM ${RAY_IMAGE}

# torch is installed first and pinned (the Makefile's version). Empty TORCH_INDEX_URL: PyPI's default Linux
# wheel (CUDA 12.x, libraries bundled; needs only the host driver). E.g. https://download.pytorch.org/whl/cu128
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=
# Optional build-time weight pre-fetch (a Hugging Face hub id); empty: no weights in the image.
ARG MODEL_ID=
ARG MODEL_REVISION=
# fsspec filesystems for batch jobs and the compile-artifact store over object storage (s3://, gs://); not in
# pyproject's dependencies yet.
ARG EXTRA_PIP="s3fs gcsfs"

ENV SDSERVE_CACHE_DIR=/models \
    HF_HOME=/models/huggingface \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# tini as PID 1: `sdserve serve` starts a local Ray whose child processes need reaping.
USER root
RUN apt-get update -qq \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends tini \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /models /opt/sdserve \
 && chown -R 1000:100 /models /opt/sdserve
COPY --chmod=0755 deploy/docker/entrypoint.sh /usr/local/bin/sdserve-entrypoint

# Everything below runs as the image's non-root user `ray` (uid 1000, gid 100).
USER 1000:100
WORKDIR /opt/sdserve

# Dependencies in their own layer: rebuilt only when pyproject.toml changes.
COPY --chown=1000:100 pyproject.toml ./
RUN pip install -q "torch==${TORCH_VERSION}" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} \
 && python -c "import tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; open('/tmp/requirements.txt', 'w').write(chr(10).join(deps))" \
 && pip install -q -r /tmp/requirements.txt ${EXTRA_PIP} \
 && rm /tmp/requirements.txt

# The project itself (what .dockerignore lets through: no tests, no venv, no git history).
COPY --chown=1000:100 . /opt/sdserve
RUN pip install -q --no-deps /opt/sdserve \
 && sdserve --help > /dev/null

# Optional weights, into the hub cache under $HF_HOME (inside /models). This must come before VOLUME:
# changes to a volume's path after its VOLUME instruction are discarded.
RUN --mount=type=secret,id=hf_token,uid=1000,required=false \
    MODEL_ID="${MODEL_ID}" MODEL_REVISION="${MODEL_REVISION}" python deploy/docker/prefetch_weights.py

# Model cache: embedded models, hub downloads and torch.compile (inductor) caches. Share it between replicas
# (a named volume on one host, an RWX PVC or EFS/Filestore across nodes).
VOLUME ["/models"]

EXPOSE 8000
ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/sdserve-entrypoint"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
