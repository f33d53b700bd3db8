"""img2img and inpainting inside the step loop (issue 19): a request with an init image enters its own scheduler
at the step its strength implies and shares UNet calls with text-to-image requests of the same latent shape.

As diffusers 0.42's StableDiffusion(XL)Img2ImgPipeline / StableDiffusionInpaintPipeline do, per image:
- get_timesteps: init_timestep = min(int(steps * strength), steps), t_start = steps - init_timestep; the sample's
  step index starts at t_start * order (its scheduler keeps the whole schedule: set_begin_index there);
- prepare_latents: the init image's latent distribution is sampled with the image's own CPU generator
  (retrieve_latents), scaled (SDXL: latents_mean/std when the VAE has them), then noise from the same generator
  and scheduler.add_noise at the first timestep. Inpainting at strength 1 starts from pure noise x
  init_noise_sigma, as the inpaint pipeline does;
- a regular 4-channel UNet inpaints by latent mask blending after every step: latents = (1 - mask) *
  add_noise(init, noise, next t) + mask * latents (the init latents themselves after the last step);
- a 9-channel inpainting UNet gets [latents, mask, masked-image latents] as its input (the masked-image latents
  sampled with the generator after the noise, as prepare_mask_latents does). Text-to-image rows on such a model
  get a mask of ones and a gray image's latents (as A1111 does), so every row has 9 channels.
The mask (white = repaint) is blurred by mask_blur (PIL GaussianBlur) and binarized at 0.5 for the latents; the
decoded image keeps the init image's pixels outside the blurred mask, pasted back with it as alpha (A1111's overlay).

The VAE encoder runs on the GPU thread when requests are admitted, batched per size, and its latent distribution
(not a sample: each image samples its own) is cached by content hash + size (core/caches.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from core.image_inputs import NO_URIS, UriPolicy, decode_request_images, invalid, output_size, repaint_mask

if TYPE_CHECKING:
    from PIL import Image as PILImage

DEFAULT_STRENGTH = 0.75  # diffusers' img2img default


@dataclass(eq=False)
class ImageConditioning:
    """A request's image inputs at its output size: decoded when it is resolved (caller's thread); the VAE
    latent distributions are filled on the GPU thread at admission."""

    init: "PILImage.Image"  # RGB, output size
    init_key: tuple  # (sha256 of the encoded bytes, width, height): the init-latents cache key
    strength: float
    mask: "PILImage.Image | None" = None  # L, output size, blurred (white = repaint)
    mask_key: tuple | None = None
    moments: Any = None  # [1, 2C, h, w] latent distribution parameters of the init image
    masked_moments: Any = None  # 9-channel UNets: of the masked image (init with the repaint area zeroed)

    def latent_mask(self, vae_scale: int, device, dtype):
        """[1, 1, h, w] binarized mask at latent size (nearest), as prepare_mask_latents interpolates it."""
        import numpy as np
        import torch

        m = torch.from_numpy((np.asarray(self.mask, dtype=np.float32) / 255.0 >= 0.5).astype(np.float32))
        h, w = m.shape
        m = torch.nn.functional.interpolate(m[None, None], size=(h // vae_scale, w // vae_scale))
        return m.to(device=device, dtype=dtype)


@dataclass(eq=False)
class ImageSample:
    """One sample's img2img/inpainting state (DenoiseSample.image)."""

    image_latents: Any = None  # scaled init latents (4-channel inpainting blends toward them)
    noise: Any = None
    mask: Any = None  # [1, 1, h, w] latent mask: blend after each step (4-channel UNets only)
    extra: Any = None  # [1, 5, h, w] mask + masked-image latents, concatenated to the UNet input (9-channel)


def steps_run(steps: int, strength: float) -> int:
    return min(int(steps * strength), steps)


def prepare(req, limits, uris: UriPolicy = NO_URIS) -> tuple[dict, ImageConditioning | None]:
    """Decode and check a request's images (caller's thread): the width/height the output follows and the
    ImageConditioning, or ({}, None) without an init image. Raises GenerationError naming the field."""
    if req.init_image is None:
        return {}, None
    images = decode_request_images(req.init_image, req.mask_image, (), limits, uris)
    width, height = output_size(images.init.size, req.width, req.height)
    strength = DEFAULT_STRENGTH if req.strength is None else req.strength
    cond = ImageConditioning(init=images.init.image, init_key=(images.init.sha256,), strength=strength)
    if images.mask is not None:
        cond.mask = images.mask.image
        cond.mask_key = (images.mask.sha256, req.mask_blur)
    return {"width": width, "height": height, "strength": strength}, cond


