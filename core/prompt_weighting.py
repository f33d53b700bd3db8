"""Opt-in prompt weighting and long prompts (`prompt_weighting: true` in the engine config), with compel.

A1111 syntax is accepted: `(word)` x1.1, `((word))` x1.21, `(word:1.3)`, `[word]` /1.1, `\\(` for a literal
parenthesis. `a1111_to_compel` only rewrites it into compel's own syntax (`(word)1.3`); compel does the weighting
and encodes prompts beyond the tokenizer's 77 tokens in chunks (`truncate_long_prompts=False`), SDXL's two encoders
included (penultimate hidden states, pooled output of the second, as the SDXL pipeline).

Every conditioning is padded with empty-prompt chunks to `prompt_chunks` chunks (longer prompts are cut there,
with a note), so all requests keep one sequence length: they still share UNet calls and compiled shapes.
"""
from __future__ import annotations

import re

from core.schemas import GenerationRequest

# A1111's modules/prompt_parser.py tokens: escapes, brackets, a ':weight)' closer, text, a lone ':'
_TOKENS = re.compile(r"\\\(|\\\)|\\\[|\\]|\\\\|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|]|[^\\()\[\]:]+|:")
ROUND, SQUARE = 1.1, 1 / 1.1


def parse_a1111(text: str) -> list[tuple[str, float]]:
    """[(text, weight)] as A1111's parse_prompt_attention computes them (unbalanced brackets close at the end)."""
    out: list[list] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply(start: int, factor: float) -> None:
        for item in out[start:]:
            item[1] *= factor

    for m in _TOKENS.finditer(text):
        tok, weight = m.group(0), m.group(1)
        if tok.startswith("\\") and len(tok) == 2:
            out.append([tok[1], 1.0])
        elif tok == "(":
            round_open.append(len(out))
        elif tok == "[":
            square_open.append(len(out))
        elif weight is not None and round_open:
            multiply(round_open.pop(), float(weight))
        elif tok == ")" and round_open:
            multiply(round_open.pop(), ROUND)
        elif tok == "]" and square_open:
            multiply(square_open.pop(), SQUARE)
        else:
            out.append([tok, 1.0])
    for start in round_open:
        multiply(start, ROUND)
    for start in square_open:
        multiply(start, SQUARE)
    merged: list[list] = []
    for text_part, w in out:  # neighbours of equal weight become one fragment
        if merged and merged[-1][1] == w:
            merged[-1][0] += text_part
        else:
            merged.append([text_part, w])
    return [(t, w) for t, w in merged if t]


def a1111_to_compel(text: str) -> str:
    parts = []
    for fragment, weight in parse_a1111(text):
        escaped = fragment.replace("(", "\\(").replace(")", "\\)")
        if abs(weight - 1.0) < 1e-6 or not escaped.strip():
            parts.append(escaped)
        else:
            parts.append(f"({escaped.strip()}){weight:.4g} ")
    return "".join(parts).strip()


class WeightedPromptEncoder:
    """compel over the pipeline's own tokenizers and text encoders (text-encoder LoRA hooks apply as usual)."""

    def __init__(self, pipe, family: str, chunks: int, device):
        try:
            from compel import Compel, ReturnedEmbeddingsType
        except ImportError as err:
            raise RuntimeError("prompt_weighting: true needs compel: pip install 'sdserve[prompts]'") from err

        self.pipe, self.family, self.chunks = pipe, family, chunks
        if family == "sdxl":
            penultimate = ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED
            self.compels = [Compel(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, device=device,
                                   returned_embeddings_type=penultimate, truncate_long_prompts=False),
                            Compel(tokenizer=pipe.tokenizer_2, text_encoder=pipe.text_encoder_2, device=device,
                                   returned_embeddings_type=penultimate, truncate_long_prompts=False,
                                   requires_pooled=True)]
        else:
            self.compels = [Compel(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, device=device,
                                   truncate_long_prompts=False)]
        self.chunk_len = pipe.tokenizer.model_max_length

    def _embed(self, text: str):
        """([1, chunks x 77, dim], pooled or None, whether the prompt was cut)."""
        import torch

        converted = a1111_to_compel(text)
        if self.family == "sdxl":
            left = self.compels[0](converted)
            right, pooled = self.compels[1](converted)
            n = min(left.shape[1], right.shape[1])
            embeds = torch.cat([left[:, :n], right[:, :n]], dim=-1)
            empty = torch.cat([self.compels[0](""), self.compels[1]("")[0]], dim=-1)
        else:
            embeds, pooled = self.compels[0](converted), None
            empty = self.compels[0]("")
        target = self.chunks * self.chunk_len
        cut = embeds.shape[1] > target
        while embeds.shape[1] < target:
            embeds = torch.cat([embeds, empty], dim=1)
        return embeds[:, :target], pooled, cut

    def encode(self, req: GenerationRequest, device, uses_cfg: bool):
        """The request's TextConditioning (see core/denoise_state.encode_text) and a note when a prompt was cut."""
        import torch

        from core.denoise_state import TextConditioning

        with torch.no_grad():
            cond, pooled, cut = self._embed(req.prompt)
            uncond = npooled = None
            if uses_cfg:
                negative = req.negative_prompt or ""
                # "" is encoded, never zeroed: core/denoise_state.encode_text passes a string negative as well
                uncond, npooled, cut_neg = self._embed(negative)
                cut = cut or cut_neg
            out = TextConditioning(cond.to(device), None if uncond is None else uncond.to(device))
            if self.family == "sdxl":
                te2 = getattr(self.pipe, "text_encoder_2", None)
                proj = int(pooled.shape[-1]) if te2 is None else te2.config.projection_dim
                out.cond_pooled = pooled.to(device)
                out.uncond_pooled = None if npooled is None else npooled.to(device)
                out.time_ids = self.pipe._get_add_time_ids((req.height, req.width), (0, 0), (req.height, req.width),
                                                           dtype=cond.dtype, text_encoder_projection_dim=proj).to(device)
            proj_dim = self.pipe.unet.config.time_cond_proj_dim
            if proj_dim is not None:
                w = torch.tensor([req.guidance_scale - 1.0])
                out.timestep_cond = self.pipe.get_guidance_scale_embedding(w, embedding_dim=proj_dim).to(
                    device=device, dtype=cond.dtype)
        note = (f"prompt longer than prompt_chunks={self.chunks} x {self.chunk_len - 2} tokens: the rest was "
                "ignored") if cut else None
        return out, note
