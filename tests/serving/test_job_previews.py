"""Live previews of async jobs over real Serve: SSE `preview` events with small JPEGs every N steps."""
from __future__ import annotations

import base64
import io
import json

import pytest
from PIL import Image

pytestmark = pytest.mark.integration


def _sse(lines):
    """(event name, data) per Server-Sent Event."""
    event, data = "message", []
    for line in lines:
        if line == "":
            if data:
                yield event, json.loads("\n".join(data))
            event, data = "message", []
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())


def test_job_events_carry_previews_every_n_steps(client):
    # The events route polls the job store every 0.2 s and shows the latest preview while the job runs: 300 steps
    # run long enough for several polls (23 steps once ended between two polls on an idle CI box).
    job = client.post("/v1/jobs", json={"prompt": "a preview", "steps": 300, "num_images": 2}).json()
    previews, views = [], []
    with client.stream("GET", f"/v1/jobs/{job['id']}/events") as r:
        for event, data in _sse(r.iter_lines()):
            (previews if event == "preview" else views).append(data)
    assert views[-1]["status"] == "succeeded" and "preview" not in views[-1]
    assert previews, "no preview event"
    steps = [p["step"] for p in previews]
    assert steps == sorted(set(steps)) and all(s % 5 == 0 and s < 300 for s in steps)  # every_n_steps 5 (default)
    for p in previews:
        assert p["total"] == 300 and len(p["images"]) == 2
        img = Image.open(io.BytesIO(base64.b64decode(p["images"][0])))
        assert img.format == "JPEG" and img.size == (8, 8)  # latent2rgb: latent resolution of the 64x64 image
