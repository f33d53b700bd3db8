"""Embedded models: SD-style pipelines built from configs with seeded random weights, no download.

- tiny-sd / tiny-sdxl / tiny-sd-inpaint (tiny-sd with a 9-channel inpainting UNet): a few MB; written once to the cache dir with `save_pretrained` and then loaded through
  the same `from_pretrained` path as real checkpoints. They make noise images (random weights).
- sd15 / sdxl: the real SD1.5 / SDXL architectures at full size with random weights, for benchmarks (speed and
  memory do not depend on weight values). Built in memory, directly on the target device.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)
FORMAT_VERSION = "v2"  # bump when a config below changes, so stale caches are rebuilt

NOISE_NOTE = "embedded random-weight model: images are noise, not pictures"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable unicode map (the base alphabet of a byte-level BPE)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def build_tokenizer():
    """A real CLIP BPE tokenizer over the byte alphabet (no merges): every prompt tokenizes, 77 tokens max."""
    from transformers import CLIPTokenizer

    chars = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for tok in chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]:
        vocab[tok] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def _clip(hidden: int, layers: int, heads: int, inter: int, projection: int, vocab: int = 49408,
          act: str = "quick_gelu", with_projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, vocab_size=vocab, max_position_embeddings=77,
                         projection_dim=projection, hidden_act=act, bos_token_id=0, eos_token_id=2)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(cfg)


def _vae(blocks: tuple[int, ...], groups: int, scaling: float, sample: int, force_upcast: bool):
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=blocks, in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=["DownEncoderBlock2D"] * len(blocks),
                         up_block_types=["UpDecoderBlock2D"] * len(blocks), layers_per_block=2 if blocks[0] >= 128 else 1,
                         norm_num_groups=groups, sample_size=sample, scaling_factor=scaling, force_upcast=force_upcast)


def _scheduler():
    from diffusers import EulerDiscreteScheduler

    # SD1.x/SDXL training schedule; set_alpha_to_one etc. are ignored by Euler.
    return EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                  num_train_timesteps=1000, steps_offset=1, timestep_spacing="leading")


def build_pipeline(name: str, seed: int = 0, device: str = "cpu", dtype=None):
    """Build embedded model `name` with weights drawn from `seed`, initialised directly on `device`
    (random init of SDXL's 3.5B parameters takes minutes on a CPU and seconds on a GPU), cast to `dtype`."""
    import torch

    with torch.device(device):
        torch.manual_seed(seed)
        if device.startswith("cuda"):
            torch.cuda.manual_seed_all(seed)
        pipe = _build(name)
    # Schedulers keep host-side tensors (numpy is called on them): rebuild outside the device context.
    pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    return pipe.to(dtype=dtype) if dtype is not None else pipe


def _build(name: str):
    import torch  # noqa: F401
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel

    tok = build_tokenizer()
    if name in ("tiny-sd", "tiny-sd-inpaint"):
        # tiny-sd-inpaint: the 9-channel UNet of inpainting checkpoints (latents + mask + masked-image latents)
        unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, sample_size=8,
                                    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                    attention_head_dim=4, norm_num_groups=8,
                                    in_channels=9 if name == "tiny-sd-inpaint" else 4)
        return StableDiffusionPipeline(vae=_vae((16, 16, 32, 32), 8, 0.18215, 64, False),
                                       text_encoder=_clip(32, 2, 4, 37, 32, vocab=1000), tokenizer=tok, unet=unet,
                                       scheduler=_scheduler(), safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    if name == "tiny-sdxl":
        unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, sample_size=8,
                                    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                                    use_linear_projection=True, addition_embed_type="text_time",
                                    addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
                                    projection_class_embeddings_input_dim=80, cross_attention_dim=80,
                                    norm_num_groups=8)
        return StableDiffusionXLPipeline(
            vae=_vae((16, 16, 32, 32), 8, 0.13025, 64, False),
            text_encoder=_clip(32, 2, 4, 37, 32, vocab=1000), tokenizer=tok,
            # Encoder widths differ (32 + 48 = cross_attention_dim), as in real SDXL (768 + 1280): diffusers'
            # single-file loader tells the two CLIPs apart by width.
            text_encoder_2=_clip(48, 2, 4, 37, 32, vocab=1000, act="gelu", with_projection=True),
            tokenizer_2=build_tokenizer(), unet=unet, scheduler=_scheduler(), force_zeros_for_empty_prompt=True)
    if name == "sd15":
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
        return StableDiffusionPipeline(vae=_vae((128, 256, 512, 512), 32, 0.18215, 512, False),
                                       text_encoder=_clip(768, 12, 12, 3072, 768), tokenizer=tok, unet=unet,
                                       scheduler=_scheduler(), safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    if name == "sdxl":
        unet = UNet2DConditionModel(
            sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
            cross_attention_dim=2048, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816)
        # force_upcast=False: behaves like the fp16-fixed SDXL VAE that production deployments use.
        return StableDiffusionXLPipeline(
            vae=_vae((128, 256, 512, 512), 32, 0.13025, 1024, False),
            text_encoder=_clip(768, 12, 12, 3072, 768), tokenizer=tok,
            text_encoder_2=_clip(1280, 32, 20, 5120, 1280, act="gelu", with_projection=True),
            tokenizer_2=build_tokenizer(), unet=unet, scheduler=_scheduler(), force_zeros_for_empty_prompt=True)
    raise ValueError(f"unknown embedded model {name!r}")


def ensure_saved(name: str, cache_dir: str, seed: int = 0) -> Path:
    """Write embedded model `name` to the cache once (atomically: replicas may race) and return its folder."""
    target = Path(cache_dir) / "embedded" / f"{name}-seed{seed}-{FORMAT_VERSION}"
    if (target / "model_index.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    log.warning("building embedded model %s (%s) in %s", name, NOISE_NOTE, target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        build_pipeline(name, seed).save_pretrained(tmp, safe_serialization=True)
        try:
            os.rename(tmp, target)
        except OSError:  # another process won the race; its copy is identical
            if not (target / "model_index.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def build_controlnet(name: str, seed: int = 0):
    """Embedded ControlNet `name` (tiny-sd-controlnet / tiny-sdxl-controlnet): diffusers' ControlNetModel.from_unet
    of the matching tiny UNet (same config), then every zero-initialised projection (the zero convs, the
    conditioning embedding's last conv) drawn at random from `seed`: a trained ControlNet's residuals are not
    zero, and with zeros a ControlNet would change nothing."""
    import torch
    from diffusers import ControlNetModel

    base = {"tiny-sd-controlnet": "tiny-sd", "tiny-sdxl-controlnet": "tiny-sdxl"}[name]
    torch.manual_seed(seed)
    net = ControlNetModel.from_unet(_build(base).unet, conditioning_embedding_out_channels=(8, 16, 16, 32))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for conv in (*net.controlnet_down_blocks, net.controlnet_mid_block):
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * 0.2)
            conv.bias.copy_(torch.randn(conv.bias.shape, generator=gen) * 0.05)
        # The conditioning embedding: variance-preserving weights and no biases, so the control image (not the
        # biases) is what its output carries through its 8 layers.
        for conv in net.controlnet_cond_embedding.modules():
            if isinstance(conv, torch.nn.Conv2d):
                fan_in = conv.weight[0].numel()
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
                conv.bias.zero_()
    return net


def ensure_controlnet_saved(name: str, cache_dir: str, seed: int = 0) -> Path:
    """Write embedded ControlNet `name` to the cache once (atomically) and return its folder."""
    target = Path(cache_dir) / "embedded" / f"{name}-seed{seed}-{FORMAT_VERSION}"
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    log.warning("building embedded ControlNet %s (random weights) in %s", name, target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        build_controlnet(name, seed).save_pretrained(tmp, safe_serialization=True)
        try:
            os.rename(tmp, target)
        except OSError:  # another process won the race; its copy is identical
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
