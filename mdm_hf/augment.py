"""Differentiable, seeded DSA-style augmentation for student training (and siamese use in distillation).

Differentiable Siamese Augmentation (DSA; Zhao & Bilen, ICML 2021, arXiv 2102.08259) is the augmentation the
vision-language distillation papers train their students with (docs/method.md §5: colour, crop, cutout, flip, scale,
rotate). Every op is differentiable in the pixels, so the same module can augment learned synthetic pixels.

Ops, on normalised pixels ``x`` of shape ``[B, C, H, W]`` with per-sample parameters (``u ~ U[0, 1)``):

    color    x + (u - 0.5) * brightness                       brightness shift
             (x - mean_c(x)) * (u * saturation) + mean_c(x)   blend with the channel mean
             (x - mean(x)) * (1 - contrast + 2u * contrast) + mean(x)
    crop     integer translation by up to ``crop`` * size on each axis, zero padding
    flip     horizontal mirror with probability ``flip``
    scale    anisotropic scale s_x, s_y in [1 / scale, scale] about the centre
    rotate   rotation by an angle in [-rotate, rotate] degrees about the centre
    cutout   a ``cutout * H`` x ``cutout * W`` rectangle around a random centre set to 0

Colour ops are DSA's range-agnostic formulas (plain tensor arithmetic, no clamping, so out-of-range learned pixels
keep their gradient); the geometric ops are one kornia ``warp_affine`` (bilinear, zero padding). ``mode="single"``
applies ONE op, drawn per call, to the whole batch (DSA's default ``aug_mode='S'``); ``mode="all"`` applies colour,
then all geometric ops composed into a single warp (one interpolation instead of four), then cutout.

Randomness comes only from the module's own ``torch.Generator`` (seeded), never from the global RNG, so a seed fixes
the whole sequence of augmentations; ``forward(x, seed=s)`` draws from a fresh generator seeded with ``s`` (the same
``s`` for real and synthetic batches gives DSA's siamese augmentation).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

DSA_STRATEGY = "color_crop_cutout_flip_scale_rotate"
OPS = ("color", "crop", "cutout", "flip", "scale", "rotate")
GEOMETRIC_OPS = ("crop", "flip", "scale", "rotate")


@dataclass
class AugmentParams:
    """Per-sample parameters of one call; ``None`` for ops not applied. Shapes are ``[B]`` unless noted."""

    ops: tuple[str, ...]
    brightness: torch.Tensor | None = None  # additive shift
    saturation: torch.Tensor | None = None  # blend factor with the channel mean
    contrast: torch.Tensor | None = None  # blend factor with the image mean
    shift: torch.Tensor | None = None  # [B, 2] integer (dx, dy) in pixels
    flip: torch.Tensor | None = None  # bool
    scale: torch.Tensor | None = None  # [B, 2] (s_x, s_y)
    angle: torch.Tensor | None = None  # degrees
    cutout_center: torch.Tensor | None = None  # [B, 2] integer (cx, cy)


def _parse_strategy(strategy: str | Sequence[str] | None) -> tuple[str, ...]:
    if strategy is None or strategy in ("", "none", "None"):
        return ()
    names = strategy.split("_") if isinstance(strategy, str) else list(strategy)
    unknown = [n for n in names if n not in OPS]
    if unknown:
        raise ValueError(
            f"Unknown augmentation op(s) {unknown} in strategy {strategy!r}. Use ops from {list(OPS)} joined by "
            f"'_' (e.g. '{DSA_STRATEGY}'), or 'none'."
        )
    return tuple(dict.fromkeys(names))  # keep order, drop repeats


class DiffAugment(nn.Module):
    """Seeded differentiable augmentation of normalised pixel batches (see the module docstring for the ops).

    Args:
        strategy: ops joined by ``_`` (default DSA's ``color_crop_cutout_flip_scale_rotate``) or a list; ``"none"``
            makes the module the identity.
        mode: ``"single"``: one op per call for the whole batch (DSA default); ``"all"``: every op each call.
        seed: seed of the module's generator; :meth:`reset` restarts the sequence.
        brightness, saturation, contrast, crop, cutout, flip, scale, rotate: strengths (DSA's defaults).
    """

    def __init__(
        self,
        strategy: str | Sequence[str] | None = DSA_STRATEGY,
        mode: Literal["single", "all"] = "single",
        seed: int = 0,
        brightness: float = 1.0,
        saturation: float = 2.0,
        contrast: float = 0.5,
        crop: float = 0.125,
        cutout: float = 0.5,
        flip: float = 0.5,
        scale: float = 1.2,
        rotate: float = 15.0,
    ) -> None:
        super().__init__()
        if mode not in ("single", "all"):
            raise ValueError(f"mode must be 'single' (one op per batch, DSA default) or 'all', got {mode!r}")
        if scale < 1.0:
            raise ValueError(f"scale must be >= 1 (s is drawn from [1/scale, scale]), got {scale}")
        if not 0.0 <= cutout <= 1.0 or not 0.0 <= flip <= 1.0 or not 0.0 <= crop < 1.0:
            raise ValueError(
                f"cutout and flip must lie in [0, 1] and crop in [0, 1); got {cutout}, {flip}, {crop}"
            )
        self.ops = _parse_strategy(strategy)
        self.mode = mode
        self.strengths = dict(
            brightness=brightness,
            saturation=saturation,
            contrast=contrast,
            crop=crop,
            cutout=cutout,
            flip=flip,
            scale=scale,
            rotate=rotate,
        )
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)

    def extra_repr(self) -> str:
        return f"ops={list(self.ops)}, mode={self.mode!r}, seed={self.seed}"

    def reset(self, seed: int | None = None) -> None:
        """Restart the random sequence (from ``seed``, default the constructor's)."""
        self.seed = self.seed if seed is None else seed
        self.generator.manual_seed(self.seed)

    # ------------------------------------------------------------------ parameters
    def sample_params(
        self, batch: int, height: int, width: int, generator: torch.Generator | None = None
    ) -> AugmentParams:
        """Draw the parameters of one call (on CPU) from ``generator`` (default: the module's own)."""
        g = self.generator if generator is None else generator
        s = self.strengths
        if not self.ops:
            return AugmentParams(ops=())
        if self.mode == "single":
            ops = (self.ops[int(torch.randint(len(self.ops), (1,), generator=g))],)
        else:
            ops = self.ops

        def u(*shape: int) -> torch.Tensor:
            return torch.rand(*shape, generator=g)

        p = AugmentParams(ops=ops)
        if "color" in ops:
            p.brightness = (u(batch) - 0.5) * s["brightness"]
            p.saturation = u(batch) * s["saturation"]
            p.contrast = 1.0 - s["contrast"] + 2.0 * s["contrast"] * u(batch)
        if "crop" in ops:
            limit = torch.tensor([int(s["crop"] * width + 0.5), int(s["crop"] * height + 0.5)])
            p.shift = torch.floor(u(batch, 2) * (2 * limit + 1)).long() - limit  # integers in [-limit, limit]
        if "flip" in ops:
            p.flip = u(batch) < s["flip"]
        if "scale" in ops:
            lo = 1.0 / s["scale"]
            p.scale = lo + (s["scale"] - lo) * u(batch, 2)
        if "rotate" in ops:
            p.angle = (2.0 * u(batch) - 1.0) * s["rotate"]
        if "cutout" in ops:
            size = torch.tensor([width, height])
            p.cutout_center = torch.floor(u(batch, 2) * size).long()
        return p

    # ------------------------------------------------------------------ application
    def apply(self, x: torch.Tensor, params: AugmentParams) -> torch.Tensor:
        """Apply given parameters to ``x`` ``[B, C, H, W]`` (differentiable in ``x``)."""
        if not params.ops:
            return x
        if "color" in params.ops:
            x = apply_color(x, params.brightness, params.saturation, params.contrast)
        if any(op in params.ops for op in GEOMETRIC_OPS):
            x = apply_affine(x, affine_matrices(params, x.shape[-2], x.shape[-1]))
        if "cutout" in params.ops:
            x = apply_cutout(x, params.cutout_center, self.strengths["cutout"])
        return x

    def forward(self, x: torch.Tensor, seed: int | None = None) -> torch.Tensor:
        """Augment a batch. ``seed``: draw this call's parameters from a fresh generator seeded with it."""
        if x.dim() != 4:
            raise ValueError(f"DiffAugment expects pixels [B, C, H, W], got shape {tuple(x.shape)}")
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        return self.apply(x, self.sample_params(x.shape[0], x.shape[-2], x.shape[-1], g))


def _per_sample(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.to(device=x.device, dtype=x.dtype).view(-1, 1, 1, 1)


def apply_color(
    x: torch.Tensor, brightness: torch.Tensor, saturation: torch.Tensor, contrast: torch.Tensor
) -> torch.Tensor:
    """DSA colour: brightness shift, saturation (blend with channel mean), contrast (blend with image mean)."""
    x = x + _per_sample(brightness, x)
    channel_mean = x.mean(dim=1, keepdim=True)
    x = (x - channel_mean) * _per_sample(saturation, x) + channel_mean
    image_mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - image_mean) * _per_sample(contrast, x) + image_mean


def affine_matrices(params: AugmentParams, height: int, width: int) -> torch.Tensor:
    """The forward pixel-coordinate transforms ``[B, 3, 3]`` (src -> dst) composed as shift . flip . scale . rotate.

    Rotation and scale act about the image centre ((W-1)/2, (H-1)/2), the flip is ``x -> W - 1 - x`` and the shift
    adds integer pixels, so flip and crop alone sample exactly on the pixel grid.
    """
    from kornia.geometry.transform import get_rotation_matrix2d

    batch = next(len(v) for v in (params.shift, params.flip, params.scale, params.angle) if v is not None)
    eye = torch.eye(3).repeat(batch, 1, 1)
    m = eye.clone()
    center = torch.tensor([(width - 1) / 2.0, (height - 1) / 2.0]).repeat(batch, 1)
    if params.angle is not None or params.scale is not None:
        angle = params.angle if params.angle is not None else torch.zeros(batch)
        scale = params.scale if params.scale is not None else torch.ones(batch, 2)
        rot = eye.clone()
        rot[:, :2, :] = get_rotation_matrix2d(center, angle.float(), scale.float())
        m = rot @ m
    if params.flip is not None:
        flip = eye.clone()
        flip[params.flip, 0, 0] = -1.0
        flip[params.flip, 0, 2] = width - 1.0
        m = flip @ m
    if params.shift is not None:
        shift = eye.clone()
        shift[:, :2, 2] = params.shift.float()
        m = shift @ m
    return m


def apply_affine(x: torch.Tensor, matrices: torch.Tensor) -> torch.Tensor:
    """Warp ``x`` with forward transforms ``[B, 3, 3]`` (kornia ``warp_affine``, bilinear, zero padding)."""
    from kornia.geometry.transform import warp_affine

    m = matrices[:, :2, :].to(device=x.device, dtype=x.dtype)
    return warp_affine(x, m, dsize=(x.shape[-2], x.shape[-1]), mode="bilinear", padding_mode="zeros")


def apply_cutout(x: torch.Tensor, centers: torch.Tensor, ratio: float) -> torch.Tensor:
    """Zero a ``round(ratio*H)`` x ``round(ratio*W)`` rectangle starting half its size before each centre (clipped
    at the borders); a mask multiply, so gradients flow to the kept pixels."""
    height, width = x.shape[-2:]
    h, w = int(ratio * height + 0.5), int(ratio * width + 0.5)
    cols = torch.arange(width).view(1, 1, width)
    rows = torch.arange(height).view(1, height, 1)
    x0, y0 = (centers[:, 0] - w // 2).view(-1, 1, 1), (centers[:, 1] - h // 2).view(-1, 1, 1)
    inside = (cols >= x0) & (cols < x0 + w) & (rows >= y0) & (rows < y0 + h)
    mask = (~inside).to(device=x.device, dtype=x.dtype).unsqueeze(1)
    return x * mask
