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
