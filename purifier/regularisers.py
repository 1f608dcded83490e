"""Latent regularisers from the VAE-robustness papers, as batch losses on latent codes z: N x D.

  ks_loss, cov_loss     Saseendran et al. (robust deterministic autoencoders, appendix A.1 eqs. 4-5): the
                        empirical marginal CDFs of z pulled towards the prior's, and the empirical covariance
                        towards the prior's (N(0, I)).
  coupled_ks_loss,      the same with two-point coupling between clean latents z and adversarial latents z_adv
  coupled_cov_loss      (eqs. 6 and 8): the joint covariance of [z, z_adv] is pulled towards [[I, aI], [aI, I]].
  prior_weight          eq. 10's heuristic: a loss's weight is the inverse of its mean on samples of the prior.
  total_correlation     Chen et al. 2018 (beta-TCVAE): TC of q(z) by minibatch-weighted sampling; Willetts et
                        al.'s Seatbelt-VAE penalises it on the top layer only.

Why a smooth CDF in the coupled KS term: its second part compares the empirical CDF of z at z_n with that of
z_adv at z_adv_n, both step functions of the codes, whose gradient is zero almost everywhere. A logistic kernel
of width ``tau`` makes it differentiable; tau -> 0 recovers the step function.
"""
from __future__ import annotations

import math

import torch


def _normal_cdf(z: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1 + torch.erf(z / math.sqrt(2)))


def _ecdf_at_samples(z: torch.Tensor) -> torch.Tensor:
    """The empirical CDF of each column at its own samples: (rank + 1) / N, a constant for the gradient."""
    n = z.shape[0]
    ranks = z.detach().argsort(0).argsort(0)
    return (ranks + 1).to(z.dtype) / n


def _smooth_ecdf(samples: torch.Tensor, at: torch.Tensor, tau: float) -> torch.Tensor:
    """Logistic-kernel empirical CDF of ``samples`` (N x D) evaluated at ``at`` (M x D) -> M x D."""
    return torch.sigmoid((at[:, None, :] - samples[None, :, :]) / tau).mean(1)


def ks_loss(z: torch.Tensor) -> torch.Tensor:
    """Eq. 4: mean over dimensions of MSE_n(F_d(z_nd), Phi(z_nd)), F_d the empirical marginal CDF."""
    return (_ecdf_at_samples(z) - _normal_cdf(z)).pow(2).mean()


def cov_loss(z: torch.Tensor) -> torch.Tensor:
    """Eq. 5: (1 / D^2) sum over (l, d) of (cov(z)_ld - I_ld)^2."""
    d = z.shape[1]
    return (_covariance(z) - torch.eye(d, dtype=z.dtype)).pow(2).mean()


def coupled_ks_loss(z: torch.Tensor, z_adv: torch.Tensor, tau: float = 0.05) -> torch.Tensor:
    """Eq. 6: 2/3 KS of the augmented set [z; z_adv] to the prior + 1/3 mean over d of
    MSE_n(F_d(z_nd), F_adv_d(z_adv_nd)) (smooth CDFs, see the module docstring)."""
    aug = ks_loss(torch.cat([z, z_adv]))
    couple = (_smooth_ecdf(z, z, tau) - _smooth_ecdf(z_adv, z_adv, tau)).pow(2).mean()
    return 2 / 3 * aug + 1 / 3 * couple


def coupled_cov_loss(z: torch.Tensor, z_adv: torch.Tensor, alpha: float) -> torch.Tensor:
    """Eq. 8: (1 / (2 D^2)) sum over the 2D x 2D joint covariance of [z, z_adv] minus [[I, aI], [aI, I]], squared."""
    d = z.shape[1]
    eye = torch.eye(d, dtype=z.dtype)
    target = torch.cat([torch.cat([eye, alpha * eye], 1), torch.cat([alpha * eye, eye], 1)])
    return (_covariance(torch.cat([z, z_adv], 1)) - target).pow(2).sum() / (2 * d * d)


def _covariance(z: torch.Tensor) -> torch.Tensor:
    c = z - z.mean(0, keepdim=True)
    return c.T @ c / max(z.shape[0] - 1, 1)


def prior_weight(loss, n: int, d: int, draws: int = 20, seed: int = 0, coupled: bool = False) -> float:
    """Eq. 10: 1 / mean of ``loss`` over ``draws`` batches of n codes drawn from N(0, I) (pairs of independent
    batches for a coupled loss), so that each regulariser enters the objective at unit scale."""
    gen = torch.Generator().manual_seed(seed)
    vals = []
    for _ in range(draws):
        args = [torch.randn(n, d, generator=gen) for _ in range(2 if coupled else 1)]
        vals.append(float(loss(*args)))
    return 1.0 / (sum(vals) / len(vals))


def _log_normal(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    return -0.5 * (math.log(2 * math.pi) + logvar + (z - mu).pow(2) * torch.exp(-logvar))


def total_correlation(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, dataset_size: int) -> torch.Tensor:
    """KL(q(z) || prod_j q(z_j)) estimated on a batch by minibatch-weighted sampling (Chen et al. 2018, eq. S6).

    z, mu, logvar: N x D (z sampled from q(z | x_n)). log q(z_i) ~ logsumexp_j log q(z_i | x_j) - log(N * size).
    """
    n = z.shape[0]
    lp = _log_normal(z[:, None, :], mu[None, :, :], logvar[None, :, :])  # N x N x D: log q(z_i,d | x_j)
    norm = math.log(n * dataset_size)
    log_qz = torch.logsumexp(lp.sum(2), dim=1) - norm
    log_prod = (torch.logsumexp(lp, dim=1) - norm).sum(1)
    return (log_qz - log_prod).mean()
