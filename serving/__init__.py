"""serving: the Ray Serve application (docs/serving.md).

Owns the ServingConfig, the app builder (one deployment per model + the HTTP ingress), the model deployment, the
ingress deployment and its FastAPI layer (serving/http: app factory, one router per route group), security, async
jobs (serving/jobs), metrics and the serving CLI/load generator. May import core, ray and web libraries; never
batch_jobs, sdserve or benchmarks (tests/test_import_cycles.py enforces it).
"""
