"""Ray Serve application: model deployments with dynamic batching behind a FastAPI ingress (see docs/serving.md)."""
