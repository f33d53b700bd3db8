"""Prompts longer than the text encoder reads (CLIP: 77 tokens with start/end) are cut by the tokenizer. Until long
prompts are supported (chunked embeddings), say so in the result's note and in the log instead of silently.

`overlong_prompt_note(tokenizer, prompt, negative_prompt)` is cheap (a tokenizer call, no model). The engine calls it
(`prompt_note`) once per request on its GPU thread, where the prompt is encoded: a fast tokenizer is not thread-safe
(each call sets padding/truncation on the shared backend), so it must not run beside the text encoding.
"""
from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def token_count(tokenizer, text: str) -> int:
    """Tokens the encoder would need for `text`, start and end tokens included (no truncation)."""
    return len(tokenizer(text, truncation=False, add_special_tokens=True)["input_ids"])


def overlong_prompt_note(tokenizer, prompt: str, negative_prompt: str | None = None,
                         model: str | None = None) -> str | None:
    """A note (and a log warning) naming each prompt that is cut, or None when both fit."""
    limit = int(getattr(tokenizer, "model_max_length", 77) or 77)
    parts = []
    for name, text in (("prompt", prompt), ("negative_prompt", negative_prompt)):
        if not text:
            continue
        n = token_count(tokenizer, text)
        if n > limit:
            parts.append(f"{name} is {n} tokens; the text encoder reads the first {limit} and ignores the rest")
    if not parts:
        return None
    note = "; ".join(parts)
    log.warning("model %s: %s", model or "?", note)
    return note


def prompt_note(pipe, req, model: str | None = None) -> str | None:
    """overlong_prompt_note with the pipeline's (first) tokenizer; None for a pipeline without one."""
    tokenizer = getattr(pipe, "tokenizer", None)
    return overlong_prompt_note(tokenizer, req.prompt, req.negative_prompt, model) if tokenizer is not None else None
