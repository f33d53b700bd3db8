"""benchmarks.memory_variant: the short command-line form parses into typed variants with the old record names,
bad ones fail before any GPU time is spent, and the JSON form gives the same objects."""
from __future__ import annotations

import pytest
from pydantic import ValidationError

from benchmarks.memory_variant import MemoryVariant, parse_variants
from core.config import MemoryLevel


@pytest.mark.parametrize("text, name", [
    ("none", "sdserve-none"),
    ("balanced:group-block", "sdserve-balanced-group-block"),
    ("balanced:stream:0.6", "sdserve-balanced-stream-0.6"),
    ("aggressive:::fp8", "sdserve-aggressive-fp8"),
    ("aggressive::::6", "sdserve-aggressive-6"),
    ("balanced:stream:0.3:fp8:3", "sdserve-balanced-stream-0.3-fp8-3"),
    ("ultra:::fp16", "sdserve-ultra-fp16"),
])
def test_short_form_keeps_the_record_names(text, name):
    assert MemoryVariant.parse(text).name == name


def test_short_form_sets_the_memory_config():
    v = MemoryVariant.parse("balanced:stream:0.3:fp8:3")
    assert (v.level, v.offload, v.streamed_share, v.fp8_storage, v.lookahead) == (
        MemoryLevel.BALANCED, "stream", 0.3, True, 3)
    mem = v.memory_config(vram_budget_gib=4)
    assert (mem.level, mem.offload, mem.streamed_share, mem.fp8_storage, mem.stream_lookahead, mem.vram_budget_gib) == (
        MemoryLevel.BALANCED, "stream", 0.3, True, 3, 4)
    default = MemoryVariant.parse("aggressive").memory_config()
    assert default.streamed_share == MemoryVariant.parse("none").memory_config().streamed_share  # unset: defaults
    assert default.vram_budget_gib is None


@pytest.mark.parametrize("bad", ["balanced:stream:1.5", "balanced::::99", "fast", "balanced:disk",
                                 "balanced:::fp4", "a:b:c:d:e:f"])
def test_bad_variants_fail_when_parsed(bad):
    with pytest.raises((ValidationError, ValueError)):
        MemoryVariant.parse(bad)


def test_json_form_gives_the_same_objects():
    both = parse_variants("none,balanced:stream:0.3",
                          '[{"level": "balanced", "offload": "stream", "streamed_share": 0.3}]')
    assert [v.name for v in both] == ["sdserve-none", "sdserve-balanced-stream-0.3", "sdserve-balanced-stream-0.3"]
    assert both[1] == both[2]
    with pytest.raises(ValidationError):
        parse_variants("", '[{"level": "balanced", "share": 0.3}]')  # unknown key
