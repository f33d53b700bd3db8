"""Prompts longer than the text encoder reads are reported, not cut silently."""
from __future__ import annotations

import logging

from core.embedded import build_tokenizer
from core.prompt_length import overlong_prompt_note, token_count


def test_short_prompts_get_no_note():
    assert overlong_prompt_note(build_tokenizer(), "a fox", "blur") is None


def test_long_prompt_note_and_log(caplog):
    tok = build_tokenizer()
    prompt = "a red fox in the snow " * 10
    assert token_count(tok, prompt) > 77
    with caplog.at_level(logging.WARNING, logger="core.prompt_length"):
        note = overlong_prompt_note(tok, prompt, None, model="tiny-sd")
    assert note.startswith(f"prompt is {token_count(tok, prompt)} tokens; the text encoder reads the first 77")
    assert "tiny-sd" in caplog.text


def test_engine_results_carry_the_note_for_a_cut_prompt(engine):
    from core.schemas import GenerationRequest, GenerationResult

    long_prompt = "a red fox in the snow " * 10
    short, cut = engine.generate([GenerationRequest(prompt="a fox", steps=2, seed=1),
                                  GenerationRequest(prompt=long_prompt, steps=2, seed=1)])
    assert isinstance(short, GenerationResult) and isinstance(cut, GenerationResult)
    assert "tokens" not in (short.note or "")
    assert "prompt is" in cut.note and "reads the first 77" in cut.note
    assert engine.note is None or cut.note.startswith(engine.note)  # the random-weights note stays first
