"""Keeping the synthetic set where real data lives, and measuring how far it strays.

A student's freshly initialised text projection trains on the learned features ``e~`` and then meets only real
caption features at test time; its image tower meets only valid images. Unconstrained, MDM's updates (§4 of
docs/method.md, learning rate 100) drift far from both: on EmojiCaps at K = 100 the learned features' norms
doubled (13.7 ± 3.3 against 7.3 ± 0.7 for real MiniLM features), their cosine to the feature they started from fell
to 0.60, and 19 % of the learned pixel values left the valid RGB range -- and the gain on validation did not carry
over to a held-out art style. :class:`SupportProjection` projects the set back after every step (a projected
gradient step): each feature keeps its norm (only its direction is learned) and pixels stay in the box that
de-normalises to [0, 1]. :func:`drift_statistics` reports the distances for any set.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F

TextNorm = Literal["initial", "real_mean", "free"]
PixelRange = Literal["clamp", "free"]
TEXT_NORMS: tuple[str, ...] = get_args(TextNorm)
PIXEL_RANGES: tuple[str, ...] = get_args(PixelRange)


def valid_pixel_box(
    image_mean: Sequence[float], image_std: Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(low, high)`` of shape ``[1, 3, 1, 1]``: normalised pixels that de-normalise to [0, 1] per channel."""
    mean = torch.tensor([float(m) for m in image_mean]).view(1, -1, 1, 1)
    std = torch.tensor([float(s) for s in image_std]).view(1, -1, 1, 1)
    return (0.0 - mean) / std, (1.0 - mean) / std


@dataclass
class SupportProjection:
    """The projection applied after every optimiser step.

    Attributes:
        text_norms: ``[K]`` norm each learned feature is rescaled to (None: features move freely).
        pixel_low / pixel_high: ``[1, 3, 1, 1]`` valid box the pixels are clamped to (None: unbounded).
    """

    text_norms: torch.Tensor | None = None
    pixel_low: torch.Tensor | None = None
    pixel_high: torch.Tensor | None = None

    @classmethod
    def build(
        cls,
        text_norm: str,
        pixel_range: str,
        initial_text: torch.Tensor,
        real_text: torch.Tensor,
        image_mean: Sequence[float],
        image_std: Sequence[float],
    ) -> SupportProjection:
        """``text_norm``: ``free`` | ``initial`` (each feature keeps the norm of the real feature it started from) |
        ``real_mean`` (every feature gets the mean real norm); ``pixel_range``: ``free`` | ``clamp``."""
        if text_norm not in TEXT_NORMS or pixel_range not in PIXEL_RANGES:
            raise ValueError(f"text_norm must be one of {TEXT_NORMS} and pixel_range one of {PIXEL_RANGES}.")
        norms = None
        if text_norm == "initial":
            norms = initial_text.float().norm(dim=-1)
        elif text_norm == "real_mean":
            norms = real_text.float().norm(dim=-1).mean().expand(len(initial_text)).clone()
        low = high = None
        if pixel_range == "clamp":
            low, high = valid_pixel_box(image_mean, image_std)
        return cls(norms, low, high)

    @torch.no_grad()
    def __call__(self, pixels: torch.Tensor, text: torch.Tensor) -> None:
        """Project ``pixels`` ``[K, 3, H, W]`` and ``text`` ``[K, D]`` in place."""
        if self.text_norms is not None:
            scale = self.text_norms.to(text) / text.norm(dim=-1).clamp_min(1e-12)
            text.mul_(scale.unsqueeze(-1))
        if self.pixel_low is not None:
            pixels.copy_(
                torch.maximum(torch.minimum(pixels, self.pixel_high.to(pixels)), self.pixel_low.to(pixels))
            )


def drift_statistics(
    pixels: torch.Tensor,
    text: torch.Tensor,
    initial_text: torch.Tensor,
    real_text: torch.Tensor,
    image_mean: Sequence[float],
    image_std: Sequence[float],
) -> dict[str, float]:
    """How far a synthetic set is from real data: learned vs real text-feature norms, the cosine of each learned
    feature to the one it started from, its movement relative to its own initial norm, the per-dimension spread of
    learned vs real features (RMS of the per-dimension std), and the fraction of pixel values outside the valid
    range."""
    text, initial_text, real_text = text.float(), initial_text.float(), real_text.float()
    norms, real_norms = text.norm(dim=-1), real_text.norm(dim=-1)
    cosine = F.cosine_similarity(text, initial_text, dim=-1)
    moved = (text - initial_text).norm(dim=-1) / initial_text.norm(dim=-1).clamp_min(1e-12)
    low, high = valid_pixel_box(image_mean, image_std)
    outside = ((pixels < low - 1e-6) | (pixels > high + 1e-6)).float().mean()
    spread = text.std(dim=0).pow(2).mean().sqrt() / real_text.std(dim=0).pow(2).mean().sqrt().clamp_min(1e-12)
    return {
        "text_norm_mean": float(norms.mean()), "text_norm_std": float(norms.std()) if len(norms) > 1 else 0.0,
        "real_text_norm_mean": float(real_norms.mean()), "real_text_norm_std": float(real_norms.std()),
        "cosine_to_start_mean": float(cosine.mean()), "cosine_to_start_min": float(cosine.min()),
        "relative_movement_mean": float(moved.mean()), "spread_ratio": float(spread),
        "pixels_outside_fraction": float(outside),
    }  # fmt: skip
