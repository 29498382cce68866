"""MDM's loss level: geometry-aware matching on the hypersphere (MDM, arXiv 2605.23482, docs/method.md §3).

Pure ``torch`` functions that work for any batch sizes, plus :class:`MDMLoss`, the full objective

    L = λ_nce · InfoNCE_sym(S) + λ_agr · GKE(U_R, U_S) + λ_dis · GKE(G_R, G_S)

on a real batch ``R`` (a constant) and a synthetic mini-batch ``S``, where ``U = normalize(z_v + z_t)`` are the
agreement directions and ``G = normalize(z_v − z_t)`` the discrepancy directions of the pairs.

Logit scales: every function here takes ``logit_scale`` as the **multiplier** of the cosine similarities,
already exponentiated (``1 / τ``, e.g. ``1 / 0.07 ≈ 14.3``), never the raw log-parameter of CLIP / SigLIP.
Callers holding the raw parameter pass ``param.exp()`` (``DualEncoder.logit_scale`` already does).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

CONTRASTIVE_LOSSES = ("clip", "siglip")


def _check_pair(a: torch.Tensor, b: torch.Tensor, what: str, same_rows: bool = False) -> None:
    if a.ndim != 2 or b.ndim != 2:
        raise ValueError(
            f"{what}: expected two 2-D tensors [N, d], got shapes {tuple(a.shape)} and {tuple(b.shape)}."
        )
    if a.shape[0] == 0 or b.shape[0] == 0:
        raise ValueError(f"{what}: empty point set (shapes {tuple(a.shape)} and {tuple(b.shape)}).")
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"{what}: feature dims differ ({a.shape[1]} vs {b.shape[1]}); embed both in one space."
        )
    if same_rows and a.shape[0] != b.shape[0]:
        raise ValueError(
            f"{what}: {a.shape[0]} images but {b.shape[0]} texts; row i of both must be one pair (same batch size)."
        )


def _as_float(x: torch.Tensor) -> torch.Tensor:
    # arccos near ±1 needs more than half precision: in bfloat16, 1 − 1e-6 rounds to 1 and the gradient is infinite.
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _check_scale(logit_scale: torch.Tensor | float, what: str) -> None:
    if isinstance(logit_scale, torch.Tensor):
        if logit_scale.numel() != 1:
            raise ValueError(f"{what}: logit_scale must be a scalar, got shape {tuple(logit_scale.shape)}.")
    elif not (isinstance(logit_scale, (int, float)) and logit_scale > 0 and math.isfinite(logit_scale)):
        raise ValueError(
            f"{what}: logit_scale={logit_scale!r} must be a positive finite multiplier (1 / temperature, already "
            "exponentiated). Pass exp() of a raw log-scale parameter."
        )


def _const(x):
    # The teacher's scale / bias are constants of the distillation; detaching keeps gradients off the teacher.
    return x.detach() if isinstance(x, torch.Tensor) else x


# ============================================================================================ geodesic kernel
def geodesic_distance(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Great-circle distances ``φ(a_i, b_j) = arccos<â_i, b̂_j>`` in ``[0, π]``, shape ``[m, n]``.

    Rows are L2-normalised inside. The cosine is clamped to ``[−1 + eps, 1 − eps]`` because ``d arccos(c) / dc``
    is infinite at ``c = ±1`` -- which every diagonal term and every duplicated point reaches.
    """
    _check_pair(a, b, "geodesic_distance")
    if not 0.0 < eps < 1.0:
        raise ValueError(f"geodesic_distance: eps={eps} must lie in (0, 1).")
    a, b = F.normalize(_as_float(a), dim=-1), F.normalize(_as_float(b), dim=-1)
    return torch.acos((a @ b.T).clamp(-1.0 + eps, 1.0 - eps))


def geodesic_kernel(a: torch.Tensor, b: torch.Tensor, sigma: float = 0.5, eps: float = 1e-6) -> torch.Tensor:
    """Geodesic Gaussian kernel ``k(a, b) = exp(−φ(a, b)² / (2σ²))``, shape ``[m, n]`` (σ in radians)."""
    if not sigma > 0:
        raise ValueError(f"geodesic_kernel: sigma={sigma} must be positive (radians; MDM uses 0.5).")
    phi = geodesic_distance(a, b, eps)
    return torch.exp(-phi.square() / (2.0 * sigma**2))


