"""MDM's model level: the mixed teacher, by Model Stock interpolation of expert checkpoints (docs/method.md §2).

Per distillation iteration MDM (arXiv 2605.23482) draws ``k`` expert checkpoints -- fine-tunes of one anchor
``w0`` -- and merges them tensor by tensor with Model Stock (Jang et al., ECCV 2024, arXiv 2403.19522)::

    d_i       = w_i[l] − w0[l]                                    (flattened offset of expert i)
    cos       = mean_{i<j} <d_i, d_j> / (|d_i| |d_j|)             (each pair clamped to [−1, 1]; 0 if a d is 0)
    t         = k·cos / (1 + (k − 1)·cos)                         (cos clamped to [0, 1] first, see below)
    merged[l] = w0[l] + alpha · t · (mean_i w_i[l] − w0[l])

``alpha = 1`` is Model Stock's ``w_H = t·w_avg + (1 − t)·w0``; MDM's reference script uses ``alpha = 0.5``.
``method="mean"`` fixes ``t = 1`` (``merged = w0 + alpha · (mean_i w_i − w0)``; with ``alpha = 1`` the plain average
of the experts' weights): the paper's "weighted sum" teacher ablation (docs/method.md §2).

Negative cosines: the mean pairwise cosine of ``k`` unit vectors is ≥ −1/(k − 1), where the ratio's denominator
vanishes; Model Stock's geometry (experts on a sphere around a common centre) only covers ``cos ≥ 0``, and for
``cos < 0`` the formula gives ``t < 0``, diverging as the offsets cancel. :func:`model_stock_ratio` therefore clamps
the cosine to ``[0, 1]``: anti-correlated offsets share no direction, and the layer keeps the anchor (``t = 0``).

LoRA experts: the offset of an adapted layer is ``ΔW = scale · B · A`` (:class:`LowRankDelta`). Angles are taken on
``ΔW`` -- never on ``A`` or ``B``, whose factorisation is not unique -- using Frobenius inner products computed
from the factors (``<s₁B₁A₁, s₂B₂A₂> = s₁s₂ Σ (B₁ᵀB₂) ⊙ (A₁A₂ᵀ)``), so no dense ``ΔW`` per expert is built; the
merged tensor needs one matmul of rank ``k·r``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Union

import torch

__all__ = [
    "MERGE_METHODS",
    "Delta",
    "ExpertBank",
    "LowRankDelta",
    "merge_deltas",
    "model_stock_merge",
    "model_stock_ratio",
]

# model_stock: MDM's mix (docs/method.md §2); mean: t = 1, the paper's "weighted sum" ablation.
MERGE_METHODS = ("model_stock", "mean")


@dataclass(frozen=True, eq=False)
class LowRankDelta:
    """A LoRA offset ``ΔW = scale · lora_B @ lora_A`` (``lora_A`` [r, in], ``lora_B`` [out, r], ``scale = alpha / r``)."""

    lora_A: torch.Tensor
    lora_B: torch.Tensor
    scale: float

    def __post_init__(self) -> None:
        a, b = self.lora_A, self.lora_B
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(
                f"LowRankDelta: need lora_A [r, in] and lora_B [out, r] with the same r; got A {tuple(a.shape)}, "
                f"B {tuple(b.shape)}."
            )
        if not math.isfinite(self.scale):
            raise ValueError(f"LowRankDelta: scale={self.scale} must be finite (lora_alpha / r).")

    @property
    def shape(self) -> torch.Size:
        """Shape of ``ΔW``: ``(out, in)``."""
        return torch.Size((self.lora_B.shape[0], self.lora_A.shape[1]))

    def dense(self) -> torch.Tensor:
        """``ΔW = scale · B @ A`` as a dense [out, in] tensor."""
        return self.scale * (self.lora_B @ self.lora_A)

    def to(self, *args, **kwargs) -> LowRankDelta:
        """A copy with both factors moved / cast like ``Tensor.to``."""
        return LowRankDelta(self.lora_A.to(*args, **kwargs), self.lora_B.to(*args, **kwargs), self.scale)


Delta = Union[torch.Tensor, LowRankDelta]


def model_stock_ratio(cos: torch.Tensor | float, k: int) -> torch.Tensor | float:
    """Model Stock's interpolation ratio ``t = k·cos / (1 + (k − 1)·cos)``, with ``cos`` clamped to ``[0, 1]``.

    ``t`` runs from 0 (orthogonal offsets: keep the anchor) to 1 (identical directions: take the average).
    """
    if k < 2:
        raise ValueError(f"model_stock_ratio: k={k}; Model Stock mixes at least 2 experts.")
    if isinstance(cos, torch.Tensor):
        c = cos.clamp(0.0, 1.0)
    else:
        c = min(max(float(cos), 0.0), 1.0)
    return k * c / (1 + (k - 1) * c)


# ============================================================================================ one tensor
def _inner(x: Delta | None, y: Delta | None) -> torch.Tensor | None:
    """Frobenius inner product ``<x, y>`` of two offsets (``None`` is a zero offset)."""
    if x is None or y is None:
        return None
    if isinstance(x, LowRankDelta) and isinstance(y, LowRankDelta):
        return x.scale * y.scale * ((x.lora_B.T @ y.lora_B) * (x.lora_A @ y.lora_A.T)).sum()
    if isinstance(x, LowRankDelta):
        x, y = y, x
    if isinstance(y, LowRankDelta):  # <D, sBA> = s Σ A ⊙ (Bᵀ D)
        return y.scale * (y.lora_A * (y.lora_B.T @ x)).sum()
    return torch.dot(x.reshape(-1), y.reshape(-1))


def _mean_pair_cosine(offsets: list[Delta | None], w0: torch.Tensor) -> torch.Tensor:
    """Mean pairwise cosine of ``k ≥ 2`` offsets of one tensor (each pair's cosine clamped to [-1, 1] against
    rounding), a 0-d tensor in ``w0``'s compute dtype. A zero offset has no direction: its pairs count as
    orthogonal (cos 0)."""
    dtype = torch.float64 if w0.dtype == torch.float64 else torch.float32
    zero = torch.zeros((), dtype=dtype, device=w0.device)
    norms = [zero if d is None else _inner(d, d).clamp_min(0).sqrt() for d in offsets]
    pair_cos = []
    for i, j in itertools.combinations(range(len(offsets)), 2):
        dot, denom = _inner(offsets[i], offsets[j]), norms[i] * norms[j]
        safe = None if dot is None else dot / denom.clamp_min(torch.finfo(dtype).tiny)
        pair_cos.append(zero if dot is None else torch.where(denom > 0, safe, zero))
    return torch.stack(pair_cos).clamp(-1.0, 1.0).mean()


def _stock_one(
    w0: torch.Tensor, offsets: list[Delta | None], alpha: float, method: str = "model_stock"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge one tensor from its anchor and ``k`` offsets (already in the compute dtype/device). Returns (merged, t);
    ``method="mean"`` takes ``t = 1``."""
    k = len(offsets)
    dtype = torch.float64 if w0.dtype == torch.float64 else torch.float32
    cos = _mean_pair_cosine(offsets, w0)
    t = (
        model_stock_ratio(cos, k)
        if method == "model_stock"
        else torch.ones((), dtype=dtype, device=w0.device)
    )
    dense = [d for d in offsets if isinstance(d, torch.Tensor)]
    low = [d for d in offsets if isinstance(d, LowRankDelta)]
    # Σ_i d_i in as few full-size passes as possible: Σ s_i B_i A_i is one matmul of rank Σ r_i.
    total = (
        torch.cat([d.scale * d.lora_B for d in low], 1) @ torch.cat([d.lora_A for d in low], 0)
        if low
        else None
    )
    for d in dense:
        total = d.reshape(w0.shape).clone() if total is None else total.add_(d.reshape(w0.shape))
    if total is None:
        total = torch.zeros(w0.shape, dtype=dtype, device=w0.device)
    merged = total.mul_(alpha * t / k).add_(w0.to(dtype))
    return merged.to(w0.dtype), t


