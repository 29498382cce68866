"""The two losses of trajectory matching and LoRS' learned similarity targets.

* :func:`soft_contrastive_loss` -- the *inner* loss ``ℓ(θ; B)`` the student's SGD steps descend: a contrastive
  loss of a synthetic mini-batch against a target matrix (the identity for MTT-VL, LoRS' learned ``S[B, B]``);
* :func:`normalized_parameter_distance` -- the *outer* (matching) loss, MTT's normalised distance between the
  student's end point and the expert's (arXiv 2203.11932, eq. 2), per branch as in MTT-VL / LoRS;
* :class:`LowRankSimilarity` / :class:`FullSimilarity` -- LoRS' similarity matrix (arXiv 2406.03793, §4).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FullSimilarity", "LowRankSimilarity", "normalized_parameter_distance", "soft_contrastive_loss"]


def soft_contrastive_loss(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    targets: torch.Tensor,
    logit_scale: torch.Tensor | float,
    kind: str = "infonce",
) -> torch.Tensor:
    """Contrastive loss of ``n`` pairs against a (learned) target matrix ``T`` ``[n, n]`` (LoRS, arXiv 2406.03793).

    ``logits = logit_scale · cos(image_i, text_j)`` (rows normalised inside; ``logit_scale`` already exponentiated).

    * ``"infonce"``: ``½ (−1/n Σ_i Σ_j T_ij log softmax_j(logits_i) − 1/n Σ_j Σ_i T_ij log softmax_i(logits_·j))``;
      with ``T = I`` this is the symmetric CLIP loss.
    * ``"wbce"``: element-wise BCE of ``σ(logits)`` against ``T``, averaged separately over the positives
      (``T > 0.5``) and the negatives and then halved, so the ``n`` positives weigh as much as the ``n² − n``
      negatives. (LoRS writes ``log(p + 1e-6)``; ``logsigmoid`` is the same without the clamp.)
    """
    if targets.shape != (image_embeds.shape[0], text_embeds.shape[0]):
        raise ValueError(
            f"targets must be [{image_embeds.shape[0]}, {text_embeds.shape[0]}] (one per image-text pair), got "
            f"{tuple(targets.shape)}."
        )
    zv, zt = F.normalize(image_embeds, dim=-1), F.normalize(text_embeds, dim=-1)
    logits = logit_scale * (zv @ zt.T)
    targets = targets.to(logits.dtype)
    if kind == "infonce":
        image_to_text = -(targets * F.log_softmax(logits, dim=1)).sum(1).mean()
        text_to_image = -(targets.T * F.log_softmax(logits.T, dim=1)).sum(1).mean()
        return 0.5 * (image_to_text + text_to_image)
    if kind == "wbce":
        per_entry = -(targets * F.logsigmoid(logits) + (1 - targets) * F.logsigmoid(-logits))
        positive = (targets > 0.5).detach()
        zeros = torch.zeros_like(per_entry)
        pos = torch.where(positive, per_entry, zeros).sum() / positive.sum().clamp_min(1)
        neg = torch.where(~positive, per_entry, zeros).sum() / (~positive).sum().clamp_min(1)
        return 0.5 * (pos + neg)
    raise ValueError(f"kind must be 'infonce' or 'wbce', got {kind!r}.")


def normalized_parameter_distance(
    student_end: Mapping[str, torch.Tensor],
    expert_start: Mapping[str, torch.Tensor],
    expert_target: Mapping[str, torch.Tensor],
    groups: Mapping[str, Sequence[str]] | None = None,
    merge_groups: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """MTT's loss ``||θ_N − θ*_{s+M}||² / ||θ*_s − θ*_{s+M}||²`` (arXiv 2203.11932, eq. 2), per group of tensors.

    Args:
        student_end / expert_start / expert_target: tensors by parameter name (the same names in all three).
        groups: ``{group: [names]}`` (LoRS' image / text branches); ``None``: one group of every name.
        merge_groups: ``Σ_g num_g / Σ_g den_g`` instead of ``Σ_g num_g / den_g``.

    Returns:
        ``(loss, {group: num_g / den_g})``. A group whose start equals its target (``den = 0``) raises a
        ``ValueError``: the normalisation is undefined there.
    """
    groups = {"all": list(student_end)} if groups is None else groups
    nums, dens = {}, {}
    for group, names in groups.items():
        if not names:
            continue
        nums[group] = sum(((student_end[n] - expert_target[n]) ** 2).sum() for n in names)
        dens[group] = sum(((expert_start[n] - expert_target[n]) ** 2).sum() for n in names).detach()
        if float(dens[group]) == 0.0:
            raise ValueError(
                f"The expert's start and target checkpoints are identical in the '{group}' parameters, so the "
                "normalised distance is undefined. Use a trajectory whose epochs differ (a higher learning rate, or "
                "larger expert_epochs)."
            )
    parts = {g: nums[g] / dens[g] for g in nums}
    loss = sum(nums.values()) / sum(dens.values()) if merge_groups else sum(parts.values())
    return loss, {g: p.detach() for g, p in parts.items()}


class LowRankSimilarity(nn.Module):
    """LoRS' similarity matrix ``S = diag(a) + (alpha / r) · L Rᵀ`` over ``K`` pairs (arXiv 2406.03793, §4).

    ``a = 1``, ``L ~ N(0, 1)``, ``R = 0`` at the start, so ``S = I``. ``forward(idx)`` is ``S[idx][:, idx]``,
    computed from the indexed factors (``O(b·r)`` per mini-batch, no ``K × K`` matrix).
    """

    def __init__(
        self, num_pairs: int, rank: int, alpha: float, generator: torch.Generator | None = None
    ) -> None:
        super().__init__()
        self.rank, self.alpha = int(rank), float(alpha)
        self.diag = nn.Parameter(torch.ones(num_pairs))
        self.left = nn.Parameter(torch.randn(num_pairs, rank, generator=generator))
        self.right = nn.Parameter(torch.zeros(num_pairs, rank))

    def forward(self, indices: torch.Tensor | None = None) -> torch.Tensor:
        a, left, right = self.diag, self.left, self.right
        if indices is not None:
            a, left, right = a[indices], left[indices], right[indices]
        return torch.diag(a) + (self.alpha / self.rank) * left @ right.T


class FullSimilarity(nn.Module):
    """A free ``K × K`` similarity matrix, initialised to the identity (LoRS' ``sim_type="full"``)."""

    def __init__(self, num_pairs: int) -> None:
        super().__init__()
        self.matrix = nn.Parameter(torch.eye(num_pairs))

    def forward(self, indices: torch.Tensor | None = None) -> torch.Tensor:
        return self.matrix if indices is None else self.matrix[indices][:, indices]
