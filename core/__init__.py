"""core: the image-generation engine, usable without Ray.

Owns the typed configs (EngineConfig, MemoryConfig...), the one request/result schema, model loading, schedulers,
batching, the optimizations and memory levels (weight streaming, offloading, VRAM budgets), image encoding, the
resource rule for engine actors and the embedded tiny models. May import only the standard library and
third-party libraries (torch, diffusers, pydantic...), never ray, serving, batch_jobs, sdserve or benchmarks
(tests/test_import_cycles.py enforces it); importing core.config or core.schemas does not import torch.
"""
