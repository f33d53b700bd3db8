"""Live previews (core/previews.py): latent2rgb per family, TAESD from a folder, JPEG size, cadence, config."""
from __future__ import annotations

import base64
import io

import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from core.config import EngineConfig, PreviewConfig
from core.previews import LATENT_RGB_FACTORS, PreviewMaker, encode_jpeg, latent2rgb


def _expected_pixel(family: str, latent: list[float]) -> list[int]:
    factors, bias = LATENT_RGB_FACTORS[family]
    rgb = [sum(latent[c] * factors[c][k] for c in range(4)) + bias[k] for k in range(3)]
    return [int(min(255, max(0, (v + 1) * 127.5))) for v in rgb]


@pytest.mark.parametrize("family", ["sd15", "sd21", "sdxl"])
def test_latent2rgb_is_the_published_linear_map(family):
    gen = torch.Generator().manual_seed(3)
    latents = torch.randn(2, 4, 6, 5, generator=gen) * 0.8
    rgb = latent2rgb(latents, family)
    assert rgb.shape == (2, 6, 5, 3) and rgb.dtype == torch.uint8
    for b, y, x in ((0, 0, 0), (1, 5, 4), (0, 3, 2)):
        want = _expected_pixel(family, latents[b, :, y, x].tolist())
        got = rgb[b, y, x].tolist()
        assert all(abs(g - w) <= 1 for g, w in zip(got, want)), (got, want)


def test_families_differ_and_sd2_shares_sd15():
    latents = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(latent2rgb(latents, "sd15"), latent2rgb(latents, "sd21"))
    assert not torch.equal(latent2rgb(latents, "sd15"), latent2rgb(latents, "sdxl"))


def test_latent2rgb_rejects_unknown_family_and_wrong_channels():
    with pytest.raises(ValueError, match="family 'flux'"):
        latent2rgb(torch.zeros(1, 4, 2, 2), "flux")
    with pytest.raises(ValueError, match="shape"):
        latent2rgb(torch.zeros(1, 16, 2, 2), "sdxl")


def test_jpeg_is_bounded_and_decodes():
    rgb = torch.randint(0, 255, (128, 96, 3), dtype=torch.uint8)
    img = Image.open(io.BytesIO(encode_jpeg(rgb, max_side=64, quality=60)))
    assert img.format == "JPEG" and max(img.size) == 64 and img.size == (48, 64)
    small = Image.open(io.BytesIO(encode_jpeg(rgb[:16, :16], max_side=64, quality=60)))
    assert small.size == (16, 16)  # never upscaled


def test_maker_cadence_and_base64_previews():
    maker = PreviewMaker(PreviewConfig(every_n_steps=3, max_side=32), "sdxl")
    assert [s for s in range(1, 11) if maker.due(s, 10)] == [3, 6, 9]
    assert not maker.due(9, 9)  # the last step: the final image follows
    out = maker.jpegs_b64(torch.randn(3, 4, 16, 8))
    assert len(out) == 3
    img = Image.open(io.BytesIO(base64.b64decode(out[0])))
    assert img.size == (8, 16)


def test_method_none_never_due():
    maker = PreviewMaker(PreviewConfig(method="none"), "sd15")
    assert not maker.enabled and not any(maker.due(s, 50) for s in range(1, 51))


def test_taesd_from_a_weights_folder(tmp_path):
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    tiny = AutoencoderTiny(encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
                           num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1))
    tiny.save_pretrained(tmp_path / "taesd")
    maker = PreviewMaker(PreviewConfig(method="taesd", taesd=str(tmp_path / "taesd"), max_side=256), "sd15")
    latents = torch.randn(2, 4, 8, 12)
    rgb = maker.rgb(latents)
    assert rgb.shape == (2, 64, 96, 3)  # a real decode: image resolution (8x the latent)
    with torch.no_grad():
        want = ((tiny.decode(latents).sample + 1) * 127.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    assert (rgb.int() - want.int()).abs().max() <= 1
    assert len(maker.jpegs_b64(latents)) == 2


def test_config_bounds_and_taesd_needs_weights():
    with pytest.raises(ValidationError, match="needs previews.taesd"):
        PreviewConfig(method="taesd")
    with pytest.raises(ValidationError, match="every_n_steps"):
        EngineConfig(previews={"every_n_steps": 0})
    with pytest.raises(ValidationError, match="method"):
        EngineConfig(previews={"method": "vae"})
    assert EngineConfig().previews.method == "latent2rgb"


def test_importing_previews_does_not_import_torch():
    from tests.import_probe import heavy_imports

    assert heavy_imports(["core.previews"], ("torch", "ray")) == []
