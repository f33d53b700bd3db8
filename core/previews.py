"""Live previews of the latents while a request denoises: small JPEGs (base64) every N steps.

Two methods, chosen per model by `EngineConfig.previews` (core.config.PreviewConfig):
- latent2rgb: a fixed linear map from the 4 latent channels to RGB per model family (no weights, ~free: one
  tiny matmul on a 1/8-size latent). The coefficients are the published ones of ComfyUI's
  comfy/latent_formats.py (classes SD15 and SDXL), fitted against the real VAEs; SD2.x shares SD1.5's VAE.
- taesd: diffusers' AutoencoderTiny (TAESD / TAESDXL weights from a local folder or hub id): a real, if
  blurry, decode at full size, a few ms per image on a GPU.

No Ray here, and torch is imported only when a preview is made (importing this module stays cheap).
"""
from __future__ import annotations

import base64
import io
import threading
from typing import TYPE_CHECKING, Any

from core.config import PreviewConfig

if TYPE_CHECKING:
    import torch

# latent channel -> (R, G, B) contribution, and the RGB bias; applied to the model-space latents (the ones the
# UNet sees, i.e. already multiplied by the VAE's scaling factor). Output is in [-1, 1].
# Source: ComfyUI comfy/latent_formats.py, SD15.latent_rgb_factors and SDXL.latent_rgb_factors(_bias).
LATENT_RGB_FACTORS: dict[str, tuple[tuple[tuple[float, float, float], ...], tuple[float, float, float]]] = {
    "sd15": (((0.3512, 0.2297, 0.3227),
              (0.3250, 0.4974, 0.2350),
              (-0.2829, 0.1762, 0.2721),
              (-0.2120, -0.2616, -0.7177)), (0.0, 0.0, 0.0)),
    "sdxl": (((0.3651, 0.4232, 0.4341),
              (-0.2533, -0.0042, 0.1068),
              (0.1076, 0.1111, -0.0362),
              (-0.3165, -0.2492, -0.2188)), (0.1084, -0.0175, -0.0011)),
}
LATENT_RGB_FACTORS["sd21"] = LATENT_RGB_FACTORS["sd15"]  # same VAE (and latent space) as SD1.5


def latent2rgb(latents: "torch.Tensor", family: str) -> "torch.Tensor":
    """(B, 4, h, w) latents -> (B, h, w, 3) uint8 RGB on the CPU, at latent resolution (1/8 of the image)."""
    import torch

    if family not in LATENT_RGB_FACTORS:
        raise ValueError(f"no latent2rgb factors for family {family!r}; known: {', '.join(sorted(LATENT_RGB_FACTORS))}")
    factors, bias = LATENT_RGB_FACTORS[family]
    if latents.ndim != 4 or latents.shape[1] != len(factors):
        raise ValueError(f"expected latents of shape (B, {len(factors)}, h, w), got {tuple(latents.shape)}")
    weight = torch.tensor(factors, dtype=torch.float32, device=latents.device)  # (4, 3)
    rgb = torch.einsum("bchw,cr->bhwr", latents.float(), weight) + torch.tensor(bias, device=latents.device)
    return ((rgb + 1.0) * 127.5).clamp(0, 255).to(torch.uint8).cpu()


def encode_jpeg(rgb: Any, max_side: int, quality: int) -> bytes:
    """One (h, w, 3) uint8 array/tensor -> JPEG bytes, scaled so its longer side is at most max_side."""
    from PIL import Image

    img = Image.fromarray(rgb.numpy() if hasattr(rgb, "numpy") else rgb, "RGB")
    scale = max_side / max(img.size)
    if scale < 1:
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BILINEAR)
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=quality)
    return out.getvalue()


class PreviewMaker:
    """Makes the previews of one engine (one model family). Thread-safe; TAESD loads at the first preview."""

    def __init__(self, config: PreviewConfig, family: str, device: Any = "cpu", dtype: Any = None):
        self.config, self.family, self.device, self.dtype = config, family, device, dtype
        self._taesd = None
        self._lock = threading.Lock()
        if config.method == "latent2rgb" and family not in LATENT_RGB_FACTORS:
            raise ValueError(f"previews.method latent2rgb has no factors for family {family!r}")

    @property
    def enabled(self) -> bool:
        return self.config.method != "none"

    def due(self, step: int, total: int) -> bool:
        """Whether step (1-based, of total) gets a preview: every every_n_steps-th, never the last (the final
        image follows it anyway)."""
        return self.enabled and step < total and step % self.config.every_n_steps == 0

    def rgb(self, latents: "torch.Tensor") -> "torch.Tensor":
        """(B, h, w, 3) uint8 CPU tensor: at latent resolution (latent2rgb) or image resolution (taesd)."""
        import torch

        with torch.no_grad():
            if self.config.method == "taesd":
                taesd = self._load_taesd()
                param = next(taesd.parameters())
                image = taesd.decode(latents.to(param.device, param.dtype)).sample  # [-1, 1]
                return ((image.float() + 1.0) * 127.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()
            return latent2rgb(latents, self.family)

    def jpegs_b64(self, latents: "torch.Tensor") -> list[str]:
        """One base64 JPEG per latent in the batch."""
        c = self.config
        return [base64.b64encode(encode_jpeg(img, c.max_side, c.jpeg_quality)).decode() for img in self.rgb(latents)]

    def _load_taesd(self):
        with self._lock:
            if self._taesd is None:
                from diffusers import AutoencoderTiny

                model = AutoencoderTiny.from_pretrained(self.config.taesd)
                model.to(self.device, **({"dtype": self.dtype} if self.dtype is not None else {}))
                self._taesd = model.eval().requires_grad_(False)
            return self._taesd
