"""Training objectives (issue 8).

Wan2.1 is a rectified-flow model: x_sigma = sigma * noise + (1 - sigma) * x0, and the network
predicts the velocity v = noise - x0 (ComfyUI: denoised = x_sigma - sigma * v).

- ``flow_matching_loss``: the paper's objective on real video latents, MSE(v_pred, noise - x0).
- ``distillation_loss``: match the dense model's prediction on the same noised input (the
  teacher is the same network with stock dense attention and no LoRA). ``x0`` may be a real
  latent, or - with prompts only - None: the input is then put on the teacher's own path by one
  teacher Euler step from pure noise, x_sigma = noise - (1 - sigma) v_teacher(noise, 1), i.e.
  the teacher's one-step x0 estimate noised again with the same noise.

Noise and sigma come from a generator seeded per global sample index (``sample_noise``), so a
resumed run and a run split over ranks draw exactly the same noise for the same sample.
"""

from __future__ import annotations

import torch

SIGMA_SHIFT = 5.0  # Wan2.1 training/sampling shift for 480p (ComfyUI's Wan default is 8 at 720p)


def shifted_sigma(u: torch.Tensor, shift: float = SIGMA_SHIFT) -> torch.Tensor:
    """ComfyUI's time_snr_shift: sigma = shift u / (1 + (shift - 1) u)."""
    return shift * u / (1 + (shift - 1) * u)


def sample_noise(shape, index: int, seed: int, shift: float = SIGMA_SHIFT, sigma_range=(0.0, 1.0)):
    """(noise [*shape] fp32, sigma fp32 scalar) for the sample at global position ``index``."""
    g = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(index) * 7919) % (2**63 - 1))
    u = torch.rand((), generator=g) * (sigma_range[1] - sigma_range[0]) + sigma_range[0]
    sigma = shifted_sigma(u.clamp(1e-3, 1.0), shift)
    return torch.randn(shape, generator=g), sigma


def noise_batch(shape, indices, seed: int, shift: float = SIGMA_SHIFT, device=None):
    noises, sigmas = zip(*(sample_noise(shape, i, seed, shift) for i in indices))
    return torch.stack(noises).to(device), torch.stack(sigmas).to(device)


def flow_matching_loss(student, teacher, x0, context, noise, sigma) -> torch.Tensor:
    """``student(x, sigma, context)`` -> v; ``teacher`` unused (same signature as distillation)."""
    if x0 is None:
        raise ValueError("Expected video latents for the flow-matching objective, got a prompts-only "
                         "data folder. Try objective 'distill' (data-free distillation).")
    s = sigma.view(-1, *([1] * (x0.dim() - 1)))
    x_t = s * noise + (1 - s) * x0
    v = student(x_t, sigma, context)
    return torch.mean((v.float() - (noise - x0).float()) ** 2)


@torch.no_grad()
def teacher_input(teacher, x0, context, noise, sigma) -> torch.Tensor:
    """Noised input for distillation: from a real latent, or from the teacher when x0 is None."""
    s = sigma.view(-1, *([1] * (noise.dim() - 1)))
    if x0 is not None:
        return s * noise + (1 - s) * x0
    v1 = teacher(noise, torch.ones_like(sigma), context)
    return noise - (1 - s) * v1


def distillation_loss(student, teacher, x0, context, noise, sigma) -> torch.Tensor:
    """MSE between the student's and the dense teacher's velocity on the same noised input."""
    x_t = teacher_input(teacher, x0, context, noise, sigma)
    with torch.no_grad():
        target = teacher(x_t, sigma, context)
    v = student(x_t, sigma, context)
    return torch.mean((v.float() - target.float()) ** 2)


LOSSES = {"flow": flow_matching_loss, "distill": distillation_loss}