def geodesic_kernel_energy(
    a: torch.Tensor, b: torch.Tensor, sigma: float = 0.5, eps: float = 1e-6, unbiased: bool = False
) -> torch.Tensor:
    """Geodesic kernel energy between point sets ``a`` [m, d] and ``b`` [n, d] (rows normalised inside); a scalar.

    ``GKE = sqrt(mean k(A, A) + mean k(B, B) − 2 mean k(A, B) + 1e-12)`` (docs/method.md §3).

    By default the within-set means run over all ``m²`` / ``n²`` pairs, **including the diagonal** (the
    V-statistic). With the diagonal, ``GKE(A, A) = 0`` exactly up to the ``1e-12``, and the clamp in
    :func:`geodesic_distance` keeps the diagonal's gradient finite (``k(c)`` is smooth in the cosine at ``c = 1``,
    so the clamp changes values by ~``eps / σ²`` only). The diagonal adds about ``1/m + 1/n`` to the squared
    energy of two samples of one distribution, a floor that damps the gradient of the root.
    ``unbiased=True`` takes off-diagonal means (the U-statistic, as the reference code): no floor, so the root's
    gradient is larger near a match, and the squared energy of matching sets goes below zero, where the clamp
    makes the gradient zero (``m, n ≥ 2``).

    The geodesic Gaussian kernel is not positive definite on the sphere for every σ (Feragen et al., CVPR 2015),
    so the squared energy can dip below zero; it is clamped at 0 before the root (``+ 1e-12`` keeps the root's
    gradient finite at 0).
    """
    _check_pair(a, b, "geodesic_kernel_energy")
    if unbiased and min(len(a), len(b)) < 2:
        raise ValueError(
            f"geodesic_kernel_energy(unbiased=True) needs ≥ 2 points per set, got {len(a)} and {len(b)}."
        )
    k_aa = _within_set_mean(geodesic_kernel(a, a, sigma, eps), unbiased)
    k_bb = _within_set_mean(geodesic_kernel(b, b, sigma, eps), unbiased)
    k_ab = geodesic_kernel(a, b, sigma, eps).mean()
    return torch.sqrt((k_aa + k_bb - 2.0 * k_ab).clamp_min(0.0) + 1e-12)


def _within_set_mean(kernel: torch.Tensor, off_diagonal: bool) -> torch.Tensor:
    """Mean of a square kernel matrix, over all entries or over the off-diagonal ones."""
    if not off_diagonal:
        return kernel.mean()
    n = kernel.shape[0]
    return (kernel.sum() - kernel.diagonal().sum()) / (n * (n - 1))


