"""RepBlend's representation blending (Zhang et al., "Beyond Modality Collapse: Representations Blending for
Multimodal Dataset Distillation", NeurIPS 2025; ``docs/method.md`` §7).

In every unrolled SGD step the (image feature, text feature) pairs of the synthetic mini-batch -- the image
encoder's output and the text embedding, both *before* the projections -- are mixed with one permutation ``π`` and
one ``λ ~ Beta(α, α)``::

    x' = λ x + (1 − λ) x[π]        y' = λ y + (1 − λ) y[π]

so the projections are trained on blends of pairs rather than on the pairs alone (the paper's remedy for modality
collapse). The draw belongs to the mini-batch: :class:`SyntheticMiniBatch` carries it, and both passes of the
constant-memory unrolling (:mod:`.unroll`, TESLA) receive the same object, so the recomputed step blends exactly as
the first pass did. The targets (identity or LoRS' ``S[B, B]``) are not blended: pair ``i``'s blended image still
belongs to its blended text, as in RepBlend's released code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...blending import blend as blend_pairs
from ...blending import draw_blend as draw_pair_blend
from ...models import DualEncoder

__all__ = ["Blend", "BlendedDualEncoder", "SyntheticMiniBatch", "draw_blend"]


@dataclass(frozen=True)
class Blend:
    """One draw of the blending: ``λ`` and the permutation ``π`` of a mini-batch's positions."""

    lam: float
    permutation: torch.Tensor

    def __call__(
        self, image_features: torch.Tensor, text_features: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(λ x + (1 − λ) x[π], λ y + (1 − λ) y[π])`` for image features ``x`` and text features ``y``."""
        return blend_pairs((image_features, text_features), self.lam, self.permutation)


def draw_blend(batch_size: int, alpha: float, generator: torch.Generator) -> Blend | None:
    """:func:`mdm_hf.blending.draw_blend` as a :class:`Blend` (the same draw from ``generator``, so a resumed run
    draws the same blends); ``None`` when ``alpha == 0`` (no blending, and nothing drawn)."""
    if alpha == 0:
        return None
    if alpha < 0:
        raise ValueError(f"blend_alpha must be >= 0 (0: no blending), got {alpha}.")
    return Blend(*draw_pair_blend(batch_size, alpha, generator))


@dataclass(frozen=True)
class SyntheticMiniBatch:
    """The synthetic pairs of one inner SGD step (indices into the set) and the blend drawn with them (None: none).

    The unrolling hands this one object to every pass over the step, which is what replays the blend."""

    indices: torch.Tensor
    blend: Blend | None = None

    def __len__(self) -> int:
        return len(self.indices)


class BlendedDualEncoder(nn.Module):
    """The teacher's forward with a blend between the image encoder and the projections: ``E_v(x)`` and ``e``,
    blended when a :class:`Blend` is given, then ``normalize(P_v(·))`` and ``normalize(P_t(·))``. Without a blend it
    is :meth:`DualEncoder.forward <mdm_hf.models.DualEncoder.forward>`.

    The distiller evaluates it with ``torch.func.functional_call`` (parameters ``encoder.model.<name>``): tensors not
    replaced -- the frozen vision tower of projection-only trajectories -- are the teacher's own, and the gradient
    to the synthetic pixels flows through them.
    """

    def __init__(self, encoder: DualEncoder) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(
        self, pixel_values: torch.Tensor, text_features: torch.Tensor, blend: Blend | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        image_features = self.encoder.image_features(pixel_values)
        if blend is not None:
            image_features, text_features = blend(image_features, text_features)
        return self.encoder.project_image(image_features), self.encoder.project_text(text_features)
