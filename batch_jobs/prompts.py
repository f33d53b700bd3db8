"""`sdserve make-prompts N OUT.parquet`: a varied, reproducible sample prompt set for trying batch jobs."""
from __future__ import annotations

import random

SUBJECTS = ["an astronaut", "a red fox", "a lighthouse", "a samurai", "a vintage car", "a bowl of ramen",
            "a dragon", "a robot barista", "a mountain cabin", "an owl", "a sailing ship", "a city street"]
SETTINGS = ["on mars", "in a misty forest", "at sunset", "under the northern lights", "in the rain",
            "on a snowy peak", "in a neon-lit alley", "by the sea", "in a desert", "inside a cathedral"]
STYLES = ["photorealistic, 35mm", "oil painting", "watercolor", "studio ghibli style", "isometric 3d render",
          "charcoal sketch", "cinematic lighting, 8k", "pixel art", "art nouveau poster", "low-poly"]
NEGATIVES = [None, "blurry, low quality", "text, watermark", "deformed hands, extra fingers"]
SCHEDULERS = [None, "euler", "euler_a", "dpmpp_2m", "ddim"]


def sample_rows(n: int, seed: int = 0, width: int | None = None, height: int | None = None,
                steps: int | None = None) -> list[dict]:
    """n rows with ids p000000..; some rows set their own seed/scheduler/negative prompt/guidance, most don't."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        rows.append({
            "id": f"p{i:06d}",
            "prompt": f"{rng.choice(SUBJECTS)} {rng.choice(SETTINGS)}, {rng.choice(STYLES)}",
            "negative_prompt": rng.choice(NEGATIVES),
            "seed": rng.randrange(2**32) if rng.random() < 0.3 else None,
            "width": width, "height": height, "steps": steps,
            "guidance_scale": rng.choice([None, None, 5.0, 7.5]),
            "scheduler": rng.choice(SCHEDULERS),
            "num_images": 2 if rng.random() < 0.1 else None,
        })
    return rows


def write_prompts(n: int, path: str, seed: int = 0, **sizes) -> int:
    import fsspec
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("id", pa.string()), ("prompt", pa.string()), ("negative_prompt", pa.string()),
                        ("seed", pa.int64()), ("width", pa.int32()), ("height", pa.int32()), ("steps", pa.int32()),
                        ("guidance_scale", pa.float64()), ("scheduler", pa.string()), ("num_images", pa.int32())])
    table = pa.Table.from_pylist(sample_rows(n, seed, **sizes), schema=schema)
    with fsspec.open(path, "wb") as fh:
        pq.write_table(table, fh)
    return table.num_rows