def agreement_discrepancy(
    image_embeds: torch.Tensor, text_embeds: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """Agreement ``u = normalize(z_v + z_t)`` and discrepancy ``g = normalize(z_v − z_t)`` of paired rows.

    ``z_v, z_t`` are normalised first, so ``u ⟂ g`` (``<z_v + z_t, z_v − z_t> = |z_v|² − |z_t|² = 0``). When
    ``z_v = −z_t`` (or ``z_v = z_t``) the sum (difference) is zero; ``eps`` in the normalisation then yields a zero
    row with a finite gradient instead of a NaN.
    """
    _check_pair(image_embeds, text_embeds, "agreement_discrepancy", same_rows=True)
    zv, zt = F.normalize(image_embeds, dim=-1), F.normalize(text_embeds, dim=-1)
    return F.normalize(zv + zt, dim=-1, eps=eps), F.normalize(zv - zt, dim=-1, eps=eps)


# ============================================================================================ contrastive
def clip_contrastive_loss(
    image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor | float
) -> torch.Tensor:
    """Symmetric InfoNCE over ``N`` pairs: ``½ (CE(image → text) + CE(text → image))``, row ``i`` matches row ``i``.

    ``logits = logit_scale · cos(image_i, text_j)`` (rows normalised inside). ``logit_scale`` is the multiplier
    ``1 / τ`` **already exponentiated** (``1 / 0.07`` for MDM's τ = 0.07), never CLIP's raw log-parameter; pass a
    tensor to learn it (gradients flow into it).
    """
    _check_pair(image_embeds, text_embeds, "clip_contrastive_loss", same_rows=True)
    _check_scale(logit_scale, "clip_contrastive_loss")
    zv, zt = F.normalize(image_embeds, dim=-1), F.normalize(text_embeds, dim=-1)
    logits = logit_scale * (zv @ zt.T)
    labels = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


def sigmoid_contrastive_loss(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    logit_scale: torch.Tensor | float,
    logit_bias: torch.Tensor | float,
) -> torch.Tensor:
    """SigLIP's pairwise sigmoid loss (Zhai et al., arXiv 2303.15343) over ``N`` pairs.

    ``−1/N Σ_i Σ_j log σ(y_ij · (logit_scale · cos(image_i, text_j) + logit_bias))`` with ``y_ii = +1`` and
    ``y_ij = −1`` for ``i ≠ j``: the sum over all ``N²`` pairs divided by the batch size, as in the paper.
    ``logit_scale`` is the exponentiated multiplier (SigLIP's ``logit_scale.exp()``); ``logit_bias`` is added as is.
    """
    _check_pair(image_embeds, text_embeds, "sigmoid_contrastive_loss", same_rows=True)
    _check_scale(logit_scale, "sigmoid_contrastive_loss")
    zv, zt = F.normalize(image_embeds, dim=-1), F.normalize(text_embeds, dim=-1)
    logits = logit_scale * (zv @ zt.T) + logit_bias
    n = logits.shape[0]
    labels = 2.0 * torch.eye(n, device=logits.device, dtype=logits.dtype) - 1.0
    return -F.logsigmoid(labels * logits).sum() / n


# ============================================================================================ the MDM objective
@dataclass
class MDMLossOutput:
    """The total loss and its three **unweighted** terms (a skipped term, weight 0, is a zero tensor)."""

    loss: torch.Tensor
    contrastive: torch.Tensor
    agreement: torch.Tensor
    discrepancy: torch.Tensor


class MDMLoss(torch.nn.Module):
    """``L = λ_nce · InfoNCE_sym(S) + λ_agr · GKE(U_R, U_S) + λ_dis · GKE(G_R, G_S)`` (docs/method.md §3).

    Args:
        lambda_contrastive, lambda_agreement, lambda_discrepancy: the weights (≥ 0; a zero weight skips the term
            and its computation; at least one must be positive).
        sigma: bandwidth of the geodesic Gaussian kernel, in radians.
        temperature: for ``contrastive="clip"``, the InfoNCE temperature τ (multiplier ``1 / τ``); ``None`` uses the
            teacher's exponentiated ``logit_scale`` passed to :meth:`forward`. Ignored for ``"siglip"``, whose
            scale and bias are learned as a pair and always come from the teacher.
        contrastive: ``"clip"`` (softmax InfoNCE) or ``"siglip"`` (pairwise sigmoid).

    The real embeddings and the teacher's scale / bias are treated as constants (detached): only the synthetic
    side receives gradients.
    """

    def __init__(
        self,
        lambda_contrastive: float = 1.0,
        lambda_agreement: float = 0.8,
        lambda_discrepancy: float = 0.8,
        sigma: float = 0.5,
        temperature: float | None = 0.07,
        contrastive: str = "clip",
    ) -> None:
        super().__init__()
        weights = {
            "lambda_contrastive": lambda_contrastive,
            "lambda_agreement": lambda_agreement,
            "lambda_discrepancy": lambda_discrepancy,
        }
        for name, value in weights.items():
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(
                    f"MDMLoss: {name}={value} must be a finite number ≥ 0 (0 switches the term off)."
                )
        if not any(weights.values()):
            raise ValueError(
                "MDMLoss: all three weights are 0, so there is nothing to optimise; set one positive."
            )
        if not (math.isfinite(sigma) and sigma > 0):
            raise ValueError(
                f"MDMLoss: sigma={sigma} must be a positive bandwidth in radians (MDM uses 0.5)."
            )
        if temperature is not None and not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"MDMLoss: temperature={temperature} must be positive (MDM uses 0.07) or None.")
        if contrastive not in CONTRASTIVE_LOSSES:
            raise ValueError(f"MDMLoss: contrastive={contrastive!r}; choose one of {CONTRASTIVE_LOSSES}.")
        self.lambda_contrastive = float(lambda_contrastive)
        self.lambda_agreement = float(lambda_agreement)
        self.lambda_discrepancy = float(lambda_discrepancy)
        self.sigma, self.temperature, self.contrastive = float(sigma), temperature, contrastive

    def extra_repr(self) -> str:
        return (
            f"lambda_contrastive={self.lambda_contrastive}, lambda_agreement={self.lambda_agreement}, "
            f"lambda_discrepancy={self.lambda_discrepancy}, sigma={self.sigma}, temperature={self.temperature}, "
            f"contrastive={self.contrastive!r}"
        )

    def _contrastive(self, syn_zv, syn_zt, logit_scale, logit_bias) -> torch.Tensor:
        if self.contrastive == "siglip":
            if logit_scale is None or logit_bias is None:
                raise ValueError(
                    "MDMLoss(contrastive='siglip') needs the teacher's logit_scale (exponentiated) and logit_bias in "
                    "forward(); for a CLIP-style teacher use contrastive='clip'."
                )
            return sigmoid_contrastive_loss(syn_zv, syn_zt, _const(logit_scale), _const(logit_bias))
        if self.temperature is not None:
            return clip_contrastive_loss(syn_zv, syn_zt, 1.0 / self.temperature)
        if logit_scale is None:
            raise ValueError(
                "MDMLoss(temperature=None) uses the teacher's logit scale: pass logit_scale=<exp of the teacher's "
                "log-scale> to forward(), or set a temperature (e.g. 0.07)."
            )
        return clip_contrastive_loss(syn_zv, syn_zt, _const(logit_scale))

    def forward(
        self,
        real_image_embeds: torch.Tensor,
        real_text_embeds: torch.Tensor,
        syn_image_embeds: torch.Tensor,
        syn_text_embeds: torch.Tensor,
        logit_scale: torch.Tensor | float | None = None,
        logit_bias: torch.Tensor | float | None = None,
        contrastive_pairs: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> MDMLossOutput:
        """The MDM loss of a synthetic mini-batch ``[m, d]`` against a real batch ``[n, d]`` (``m``, ``n`` free).

        ``contrastive_pairs``: ``(image_embeds, text_embeds)`` that the contrastive term scores instead of the
        synthetic pairs -- the blended synthetic pairs when only that term is blended (``MDMConfig.blend_terms``,
        :mod:`mdm_hf.blending`); None scores the synthetic pairs themselves.
        """
        _check_pair(real_image_embeds, real_text_embeds, "MDMLoss (real pairs)", same_rows=True)
        _check_pair(syn_image_embeds, syn_text_embeds, "MDMLoss (synthetic pairs)", same_rows=True)
        _check_pair(real_image_embeds, syn_image_embeds, "MDMLoss (real vs synthetic)")
        if contrastive_pairs is not None:
            _check_pair(*contrastive_pairs, "MDMLoss (contrastive pairs)", same_rows=True)
        zero = syn_image_embeds.new_zeros((), dtype=torch.float32)
        contrastive = agreement = discrepancy = zero
        if self.lambda_contrastive > 0:
            pair = contrastive_pairs if contrastive_pairs is not None else (syn_image_embeds, syn_text_embeds)
            contrastive = self._contrastive(*pair, logit_scale, logit_bias)
        if self.lambda_agreement > 0 or self.lambda_discrepancy > 0:
            u_r, g_r = agreement_discrepancy(real_image_embeds.detach(), real_text_embeds.detach())
            u_s, g_s = agreement_discrepancy(syn_image_embeds, syn_text_embeds)
            if self.lambda_agreement > 0:
                agreement = geodesic_kernel_energy(u_r, u_s, self.sigma)
            if self.lambda_discrepancy > 0:
                discrepancy = geodesic_kernel_energy(g_r, g_s, self.sigma)
        loss = (
            self.lambda_contrastive * contrastive
            + self.lambda_agreement * agreement
            + self.lambda_discrepancy * discrepancy
        )
        return MDMLossOutput(loss=loss, contrastive=contrastive, agreement=agreement, discrepancy=discrepancy)
