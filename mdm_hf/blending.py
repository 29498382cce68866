"""Representation blending of paired features (RepBlend, NeurIPS 2025; docs/method.md §7).

One draw -- ``λ ~ Beta(α, α)`` and a permutation ``π`` of the mini-batch -- mixes every tensor of a batch of pairs
the same way, ``x' = λ x + (1 − λ) x[π]``, so the blended image feature of row ``i`` still belongs with the blended
text feature of row ``i``: the blended pair is its own positive. Used by MDM's optional blending of the synthetic
mini-batch (``MDMConfig.blend_alpha``) and by the trajectory-matching baseline's RepBlend preset
(:mod:`mdm_hf.baselines.tm.blending`).
"""

from __future__ import annotations

import math

import numpy as np
import torch


def draw_blend(batch_size: int, alpha: float, generator: torch.Generator) -> tuple[float, torch.Tensor]:
    """``(λ, π)``: ``λ ~ Beta(alpha, alpha)`` and a permutation of ``range(batch_size)`` (CPU), both from
    ``generator``, so a run that restores the generator's state (a resumed distillation) redraws them exactly.

    ``torch.distributions.Beta`` cannot take a generator, so one integer drawn from ``generator`` seeds NumPy's
    Beta sampler; the permutation is drawn after it.
    """
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(
            f"draw_blend: batch_size={batch_size!r} must be a positive integer (the pairs to blend)."
        )
    if not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(
            f"draw_blend: alpha={alpha!r} must be a positive finite Beta(α, α) parameter (RepBlend uses 1)."
        )
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    lam = float(np.random.default_rng(seed).beta(alpha, alpha))
    return lam, torch.randperm(batch_size, generator=generator)


def blend(tensors: tuple[torch.Tensor, ...] | list[torch.Tensor], lam: float, perm: torch.Tensor) -> tuple:
    """``λ t + (1 − λ) t[π]`` for every ``t`` in ``tensors`` (one draw for all: row ``i`` stays one pair).

    Gradients flow into every row that takes part (row ``i`` with weight ``λ``, row ``π(i)`` with ``1 − λ``).
    """
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"blend: lam={lam!r} must lie in [0, 1] (a Beta draw).")
    n = perm.shape[0]
    for t in tensors:
        if t.ndim == 0 or t.shape[0] != n:
            raise ValueError(
                f"blend: a tensor of shape {tuple(t.shape)} does not have {n} rows, the permutation's length; "
                "blend the rows of one mini-batch of pairs with a draw of its size."
            )
    return tuple(lam * t + (1.0 - lam) * t[perm.to(t.device)] for t in tensors)