def _cast(d: Delta, w0: torch.Tensor) -> Delta:
    dtype = torch.float64 if w0.dtype == torch.float64 else torch.float32
    return d.to(device=w0.device, dtype=dtype)


def _check_k_alpha(k: int, alpha: float, what: str, method: str = "model_stock") -> None:
    if method not in MERGE_METHODS:
        raise ValueError(f"{what}: merge method {method!r}; choose one of {', '.join(MERGE_METHODS)}.")
    if k < 2:
        raise ValueError(
            f"{what}: got {k} expert(s); Model Stock mixes k ≥ 2 (the same expert at two epochs is allowed). "
            "A single expert is not a mix: install it directly."
        )
    if not math.isfinite(alpha):
        raise ValueError(
            f"{what}: alpha={alpha} must be finite (1.0 = Model Stock, 0.5 = MDM's reference run)."
        )


# ============================================================================================ state dicts
def model_stock_merge(
    anchor: Mapping[str, torch.Tensor],
    experts: Sequence[Mapping[str, torch.Tensor]],
    alpha: float = 1.0,
    allow_shape_mismatch: bool = False,
) -> dict[str, torch.Tensor]:
    """Model Stock merge of full state dicts (formula in the module docstring); a dict with the anchor's keys.

    Non-float tensors (e.g. an integer ``position_ids`` buffer) and tensors no expert changed keep ``w0``; those are
    returned as the anchor's own tensor objects, not copies. Computed in float32 (float64 for float64 anchors) and
    returned in the anchor's dtype and device.

    Raises:
        ValueError: fewer than 2 experts; a key of the anchor missing from an expert (or an expert key the anchor
            lacks); a shape mismatch, unless ``allow_shape_mismatch`` (then that tensor keeps ``w0``).
    """
    _check_k_alpha(len(experts), alpha, "model_stock_merge")
    for i, expert in enumerate(experts):
        missing = [key for key in anchor if key not in expert]
        extra = [key for key in expert if key not in anchor]
        if missing or extra:
            problem = (
                f"lacks anchor key '{missing[0]}'" if missing else f"has key '{extra[0]}' the anchor lacks"
            )
            raise ValueError(
                f"model_stock_merge: expert {i} {problem} ({len(missing)} missing, {len(extra)} extra). Experts must "
                "be state dicts of the anchor's architecture with the same key names (check 'module.' / peft prefixes)."
            )
    merged: dict[str, torch.Tensor] = {}
    for key, w0 in anchor.items():
        ws = [expert[key] for expert in experts]
        bad = [tuple(w.shape) for w in ws if w.shape != w0.shape]
        if bad:
            if not allow_shape_mismatch:
                raise ValueError(
                    f"model_stock_merge: tensor '{key}' has shape {bad[0]} in an expert but {tuple(w0.shape)} in the "
                    "anchor. Pass allow_shape_mismatch=True to keep the anchor's tensor there."
                )
            merged[key] = w0
            continue
        if not w0.is_floating_point():
            merged[key] = w0
            continue
        offsets = [_cast(w, w0) - _cast(w0, w0) for w in ws]
        if not any(bool(d.any()) for d in offsets):  # untouched layer
            merged[key] = w0
            continue
        merged[key] = _stock_one(w0, offsets, alpha)[0]
    return merged


