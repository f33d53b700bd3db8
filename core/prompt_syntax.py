"""A1111's `<lora:name:weight>` prompt syntax: the tags are taken out of the prompt (the text encoder never sees
them) and become LoRA references, with the same effect as the request's `loras` field.

A1111 also accepts `<lora:name:te_weight:unet_weight>` and `<lora:name>` (weight 1); sdserve applies one weight to
both parts, the first one given. No torch here (used by request resolution).
"""
from __future__ import annotations

import re

LORA_TAG = re.compile(r"<lora:([^:<>]+)(?::([^:<>]*))?(?::[^<>]*)?>", re.IGNORECASE)


def extract_loras(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """(prompt without the tags, [(name, weight)] in order). Raises ValueError for a weight that is not a number."""
    found: list[tuple[str, float]] = []

    def take(match: re.Match) -> str:
        name, weight = match.group(1).strip(), (match.group(2) or "").strip()
        try:
            value = float(weight) if weight else 1.0
        except ValueError:
            raise ValueError(f"<lora:{name}:{weight}>: the weight must be a number") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"<lora:{name}:{weight}>: the weight must be finite")
        found.append((name, value))
        return " "

    stripped = LORA_TAG.sub(take, prompt)
    if not found:
        return prompt, []
    stripped = re.sub(r"\s*,(\s*,)+", ",", stripped)  # "a, <lora:x>, b" -> "a, b"
    return re.sub(r"\s{2,}", " ", stripped).strip(" ,"), found


def merge_loras(field: list[tuple[str, float]], tags: list[tuple[str, float]]) -> list[tuple[str, float]]:
    """The field's LoRAs, then the prompt's; one name twice adds its weights (as applying it twice would)."""
    merged: dict[str, float] = {}
    for name, weight in list(field) + list(tags):
        merged[name] = merged.get(name, 0.0) + weight
    return list(merged.items())