def fit(cond: ImageConditioning, req) -> None:
    """Resize to the resolved output size (LANCZOS, as diffusers' VaeImageProcessor) and blur the mask."""
    from PIL import Image

    if steps_run(req.steps, cond.strength) < 1:
        raise invalid("strength", f"strength: {cond.strength} x {req.steps} steps runs no denoising step; use a "
                                  f"strength of at least {1 / req.steps:.3g} or more steps")
    size = (req.width, req.height)
    if cond.init.size != size:
        cond.init = cond.init.resize(size, Image.LANCZOS)
    cond.init_key = (cond.init_key[0], *size)
    if cond.mask is not None:
        if cond.mask.size != size:
            cond.mask = cond.mask.resize(size, Image.LANCZOS)
        cond.mask = repaint_mask(cond.mask, req.mask_blur)
        cond.mask_key = (*cond.mask_key, *size)


# ------------------------------------------------------------------------------------------ GPU thread: VAE encode

def encode_moments(vae, pixels) -> Any:
    """The VAE encoder's latent distribution parameters [n, 2C, h, w] (upcast where force_upcast says)."""
    import torch

    upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
    if upcast:
        vae.to(dtype=torch.float32)
    try:
        dtype = next(vae.encoder.parameters()).dtype
        with torch.no_grad():
            return vae.encode(pixels.to(dtype)).latent_dist.parameters
    finally:
        if upcast:
            vae.to(dtype=torch.float16)


def masked_image(cond: ImageConditioning):
    """The init image with the repaint area set to 0 in [-1, 1] terms (mid-gray): init * (mask < 0.5)."""
    import numpy as np

    keep = (np.asarray(cond.mask, dtype=np.float32) / 255.0 < 0.5)[..., None]
    # the pixel value 127.5 maps to 0 in [-1, 1]: (x / 255 * 2 - 1) * keep
    return np.where(keep, np.asarray(cond.init, dtype=np.float32), 127.5)


def encode_images(engine, conds: list[ImageConditioning], device) -> None:
    """Fill the latent distributions of admitted requests' images: cache hits first, the rest in one VAE call per
    size (GPU thread)."""
    import torch

    vae, cache, nine = engine.pipe.vae, engine.caches.init_latents, inpainting_unet(engine.pipe)
    wanted: dict[tuple, list] = {}  # cache key -> [(cond, attribute, image array)]
    for cond in conds:
        if cond.moments is None:
            wanted.setdefault(("init", *cond.init_key), []).append((cond, "moments", cond.init))
        if nine and cond.mask is not None and cond.masked_moments is None:
            wanted.setdefault(("masked", *cond.init_key, *cond.mask_key), []).append(
                (cond, "masked_moments", masked_image(cond)))
    misses: dict[tuple, list] = {}  # (w, h) -> [key]
    for key, users in wanted.items():
        hit = cache.get(key)
        if hit is not None:
            for cond, attr, _ in users:
                setattr(cond, attr, hit.to(device))
        else:
            misses.setdefault((key[-2], key[-1]), []).append(key)
    import numpy as np

    for keys in misses.values():
        arrays = [np.asarray(wanted[k][0][2], dtype=np.float32) for k in keys]
        pixels = (torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 255.0 * 2.0 - 1.0).to(device)
        moments = encode_moments(vae, pixels)
        for i, key in enumerate(keys):
            m = moments[i:i + 1]
            cache.put(key, m)
            for cond, attr, _ in wanted[key]:
                setattr(cond, attr, m)


def gray_moments(engine, width: int, height: int, device):
    """Latent distribution of a mid-gray image (text-to-image rows on a 9-channel UNet), cached per size."""
    import torch

    key = ("gray", width, height)
    m = engine.caches.init_latents.get(key)
    if m is None:
        m = encode_moments(engine.pipe.vae, torch.zeros(1, 3, height, width, device=device))
        engine.caches.init_latents.put(key, m)
    return m.to(device)


# ------------------------------------------------------------------------------------------ GPU thread: samples

def inpainting_unet(pipe) -> bool:
    return pipe.unet.config.in_channels == 9


