"""The student's inner SGD steps and the gradient of the matching loss through them.

``unroll="full"`` back-propagates through all ``N`` steps (MTT, Cazenavette et al., CVPR 2022, arXiv 2203.11932;
exact; the graph grows with ``N``). ``unroll="tesla"`` is the constant-memory scheme of LoRS' released code (TESLA,
Cui et al., ICML 2023, arXiv 2211.10586): run the trajectory without a graph, then recompute and differentiate each
step's gradient once. It drops the dependence of later steps' gradients on earlier mini-batches through ``θ``
(second-order cross terms); with ``N = 1`` the two agree exactly.

Everything here works on ``{name: tensor}`` dicts and a ``loss_fn(params, batch)``: the distiller evaluates its
teacher with ``torch.func.functional_call``, so no module is copied or modified. A batch is opaque here (index
tensors in the tests; the distiller's :class:`~.blending.SyntheticMiniBatch`): step ``i``'s object is handed to
every pass over step ``i``, so whatever was drawn with it -- RepBlend's blend -- is replayed, never redrawn.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

__all__ = ["LossFn", "sgd_unroll", "unrolled_matching_gradients"]

LossFn = Callable[[dict[str, torch.Tensor], Any], torch.Tensor]  # (params by name, one step's batch) -> loss
MetaLoss = Callable[[dict[str, torch.Tensor]], torch.Tensor]


def _grads(
    loss: torch.Tensor, params: Sequence[torch.Tensor], create_graph: bool
) -> tuple[torch.Tensor, ...]:
    # An unused tensor (e.g. a pooler no loss reaches) gets a zero gradient instead of None.
    return torch.autograd.grad(
        loss, list(params), create_graph=create_graph, allow_unused=True, materialize_grads=True
    )


def _math_attention():
    """Scaled-dot-product attention from differentiable primitives: the fused CPU / CUDA kernels have no double
    backward, which the unrolled steps (gradients of gradients) need. Forward values are the same up to rounding."""

    return sdpa_kernel(SDPBackend.MATH)


@contextmanager
def _not_requiring_grad(tensors: Sequence[torch.Tensor]) -> Iterator[None]:
    """The leaf tensors among ``tensors`` stop requiring grad for the duration: a pass that is never differentiated
    w.r.t. them builds no graph to them (TESLA's first pass; with projection-only trajectories, the frozen image
    encoder's activations would otherwise be recorded for nothing)."""
    leaves = [t for t in tensors if t.is_leaf and t.requires_grad]
    for t in leaves:
        t.requires_grad_(False)
    try:
        yield
    finally:
        for t in leaves:
            t.requires_grad_(True)


def sgd_unroll(
    loss_fn: LossFn,
    params: Mapping[str, torch.Tensor],
    step_sizes: Mapping[str, torch.Tensor],
    batches: Sequence[Any],
    create_graph: bool = True,
) -> dict[str, torch.Tensor]:
    """``len(batches)`` SGD steps ``θ_{i+1} = θ_i − η_n ∇_θ loss_fn(θ_i, batches[i])``, differentiable end to end.

    Args:
        loss_fn: ``(params_by_name, batch) -> scalar``; closes over the synthetic data.
        params: the start ``θ_0`` by name (made leaves that require grad; the inputs are not modified).
        step_sizes: a scalar tensor per name (tensors shared by a branch may be the same object).
        create_graph: keep the graph of every step (MTT); ``False`` runs the trajectory without one.

    Returns the end parameters. With ``create_graph`` they depend on the synthetic data and the step sizes, so
    ``autograd.grad`` of any function of them reaches both; only one set of tensors per step is kept, by the graph.
    """
    names = list(params)
    current = {n: params[n].detach().requires_grad_(True) for n in names}
    for batch in batches:
        with _math_attention():
            loss = loss_fn(current, batch)
        grads = _grads(loss, [current[n] for n in names], create_graph)
        if create_graph:
            current = {n: current[n] - step_sizes[n] * g for n, g in zip(names, grads)}
        else:
            with torch.no_grad():
                current = {n: current[n] - step_sizes[n] * g for n, g in zip(names, grads)}
            current = {n: t.requires_grad_(True) for n, t in current.items()}
    return current


def unrolled_matching_gradients(
    loss_fn: LossFn,
    params: Mapping[str, torch.Tensor],
    step_sizes: Mapping[str, torch.Tensor],
    batches: Sequence[Any],
    meta_loss: MetaLoss,
    inputs: Sequence[torch.Tensor],
    mode: str = "full",
) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[torch.Tensor]]:
    """Gradients of ``meta_loss(θ_N)`` w.r.t. ``inputs`` (synthetic data, step sizes, similarity parameters).

    ``mode="full"``: exact, through the whole unrolled graph (:func:`sgd_unroll`).

    ``mode="tesla"`` (arXiv 2211.10586, as LoRS' released code): ``θ_N = θ_0 − Σ_i η ⊙ g_i`` with
    ``g_i = ∇ℓ(θ_i; B_i)`` evaluated along the trajectory and each ``g_i`` treated as depending only on its own
    mini-batch, so with ``c = −η ⊙ ∂L/∂θ_N``::

        dL/dinput = Σ_i ∂<c, g_i(θ_i; B_i)>/∂input          dL/dη_n = <∂L/∂θ_N[n], −Σ_i g_i[n]>

    Memory stays that of one step (plus the ``N`` parameter vectors of the trajectory). The second pass recomputes
    ``g_i`` with the very batch object of the first, so a random blend drawn with the mini-batch is the same in both.

    Returns ``(meta loss (detached), θ_N (detached), [gradient per input, zeros where unused])``.
    """
    if mode == "full":
        end = sgd_unroll(loss_fn, params, step_sizes, batches, create_graph=True)
        loss = meta_loss(end)
        grads = _grads(loss, inputs, create_graph=False)
        return loss.detach(), {n: t.detach() for n, t in end.items()}, list(grads)
    if mode != "tesla":
        raise ValueError(f"mode must be 'full' or 'tesla', got {mode!r}.")
    return _tesla_gradients(loss_fn, params, step_sizes, batches, meta_loss, inputs)


