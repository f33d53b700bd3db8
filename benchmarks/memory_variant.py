"""Memory-level variants of the GPU benchmark as typed objects: level, offload, streamed share, fp8 storage and
lookahead, checked against core.config.MemoryConfig's bounds before any GPU time is spent.

The command line's short form `level[:offload[:share[:fp8|fp16[:lookahead]]]]` parses into one (documented
commands keep working); `--memory-variants` takes the objects as JSON. No torch import.
"""
from __future__ import annotations

import json
from typing import Literal

from pydantic import Field, model_validator

from core.config import MemoryConfig, MemoryLevel, Strict


class MemoryVariant(Strict):
    """One memory configuration to time; unset fields keep MemoryConfig's defaults."""

    level: MemoryLevel = Field(MemoryLevel.NONE, description="memory.level.")
    offload: Literal["auto", "stream", "model", "group-block", "group-leaf", "sequential"] = Field(
        "auto", description="memory.offload.")
    streamed_share: float | None = Field(None, description="memory.streamed_share (BALANCED).")
    fp8_storage: bool | None = Field(None, description="memory.fp8_storage; None: the default.")
    lookahead: int | None = Field(None, description="memory.stream_lookahead.")

    @model_validator(mode="after")
    def _within_memory_config(self) -> "MemoryVariant":
        self.memory_config()  # MemoryConfig's bounds (share 0-1, lookahead 1-32...), one place
        return self

    @classmethod
    def parse(cls, text: str) -> "MemoryVariant":
        """`level[:offload[:share[:fp8|fp16[:lookahead]]]]`, e.g. balanced:group-block, balanced:stream:0.6,
        aggressive:::fp8, aggressive::::6 (empty parts keep the defaults)."""
        parts = text.strip().split(":")
        if len(parts) > 5:
            raise ValueError(f"memory variant {text!r}: at most level:offload:share:fp8|fp16:lookahead")
        level, offload, share, storage, ahead = (parts + [""] * 4)[:5]
        if storage not in ("", "fp8", "fp16"):
            raise ValueError(f"memory variant {text!r}: the fourth part is fp8 or fp16, got {storage!r}")
        return cls(level=level or "none", offload=offload or "auto",
                   streamed_share=float(share) if share else None,
                   fp8_storage={"fp8": True, "fp16": False}.get(storage),
                   lookahead=int(ahead) if ahead else None)

    @property
    def name(self) -> str:
        """The record's variant name: sdserve-<the set parts>, e.g. sdserve-balanced-stream-0.3-fp8-3."""
        parts = [self.level.value, "" if self.offload == "auto" else self.offload,
                 "" if self.streamed_share is None else f"{self.streamed_share:g}",
                 {True: "fp8", False: "fp16", None: ""}[self.fp8_storage],
                 "" if self.lookahead is None else str(self.lookahead)]
        return "-".join(["sdserve", *filter(None, parts)])

    def memory_config(self, vram_budget_gib: float | None = None) -> MemoryConfig:
        """The engine's memory config for this variant (under `vram_budget_gib` when given)."""
        fields = {"level": self.level, "offload": self.offload, "streamed_share": self.streamed_share,
                  "fp8_storage": self.fp8_storage, "stream_lookahead": self.lookahead,
                  "vram_budget_gib": vram_budget_gib}
        return MemoryConfig(**{k: v for k, v in fields.items() if v is not None})


def parse_variants(short_form: str = "", as_json: str = "") -> list[MemoryVariant]:
    """Variants from the comma-separated short form, then from a JSON list of objects (both optional)."""
    out = [MemoryVariant.parse(t) for t in short_form.split(",") if t.strip()]
    out += [MemoryVariant.model_validate(v) for v in (json.loads(as_json) if as_json else [])]
    return out
