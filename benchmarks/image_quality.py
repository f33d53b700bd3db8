"""The opt-in variants' quality figures: pixel difference from the exact path's images of the same seeds, and
those reference images kept on disk so a later benchmark call (another process or machine) can compare against them.
"""
from __future__ import annotations

import os


def save_reference(root: str, workload: str, images: dict[int, list[bytes]]) -> None:
    """Keep the sdserve variant's images, so opt-in variants measured in a later call get a quality figure."""
    folder = os.path.join(root, workload)
    os.makedirs(folder, exist_ok=True)
    for b, blobs in images.items():
        for i, blob in enumerate(blobs):
            with open(os.path.join(folder, f"b{b}-{i}.png"), "wb") as fh:
                fh.write(blob)


def load_reference(root: str, workload: str) -> dict[int, list[bytes]] | None:
    folder = os.path.join(root, workload)
    if not os.path.isdir(folder):
        return None
    out: dict[int, list[bytes]] = {}
    for name in sorted(os.listdir(folder), key=lambda n: [int(x) for x in n[1:-4].split("-")]):
        b = int(name[1:].split("-")[0])
        with open(os.path.join(folder, name), "rb") as fh:
            out.setdefault(b, []).append(fh.read())
    return out


def image_quality(reference: list[bytes], images: list[bytes]) -> dict:
    """Pixel difference of `images` from `reference` (same prompts and seeds): mean |diff| (0-255) and PSNR."""
    import io

    import numpy as np
    from PIL import Image

    def pixels(blobs):
        return np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in blobs]).astype(np.float64)

    n = min(len(reference), len(images))  # a reference copied back in part: compare what there is
    a, b = pixels(reference[:n]), pixels(images[:n])
    mse = float(((a - b) ** 2).mean())
    return {"mean_abs_diff": round(float(np.abs(a - b).mean()), 3),
            "psnr_db": round(float(10 * np.log10(255**2 / mse)), 2) if mse else None,  # None: identical
            "note": "vs the sdserve variant's images, same prompts and seeds; random weights (noise images): "
                    "how far the output moves, only a proxy for the quality cost"}
