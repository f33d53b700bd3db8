#!/bin/sh
# Entrypoint of the sdserve image.
#   docker run IMAGE                       -> sdserve serve --host 0.0.0.0 --port 8000 (the image's CMD)
#   docker run IMAGE serve cfg.yaml ...    -> sdserve serve cfg.yaml ...   (likewise batch, generate, bench, precompile)
#   docker run IMAGE bash | ray ... | python ...  -> that command as is
# Ray's cluster launcher starts the container with `bash`; KubeRay replaces the command altogether.
# `serve` means sdserve's subcommand here; Ray's own `serve` CLI: `docker run IMAGE bash -lc "serve status"`.
set -e
if [ "$#" -eq 0 ]; then
  set -- serve --host 0.0.0.0 --port 8000
fi
case "$1" in
  serve|batch|generate|bench|precompile|-*)
    exec sdserve "$@"
    ;;
esac
exec "$@"
