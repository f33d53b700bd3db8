"""benchmarks: measurement harnesses (GPU engine vs plain diffusers, memory variants, cold start, replica load and
inventory, open-loop load) and the renderer of docs/benchmarks.md. Measures the product, is not part of its request
path. May import core, serving and batch_jobs; never sdserve (tests/test_import_cycles.py). Probes and superseded
runs live in experiments/, outside the package.
"""