def scale_latents(vae, latents):
    """As the img2img pipelines scale encoded latents (SDXL: latents_mean/std when the VAE config has them)."""
    import torch

    cfg = vae.config
    mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
    if mean is not None and std is not None:
        m = torch.tensor(mean).view(1, -1, 1, 1).to(latents)
        s = torch.tensor(std).view(1, -1, 1, 1).to(latents)
        return (latents - m) * cfg.scaling_factor / s
    return cfg.scaling_factor * latents


def _sample(moments, generator, dtype):
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    return DiagonalGaussianDistribution(moments).sample(generator).to(dtype)


def start(sample, pipe, engine, shape: tuple, device, dtype) -> None:
    """The sample's start: its step offset and initial latents (from its init image, or noise), and its
    inpainting state. `sample.scheduler`, `.timesteps` and `.generator` are set."""
    import torch
    from diffusers.utils.torch_utils import randn_tensor

    req, sched, gen = sample.job.request, sample.scheduler, sample.generator
    cond: ImageConditioning | None = sample.job.images
    nine = inpainting_unet(pipe)
    if cond is None:  # text-to-image on a 9-channel UNet: mask of ones, gray image
        noise = randn_tensor(shape, generator=gen, device=device, dtype=dtype)
        sample.latents = noise * sched.init_noise_sigma
        gray = scale_latents(pipe.vae, gray_moments(engine, req.width, req.height, device)[:, :shape[1]]).to(dtype)
        ones = gray.new_ones((1, 1, *shape[2:]))
        sample.image = ImageSample(extra=torch.cat([ones, gray], 1))
        return

    t_start = req.steps - steps_run(req.steps, cond.strength)
    sample.step = sample.first_step = t_start * sched.order
    if hasattr(sched, "set_begin_index"):
        sched.set_begin_index(sample.step)
    t0 = sched.timesteps[sample.step:sample.step + 1]
    state = ImageSample()
    inpaint_max = cond.mask is not None and cond.strength >= 1.0
    if not (nine and inpaint_max):  # the inpaint pipeline encodes the image only where it is used
        state.image_latents = scale_latents(pipe.vae, _sample(cond.moments, gen, dtype))
    state.noise = randn_tensor(shape, generator=gen, device=device, dtype=dtype)
    if inpaint_max:
        sample.latents = state.noise * sched.init_noise_sigma
    else:
        sample.latents = sched.add_noise(state.image_latents, state.noise, t0)
    if cond.mask is not None:
        mask = cond.latent_mask(pipe.vae_scale_factor, device, dtype)
        if nine:
            masked = scale_latents(pipe.vae, _sample(cond.masked_moments, gen, dtype))
            state.extra = torch.cat([mask, masked], 1)
        else:
            state.mask = mask
    elif nine:  # img2img without a mask on an inpainting UNet: repaint everything
        gray = scale_latents(pipe.vae, gray_moments(engine, req.width, req.height, device)[:, :shape[1]]).to(dtype)
        state.extra = torch.cat([gray.new_ones((1, 1, *shape[2:])), gray], 1)
    sample.image = state


def after_step(sample) -> None:
    """4-channel inpainting: keep the unmasked area on the init image's noising trajectory (after step())."""
    state = sample.image
    if state is None or state.mask is None:
        return
    proper = state.image_latents
    if sample.step < sample.total:
        t = sample.scheduler.timesteps[sample.step:sample.step + 1]
        proper = sample.scheduler.add_noise(proper, state.noise, t)
    sample.latents = (1 - state.mask) * proper + state.mask * sample.latents


def unet_input(sample, scaled):
    """The sample's UNet input: its scaled latents (+ mask and masked-image latents for a 9-channel UNet)."""
    extra = sample.image.extra if sample.image is not None else None
    if extra is None:
        return scaled
    import torch

    return torch.cat([scaled, extra.to(scaled.dtype)], 1)


def paste_back(pixels, cond: ImageConditioning | None):
    """The decoded image (HxWx3 uint8) with the init image's pixels outside the (blurred) mask (A1111's overlay)."""
    if cond is None or cond.mask is None:
        return pixels
    import numpy as np

    alpha = np.asarray(cond.mask, dtype=np.uint32)[..., None]  # 255 = generated, 0 = init
    init = np.asarray(cond.init, dtype=np.uint32)
    out = (pixels.astype(np.uint32) * alpha + init * (255 - alpha) + 127) // 255
    return out.astype(np.uint8)
