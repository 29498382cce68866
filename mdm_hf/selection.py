"""Data level of MDM: choose the K real pairs the synthetic set starts from.

MDM (arXiv 2605.23482, §"data level") embeds every real pair with the teacher, forms the joint feature
``j = normalize(concat(z_v, z_t))`` and runs spherical k-means with K = budget; each cluster contributes the
real pair nearest its centroid, and an empty cluster takes the nearest pair not chosen yet, so exactly K
distinct pairs come out. The coreset baselines the paper compares against (random, herding, k-center) sit
behind the same interface and run on the same joint features.

Every method L2-normalises the rows it is given (the joint space is a sphere), so the cosine and the Euclidean
views agree: ``|a - b|^2 = 2 - 2 a.b`` for unit rows.
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "SELECTION_METHODS",
    "herding_select",
    "joint_features",
    "kcenter_select",
    "kmeans_select",
    "random_select",
    "select_pairs",
    "selection_features",
    "spherical_kmeans",
]

# kmeans_image / kmeans_text: the paper's single-modality ablation of the initialisation (docs/method.md §1).
SELECTION_METHODS = ("kmeans", "random", "herding", "kcenter", "kmeans_image", "kmeans_text")

# Rows per block when scoring all points against the centroids: 65,536 x 1,000 float32 sims = 256 MB.
_ASSIGN_CHUNK = 65_536
# Upper bound on the elements of one (empty centroids x points) similarity block (256 MB in float32).
_EMPTY_BLOCK_ELEMS = 1 << 26


# --------------------------------------------------------------------------------------------- validation
def _as_features(features: Any, name: str = "features") -> torch.Tensor:
    """A 2-D float tensor on its own device (float64 kept, any other dtype computed in float32), finite."""
    x = torch.as_tensor(features)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D tensor [N, d], got shape {tuple(x.shape)}.")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(
            f"{name} is empty (shape {tuple(x.shape)}); pass at least one row and one dimension."
        )
    if x.dtype != torch.float64:
        x = x.float()
    if not torch.isfinite(x).all():
        bad = int((~torch.isfinite(x)).any(dim=1).sum())
        raise ValueError(
            f"{name} contains NaN or inf in {bad} row(s); check the teacher's embeddings (e.g. a diverged "
            "model or a bad image) before selecting pairs."
        )
    return x


def _check_budget(k: Any, n: int) -> int:
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise ValueError(f"budget k must be an integer, got {k!r}.")
    k = int(k)
    if k <= 0:
        raise ValueError(f"budget k={k} must be positive — set num_pairs to at least 1.")
    if k > n:
        raise ValueError(
            f"budget k={k} is larger than the dataset (N={n}) — lower num_pairs or use a larger split."
        )
    return k


def _check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ValueError(f"seed must be an integer, got {seed!r}.")
    return int(seed)


# ------------------------------------------------------------------------------------------ joint space
def joint_features(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """The joint feature of each pair: ``j = normalize(concat(normalize(z_v), normalize(z_t)))``.

    Args:
        image_embeds: ``[N, d_v]`` image embeddings ``z_v`` of the real pairs.
        text_embeds: ``[N, d_t]`` text embeddings ``z_t`` of the same pairs (row i pairs with image row i).

    Returns:
        ``[N, d_v + d_t]`` unit rows. Each half is normalised first so that neither modality dominates by
        scale; the concatenation then has norm sqrt(2) and is rescaled onto the sphere.
    """
    zv = _as_features(image_embeds, "image_embeds")
    zt = _as_features(text_embeds, "text_embeds")
    if zv.shape[0] != zt.shape[0]:
        raise ValueError(
            f"image_embeds has {zv.shape[0]} rows but text_embeds has {zt.shape[0]}; pass one text embedding "
            "per image (row i of each is the same pair)."
        )
    dtype = torch.float64 if torch.float64 in (zv.dtype, zt.dtype) else torch.float32
    zt = zt.to(device=zv.device)
    j = torch.cat([F.normalize(zv.to(dtype), dim=1), F.normalize(zt.to(dtype), dim=1)], dim=1)
    return F.normalize(j, dim=1)


def selection_features(method: str, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """The features ``method`` selects on: ``z_v`` alone for ``"kmeans_image"``, ``z_t`` alone for
    ``"kmeans_text"`` (the paper's image-only / text-only k-means ablation, docs/method.md §1), the joint feature
    (:func:`joint_features`) for every other method."""
    if method == "kmeans_image":
        return F.normalize(_as_features(image_embeds, "image_embeds"), dim=1)
    if method == "kmeans_text":
        return F.normalize(_as_features(text_embeds, "text_embeds"), dim=1)
    return joint_features(image_embeds, text_embeds)


# ------------------------------------------------------------------------------------------- k-means
def spherical_kmeans(
    features: torch.Tensor,
    k: int,
    seed: int = 0,
    niter: int = 25,
    max_points_per_centroid: int = 256,
) -> torch.Tensor:
    """Spherical k-means centroids of the L2-normalised rows (faiss, cosine assignment, unit centroids).

    Args:
        features: ``[N, d]`` rows (normalised here).
        k: number of clusters, ``1 <= k <= N``.
        seed: faiss' seed (initial centroids and the training subsample).
        niter: Lloyd iterations.
        max_points_per_centroid: faiss trains on a seeded random subsample of ``k * max_points_per_centroid``
            rows when N is larger (faiss' default 256: k = 1,000 trains on at most 256,000 rows, which keeps
            1M-row inputs to about a minute on two cores). Members are still picked among all N rows.

    Returns:
        ``[k, d]`` float32 unit centroids on the features' device.
    """
    import faiss  # local: only k-means needs it

    x = _as_features(features)
    k = _check_budget(k, x.shape[0])
    seed = _check_seed(seed)
    if isinstance(niter, bool) or not isinstance(niter, numbers.Integral) or niter < 1:
        raise ValueError(f"niter must be a positive integer, got {niter!r}.")
    xs = np.ascontiguousarray(F.normalize(x, dim=1).detach().cpu().numpy(), dtype=np.float32)
    km = faiss.Kmeans(
        xs.shape[1],
        k,
        niter=int(niter),
        seed=seed,
        spherical=True,
        max_points_per_centroid=int(max_points_per_centroid),
        # Only used by faiss to print a "too few points" warning; choosing k of N pairs is legitimate here.
        min_points_per_centroid=1,
        verbose=False,
    )
    km.train(xs)
    del xs
    # faiss renormalises after each update; renormalise again so the member search is a pure cosine argmax.
    return F.normalize(torch.from_numpy(km.centroids.copy()), dim=1).to(x.device)


def _assign(x: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: cosine to the nearest centroid and its index (first index on ties), in row blocks."""
    n = x.shape[0]
    best = torch.empty(n, dtype=x.dtype, device=x.device)
    label = torch.empty(n, dtype=torch.long, device=x.device)
    c_t = centroids.t()
    for start in range(0, n, _ASSIGN_CHUNK):
        sims = x[start : start + _ASSIGN_CHUNK] @ c_t
        best[start : start + _ASSIGN_CHUNK], label[start : start + _ASSIGN_CHUNK] = sims.max(dim=1)
    return best, label


def kmeans_select(
    features: torch.Tensor,
    k: int,
    seed: int = 0,
    niter: int = 25,
    *,
    max_points_per_centroid: int = 256,
    return_centroids: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """MDM's initialisation: one real pair per spherical k-means cluster, exactly ``k`` distinct indices.

    Every row is assigned to its most similar centroid (cosine; first centroid on ties). Cluster ``c`` then
    contributes its member with the largest cosine to centroid ``c`` (lowest row index on ties). Members of
    different clusters are different rows, so the only gap is an empty cluster: those, in cluster order, take
    the row most similar to their centroid that no cluster has taken yet.

    Args:
        features: ``[N, d]`` joint features (see :func:`joint_features`); normalised here.
        k: budget, ``1 <= k <= N``.
        seed: faiss seed; the result is deterministic for a seed.
        niter: k-means iterations.
        max_points_per_centroid: faiss' training subsample cap (see :func:`spherical_kmeans`).
        return_centroids: also return the ``[k, d]`` unit centroids (to audit the choice).

    Returns:
        LongTensor ``[k]``: entry ``c`` is the row chosen for cluster ``c`` (ordered by cluster index);
        with ``return_centroids`` a tuple ``(indices, centroids)``.
    """
    x = _as_features(features)
    k = _check_budget(k, x.shape[0])
    centroids = spherical_kmeans(
        x, k, seed=seed, niter=niter, max_points_per_centroid=max_points_per_centroid
    )
    x = F.normalize(x.float(), dim=1)  # float32 throughout: matches the centroids faiss returns
    centroids = centroids.to(x.device)
    n = x.shape[0]
    best, label = _assign(x, centroids)

    # Per cluster, the highest cosine among its members, then the lowest row index reaching it.
    rows = torch.arange(n, device=x.device)
    top = torch.full((k,), -torch.inf, dtype=best.dtype, device=x.device)
    top.scatter_reduce_(0, label, best, reduce="amax")
    at_top = best == top[label]
    chosen = torch.full((k,), n, dtype=torch.long, device=x.device)
    chosen.scatter_reduce_(0, label[at_top], rows[at_top], reduce="amin")

    empty = (chosen == n).nonzero().flatten()
    if empty.numel():
        taken = torch.zeros(n, dtype=torch.bool, device=x.device)
        taken[chosen[chosen < n]] = True
        # Blocks of empty centroids against all rows keep memory bounded; within a block, the picks are
        # sequential (cluster order) and each masks its row for the later ones.
        block = max(1, _EMPTY_BLOCK_ELEMS // n)
        for b0 in range(0, empty.numel(), block):
            ids = empty[b0 : b0 + block]
            sims = centroids[ids] @ x.t()
            sims[:, taken] = -torch.inf
            for r, c in enumerate(ids.tolist()):
                j = int(torch.argmax(sims[r]))  # first index on ties
                chosen[c] = j
                taken[j] = True
                sims[r + 1 :, j] = -torch.inf
    chosen = chosen.cpu()
    return (chosen, centroids) if return_centroids else chosen


# ------------------------------------------------------------------------------------ coreset baselines
def random_select(n: int, k: int, seed: int = 0) -> torch.Tensor:
    """``k`` distinct indices drawn uniformly from ``range(n)`` (seeded; the first k of a permutation)."""
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n <= 0:
        raise ValueError(f"n must be a positive integer (the dataset size), got {n!r}.")
    k = _check_budget(k, int(n))
    gen = torch.Generator().manual_seed(_check_seed(seed))
    return torch.randperm(int(n), generator=gen)[:k]


def herding_select(features: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy herding: each step adds the row that brings the mean of the chosen rows closest to the mean.

    With ``mu`` the mean of all (normalised) rows and ``s`` the sum of the ``t`` rows chosen so far, step t
    picks ``argmin_{i not chosen} |mu - (s + x_i) / (t + 1)|^2``, i.e. the argmin of
    ``|x_i|^2 - 2 x_i . ((t + 1) mu - s)`` (Welling, ICML 2009; Chen, Welling & Smola, UAI 2010; the
    "herding" coreset of iCaRL and of dataset-distillation baselines). Ties go to the lowest index; picks are
    distinct. Cost: k matrix-vector products over the N rows, O(N) extra memory.

    Returns:
        LongTensor ``[k]`` in the order picked (a prefix is the herding choice for a smaller budget).
    """
    x = _as_features(features)
    k = _check_budget(k, x.shape[0])
    x = F.normalize(x, dim=1)
    sq = (x * x).sum(dim=1)
    mu = x.mean(dim=0)
    total = torch.zeros_like(mu)
    blocked = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    picks = torch.empty(k, dtype=torch.long)
    for t in range(k):
        score = sq - 2.0 * (x @ ((t + 1) * mu - total))
        score.masked_fill_(blocked, torch.inf)
        i = int(torch.argmin(score))
        picks[t] = i
        blocked[i] = True
        total += x[i]
    return picks


def kcenter_select(features: torch.Tensor, k: int, seed: int = 0) -> torch.Tensor:
    """Greedy k-center (farthest-point) coreset, Sener & Savarese, ICLR 2018 (arXiv 1708.00489).

    Starts from one row drawn uniformly with ``seed``, then repeatedly adds the row whose Euclidean distance
    to its nearest chosen row is largest (first index on ties), updating each row's min-distance with one
    matrix-vector product per step. Memory is O(N) beyond the features, so 1M rows fit; time is k passes over
    the features. Chosen rows are excluded explicitly, so duplicates cannot be picked twice.

    Returns:
        LongTensor ``[k]`` in the order picked (a prefix is the k-center choice for a smaller budget).
    """
    x = _as_features(features)
    n = x.shape[0]
    k = _check_budget(k, n)
    gen = torch.Generator().manual_seed(_check_seed(seed))
    x = F.normalize(x, dim=1)
    sq = (x * x).sum(dim=1)
    picks = torch.empty(k, dtype=torch.long)
    picks[0] = int(torch.randint(n, (1,), generator=gen))
    min_d2 = torch.full((n,), torch.inf, dtype=x.dtype, device=x.device)
    for t in range(k):
        i = int(picks[t])
        # |x - c|^2 = |x|^2 + |c|^2 - 2 x.c, clamped against rounding below zero.
        d2 = (sq + sq[i] - 2.0 * (x @ x[i])).clamp_(min=0.0)
        torch.minimum(min_d2, d2, out=min_d2)
        min_d2[i] = -torch.inf  # never again
        if t + 1 < k:
            picks[t + 1] = int(torch.argmax(min_d2))
    return picks


# ------------------------------------------------------------------------------------------ dispatcher
def select_pairs(
    method: str, features: torch.Tensor, k: int, seed: int = 0, *, niter: int = 25
) -> torch.Tensor:
    """Indices of the ``k`` real pairs a synthetic set starts from.

    Args:
        method: one of :data:`SELECTION_METHODS` — ``"kmeans"`` (MDM), ``"random"``, ``"herding"``,
            ``"kcenter"``; ``"kmeans_image"`` / ``"kmeans_text"`` run the same k-means on the features
            :func:`selection_features` gives them (one modality).
        features: ``[N, d]`` joint features of the real pairs (:func:`joint_features`); validated for every
            method (finite values) even though ``"random"`` only uses N.
        k: budget (number of synthetic pairs), ``1 <= k <= N``.
        seed: seed for k-means, random and k-center (herding is deterministic).
        niter: k-means iterations.

    Returns:
        LongTensor ``[k]`` of distinct row indices (CPU).
    """
    if method not in SELECTION_METHODS:
        raise ValueError(
            f"unknown selection method {method!r}; choose one of {', '.join(SELECTION_METHODS)}."
        )
    x = _as_features(features)
    k = _check_budget(k, x.shape[0])
    if method in ("kmeans", "kmeans_image", "kmeans_text"):
        return kmeans_select(x, k, seed=seed, niter=niter)
    if method == "random":
        return random_select(x.shape[0], k, seed=seed)
    if method == "herding":
        return herding_select(x, k)
    return kcenter_select(x, k, seed=seed)