def _trajectory_without_graph(
    loss_fn: LossFn,
    params: Mapping[str, torch.Tensor],
    step_sizes: Mapping[str, torch.Tensor],
    batches: Sequence[Any],
    inputs: Sequence[torch.Tensor] = (),
) -> tuple[list[dict[str, torch.Tensor]], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """TESLA's first pass: ``([θ_0 .. θ_{N-1}], θ_N, Σ_i g_i)``, all detached; no graph reaches ``inputs``."""
    names = list(params)
    trajectory, grad_sum = [], {n: torch.zeros_like(params[n]) for n in names}
    current = {n: params[n].detach() for n in names}
    for batch in batches:
        trajectory.append(current)
        leaves = {n: current[n].detach().requires_grad_(True) for n in names}
        # the second pass's attention kernel, so that it recomputes this forward bit for bit
        with _math_attention(), _not_requiring_grad(inputs):
            loss = loss_fn(leaves, batch)
        grads = _grads(loss, [leaves[n] for n in names], create_graph=False)
        with torch.no_grad():
            current = {n: current[n] - step_sizes[n].detach() * g for n, g in zip(names, grads)}
            for n, g in zip(names, grads):
                grad_sum[n] += g
    return trajectory, current, grad_sum


def _tesla_gradients(
    loss_fn: LossFn,
    params: Mapping[str, torch.Tensor],
    step_sizes: Mapping[str, torch.Tensor],
    batches: Sequence[Any],
    meta_loss: MetaLoss,
    inputs: Sequence[torch.Tensor],
) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[torch.Tensor]]:
    """:func:`unrolled_matching_gradients` with ``mode="tesla"``: one step's graph at a time."""
    names = list(params)
    trajectory, current, grad_sum = _trajectory_without_graph(loss_fn, params, step_sizes, batches, inputs)
    end = {n: t.detach().requires_grad_(True) for n, t in current.items()}
    loss = meta_loss(end)
    d_end = dict(zip(names, _grads(loss, [end[n] for n in names], create_graph=False)))
    total = [torch.zeros_like(t) for t in inputs]
    # dL/dη through θ_N = θ_0 − η Σ g (a linear form in the step-size tensors, constants detached).
    lr_form = sum(step_sizes[n] * (d_end[n] * -grad_sum[n]).sum() for n in names)
    if isinstance(lr_form, torch.Tensor) and lr_form.requires_grad:
        for acc, g in zip(total, _grads(lr_form, inputs, create_graph=False)):
            acc += g
    coeff = {n: -step_sizes[n].detach() * d_end[n] for n in names}
    for theta, batch in zip(trajectory, batches):  # one step's graph at a time
        leaves = {n: theta[n].detach().requires_grad_(True) for n in names}
        with _math_attention():
            step_loss = loss_fn(leaves, batch)
        step_grads = _grads(step_loss, [leaves[n] for n in names], create_graph=True)
        inner = sum((coeff[n] * g).sum() for n, g in zip(names, step_grads))
        for acc, g in zip(total, _grads(inner, inputs, create_graph=False)):
            acc += g
    return loss.detach(), {n: t.detach() for n, t in end.items()}, total
