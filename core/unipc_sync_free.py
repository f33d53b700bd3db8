"""UniPC whose steps never make the host wait for the GPU (what the engine builds for `scheduler: unipc`).

diffusers' UniPC computes each step's coefficients (alphas, sigmas, lambdas, the r_k and the rho solve) on the
latents' device from sigmas it keeps on the CPU: every `sigmas[i].to(device)` is a blocking host-to-device copy and
the `torch.linalg.solve` of the corrector checks its result on the host. On a GPU that is ~8 waits per step and image
(one mixed batch of 8 on an H100: 474 of its 577 waits; experiments/sync_probe.py), each one stopping the host from
queueing the next work while the UNet runs.

This subclass does the same arithmetic on the CPU, where those tensors already are, and sends the GPU only what the
tensor part needs: the scalars enter as CPU 0-dim tensors (read by the kernels' launch, no copy) and the rho vector
goes through pinned memory without a sync. The tensor formulas are diffusers' own, in the same order; the only
difference is where the scalar coefficients are computed (CPU vs GPU float32: last-bit differences at most).
On the CPU and with a `solver_p`, diffusers' methods run unchanged.
"""
from __future__ import annotations

import torch
from diffusers import UniPCMultistepScheduler

from core.device_copy import to_device


def sync_free(device: torch.device) -> bool:
    """Whether the CPU-coefficient path runs for latents on `device` (a seam for the CPU tests)."""
    return device.type == "cuda"


class SyncFreeUniPCMultistepScheduler(UniPCMultistepScheduler):

    def _coefficients(self, t: int, s0: int, history: list[int], order: int, predictor: bool):
        """diffusers' coefficient arithmetic for sigmas[t] <- sigmas[s0] with earlier points `history`, on the CPU.
        Returns (scale_x, scale_m0, scale_res, rks, rhos): x_t = scale_x*x - scale_m0*m0 - scale_res*(...)."""
        to_alpha_sigma = self._sigma_to_alpha_sigma_t
        alpha_t, sigma_t = to_alpha_sigma(self.sigmas[t])
        alpha_s0, sigma_s0 = to_alpha_sigma(self.sigmas[s0])
        lambda_t = torch.log(alpha_t) - torch.log(sigma_t)
        lambda_s0 = torch.log(alpha_s0) - torch.log(sigma_s0)
        h = lambda_t - lambda_s0
        rks = []
        for si in history:
            alpha_si, sigma_si = to_alpha_sigma(self.sigmas[si])
            rks.append((torch.log(alpha_si) - torch.log(sigma_si) - lambda_s0) / h)
        all_rks = torch.stack(rks + [torch.ones(())])
        hh = -h if self.predict_x0 else h
        h_phi_1 = torch.expm1(hh)
        h_phi_k = h_phi_1 / hh - 1
        factorial_i = 1
        B_h = hh if self.config.solver_type == "bh1" else torch.expm1(hh)
        R, b = [], []
        for i in range(1, order + 1):
            R.append(torch.pow(all_rks, i - 1))
            b.append(h_phi_k * factorial_i / B_h)
            factorial_i *= i + 1
            h_phi_k = h_phi_k / hh - 1 / factorial_i
        R, b = torch.stack(R), torch.stack(b)
        if predictor:
            rhos = None if not rks else (torch.full((1,), 0.5) if order == 2 else torch.linalg.solve(R[:-1, :-1], b[:-1]))
        else:
            rhos = torch.full((1,), 0.5) if order == 1 else torch.linalg.solve(R, b)
        if self.predict_x0:
            return sigma_t / sigma_s0, alpha_t * h_phi_1, alpha_t * B_h, rks, rhos
        return alpha_t / alpha_s0, sigma_t * h_phi_1, sigma_t * B_h, rks, rhos

    def multistep_uni_p_bh_update(self, model_output, *args, sample=None, order=None, **kwargs):
        if args or kwargs or self.solver_p or sample is None or order is None or not sync_free(sample.device) \
                or self.config.solver_type not in ("bh1", "bh2"):
            return super().multistep_uni_p_bh_update(model_output, *args, sample=sample, order=order, **kwargs)
        x, m0, step = sample, self.model_outputs[-1], self.step_index
        history = [step - i for i in range(1, order)]
        scale_x, scale_m0, scale_res, rks, rhos = self._coefficients(step + 1, step, history, order, True)
        x_t_ = scale_x * x - scale_m0 * m0
        if rks:
            D1s = torch.stack([(self.model_outputs[-(i + 1)] - m0) / rk for i, rk in enumerate(rks, 1)], dim=1)
            pred_res = torch.einsum("k,bkc...->bc...", to_device(rhos.to(x.dtype), x.device), D1s)
            x_t = x_t_ - scale_res * pred_res
        else:  # first order: diffusers' `- alpha_t * B_h * 0` kept (a non-finite coefficient gives NaN there too)
            x_t = x_t_ - scale_res * 0
        return x_t.to(x.dtype)

    def multistep_uni_c_bh_update(self, this_model_output, *args, last_sample=None, this_sample=None, order=None,
                                  **kwargs):
        if args or kwargs or last_sample is None or this_sample is None or order is None \
                or not sync_free(this_sample.device) or self.config.solver_type not in ("bh1", "bh2"):
            return super().multistep_uni_c_bh_update(this_model_output, *args, last_sample=last_sample,
                                                     this_sample=this_sample, order=order, **kwargs)
        x, m0, step = last_sample, self.model_outputs[-1], self.step_index
        history = [step - (i + 1) for i in range(1, order)]
        scale_x, scale_m0, scale_res, rks, rhos = self._coefficients(step, step - 1, history, order, False)
        rhos = rhos.to(x.dtype)
        x_t_ = scale_x * x - scale_m0 * m0
        corr_res = 0
        if rks:
            D1s = torch.stack([(self.model_outputs[-(i + 1)] - m0) / rk for i, rk in enumerate(rks, 1)], dim=1)
            corr_res = torch.einsum("k,bkc...->bc...", to_device(rhos[:-1], x.device), D1s)
        x_t = x_t_ - scale_res * (corr_res + rhos[-1] * (this_model_output - m0))
        return x_t.to(x.dtype)
