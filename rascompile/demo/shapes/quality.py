"""Quality figures for generated shapes images: fidelity to dense, prompt adherence, distribution distance."""

from __future__ import annotations

import torch


def fidelity(images: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """PSNR (dB) and SSIM of ``images`` against ``reference`` (the dense result of the same seed), in [-1, 1]."""
    from ..._extras import require_extra

    require_extra("demo", "torchmetrics", feature="rascompile.demo.shapes.quality.fidelity")
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    a, b = (images.float() + 1) / 2, (reference.float() + 1) / 2
    psnr = peak_signal_noise_ratio(a, b, data_range=1.0, reduction="none", dim=(1, 2, 3))
    ssim = structural_similarity_index_measure(a, b, data_range=1.0, reduction="none")
    return {"psnr": psnr.clamp(max=100.0).mean().item(), "ssim": ssim.mean().item()}


def frechet_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to feature sets ``x`` [n, d] and ``y`` [m, d]."""
    x, y = x.double(), y.double()
    mu_x, mu_y = x.mean(0), y.mean(0)
    cov_x, cov_y = torch.cov(x.T), torch.cov(y.T)
    root_x = _sqrtm_psd(cov_x)
    cross = _sqrtm_psd(root_x @ cov_y @ root_x)
    return float((mu_x - mu_y).square().sum() + torch.trace(cov_x) + torch.trace(cov_y) - 2 * torch.trace(cross))


def _sqrtm_psd(matrix: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T