def merge_deltas(
    anchor: Mapping[str, torch.Tensor],
    deltas: Sequence[Mapping[str, Delta]],
    alpha: float = 1.0,
    method: str = "model_stock",
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Model Stock merge on anchor-relative offsets: the fast path (only offset keys are touched).
    ``method="mean"`` averages the offsets instead (``t = 1``, :data:`MERGE_METHODS`).

    ``deltas[i]`` maps parameter names to expert ``i``'s offset ``w_i − w0``: a dense tensor or a
    :class:`LowRankDelta`. A key absent from one expert's dict is a zero offset for that expert. Returns the merged
    tensors of every key present in any delta dict (anchor dtype and device) and the per-tensor ratio ``t``.
    """
    _check_k_alpha(len(deltas), alpha, "merge_deltas", method)
    keys = list(dict.fromkeys(key for d in deltas for key in d))
    merged: dict[str, torch.Tensor] = {}
    ratios: dict[str, torch.Tensor] = {}
    for key in keys:
        if key not in anchor:
            raise ValueError(f"merge_deltas: offset for '{key}', which the anchor does not have.")
        w0 = anchor[key]
        if not w0.is_floating_point():
            raise ValueError(
                f"merge_deltas: offset for '{key}', a {w0.dtype} tensor; only float tensors merge."
            )
        offsets: list[Delta | None] = []
        for i, d in enumerate(deltas):
            if key not in d:
                offsets.append(None)
                continue
            if d[key].shape != w0.shape:
                raise ValueError(
                    f"merge_deltas: offset '{key}' of expert {i} has shape {tuple(d[key].shape)}, the anchor's "
                    f"{tuple(w0.shape)}."
                )
            offsets.append(_cast(d[key], w0))
        merged[key], ratios[key] = _stock_one(w0, offsets, alpha, method)
    values = torch.stack([t.double() for t in ratios.values()]).cpu().tolist() if ratios else []  # one sync
    return merged, dict(zip(ratios, values))


# ============================================================================================ the bank
class ExpertBank:
    """``N`` experts × ``E_i`` epoch checkpoints in memory, as offsets from the anchor; draws mixed teachers.

    Args:
        anchor_state: the anchor's tensors (at least every key an expert touches); only clones of touched keys
            are kept.
        experts: ``experts[i][e]`` maps ``named_parameters()`` names of the base model to the offset of expert
            ``i`` after epoch ``e + 1`` (dense tensor or :class:`LowRankDelta`).
        names: one name per expert (for logs and cards); default ``expert-<i>``.

    Merging works from the LoRA factors directly, so no dense ``ΔW`` is cached (see the module docstring).
    """

    def __init__(
        self,
        anchor_state: Mapping[str, torch.Tensor],
        experts: Sequence[Sequence[Mapping[str, Delta]]],
        names: Sequence[str] | None = None,
    ) -> None:
        if not experts:
            raise ValueError("ExpertBank: no experts given; a bank needs at least one expert with one epoch.")
        if names is not None and len(names) != len(experts):
            raise ValueError(f"ExpertBank: {len(names)} names for {len(experts)} experts.")
        touched: dict[str, None] = {}
        for i, epochs in enumerate(experts):
            if not epochs:
                raise ValueError(f"ExpertBank: expert {i} has no epoch checkpoints.")
            for e, deltas in enumerate(epochs):
                for key, delta in deltas.items():
                    where = f"ExpertBank: expert {i}, epoch {e + 1}: offset '{key}'"
                    if key not in anchor_state:
                        raise ValueError(
                            f"{where} matches no anchor tensor (keys are named_parameters() names)."
                        )
                    w0 = anchor_state[key]
                    if delta.shape != w0.shape:
                        raise ValueError(
                            f"{where} has shape {tuple(delta.shape)}, the anchor {tuple(w0.shape)}."
                        )
                    if not w0.is_floating_point():
                        raise ValueError(f"{where} targets a {w0.dtype} tensor; only float tensors merge.")
                    touched[key] = None
        order = [k for k in anchor_state if k in touched]  # the anchor's (parameter) order
        self._anchor = {k: anchor_state[k].detach().clone() for k in order}
        self._experts = [[dict(d) for d in epochs] for epochs in experts]
        self.names = list(names) if names is not None else [f"expert-{i}" for i in range(len(experts))]

    @property
    def num_experts(self) -> int:
        return len(self._experts)

    def num_epochs(self, i: int) -> int:
        """Number of epoch checkpoints of expert ``i``."""
        return len(self._experts[i])

    @property
    def touched_keys(self) -> list[str]:
        """Parameter names some expert changes (in the anchor's order): all a mixed teacher rewrites."""
        return list(self._anchor)

    def select(self, checkpoints: Sequence[tuple[int, int]]) -> ExpertBank:
        """A bank of the given ``(expert, epoch)`` checkpoints only (0-based epoch index, negative counts from the
        end), each as a one-epoch expert: e.g. ``select([(0, -1)])`` is the single fine-tuned expert of the paper's
        teacher ablation (MDM §2)."""
        chosen = [[self._experts[i][e]] for i, e in checkpoints]
        return ExpertBank(self._anchor, chosen, names=[f"{self.names[i]}@{e}" for i, e in checkpoints])

    def to(self, device: torch.device | str) -> ExpertBank:
        """Move the stored anchor tensors and offsets to ``device`` (e.g. the teacher's GPU) in place; returns self."""
        self._anchor = {k: v.to(device) for k, v in self._anchor.items()}
        self._experts = [
            [{k: v.to(device) for k, v in d.items()} for d in epochs] for epochs in self._experts
        ]
        return self

    def sample(
        self, generator: torch.Generator, k: int = 2, max_start_epoch: int | None = None
    ) -> list[tuple[int, int]]:
        """``k`` draws ``(expert, epoch)``: expert uniform with replacement, epoch uniform in
        ``[1, min(max_start_epoch, E_i)]`` (1-based). Deterministic given the generator's state."""
        if k < 2:
            raise ValueError(
                f"ExpertBank.sample: k={k}; a mixed teacher merges k ≥ 2 checkpoints (paper: 2)."
            )
        if max_start_epoch is not None and max_start_epoch < 1:
            raise ValueError(
                f"ExpertBank.sample: max_start_epoch={max_start_epoch} must be ≥ 1 (or None: all)."
            )
        draws = []
        for _ in range(k):
            i = int(torch.randint(0, self.num_experts, (1,), generator=generator))
            top = self.num_epochs(i) if max_start_epoch is None else min(max_start_epoch, self.num_epochs(i))
            draws.append((i, int(torch.randint(1, top + 1, (1,), generator=generator))))
        return draws

    def merged_state(
        self, draws: Sequence[tuple[int, int]], alpha: float = 1.0, method: str = "model_stock"
    ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """The mixed teacher's tensors for ``draws`` -- every touched key, so a previous teacher leaves no trace --
        and the ratio ``t`` of each tensor some drawn checkpoint changes (``method``: :data:`MERGE_METHODS`)."""
        for i, e in draws:
            if not (0 <= i < self.num_experts and 1 <= e <= self.num_epochs(i)):
                raise ValueError(
                    f"ExpertBank: draw (expert {i}, epoch {e}) is outside the bank (epochs are 1-based)."
                )
        offsets = [self._experts[i][e - 1] for i, e in draws]
        merged, ratios = merge_deltas(self._anchor, offsets, alpha, method)
        return {k: merged.get(k, v) for k, v in self._anchor.items()}, ratios

    def offset_cosines(self, draws: Sequence[tuple[int, int]]) -> dict[str, float]:
        """Per touched tensor, the mean pairwise cosine of the drawn checkpoints' offsets before Model Stock's
        ``[0, 1]`` clamp (the ``cos`` of the module docstring; a zero offset counts as orthogonal): why ``t`` is
        what it is. A diagnostic: :meth:`merged_state` reports ``t`` itself."""
        chosen = [self._experts[i][e - 1] for i, e in draws]
        return {
            key: float(_mean_pair_cosine([None if key not in d else _cast(d[key], w0) for d in chosen], w0))
            for key, w0 in self._anchor.items()
        }

    def install(self, model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
        """Copy ``state`` into ``model``'s existing parameters in place (same storage; only the given keys)."""
        params = dict(model.named_parameters())
        for key, value in state.items():
            if key not in params:
                raise ValueError(
                    f"ExpertBank.install: the model has no parameter '{key}'; install into the base model the bank "
                    "was built for (keys are its named_parameters() names, without peft prefixes)."
                )
            if params[key].shape != value.shape:
                raise ValueError(
                    f"ExpertBank.install: '{key}' has shape {tuple(value.shape)}, the model's "
                    f"{tuple(params[key].shape)}."
                )
        with torch.no_grad():
            for key, value in state.items():
                params[key].copy_(value)

    def restore_anchor(self, model: torch.nn.Module) -> None:
        """Put the anchor's tensors back into every touched parameter."""
        self.install(model, self._anchor)

    def draw(
        self,
        model: torch.nn.Module,
        generator: torch.Generator,
        k: int = 2,
        max_start_epoch: int | None = None,
        alpha: float = 1.0,
        method: str = "model_stock",
    ) -> dict:
        """Sample, merge and install a fresh mixed teacher; returns ``{"draws", "mean_t", "ratios"}`` for logs."""
        draws = self.sample(generator, k, max_start_epoch)
        state, ratios = self.merged_state(draws, alpha, method)
        self.install(model, state)
        mean_t = sum(ratios.values()) / len(ratios) if ratios else 0.0
        return {"draws": draws, "mean_t": mean_t, "ratios": ratios}
