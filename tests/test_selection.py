"""Data-level selection: k-means init (MDM §1) and the coreset baselines, checked against independent numpy loops."""

import numpy as np
import pytest
import torch

from mdm_hf import selection
from mdm_hf.selection import (
    SELECTION_METHODS,
    herding_select,
    joint_features,
    kcenter_select,
    kmeans_select,
    random_select,
    select_pairs,
    selection_features,
    spherical_kmeans,
)


def _unit(a: np.ndarray) -> np.ndarray:
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def _blobs(n_blobs: int = 6, per: int = 30, d: int = 12, seed: int = 0) -> torch.Tensor:
    """Well separated clusters on the sphere plus noise, so k-means has real structure to find."""
    rng = np.random.default_rng(seed)
    centres = _unit(rng.normal(size=(n_blobs, d)))
    pts = np.repeat(centres, per, axis=0) + 0.15 * rng.normal(size=(n_blobs * per, d))
    return torch.from_numpy(pts[rng.permutation(len(pts))].astype(np.float32))


def _check_kmeans_rule(x: torch.Tensor, idx: torch.Tensor, cent: torch.Tensor) -> int:
    """Recompute the assignment in numpy and verify the MDM rule; returns the number of empty clusters."""
    xn = _unit(x.double().numpy())
    c = cent.double().numpy()
    k = c.shape[0]
    sims = xn @ c.T  # [N, k]
    label = sims.argmax(axis=1)
    idx = idx.numpy()
    assert len(set(idx.tolist())) == k
    taken = set()
    empties = []
    for cl in range(k):
        members = np.flatnonzero(label == cl)
        if members.size == 0:
            empties.append(cl)
            continue
        # the chosen row belongs to the cluster and is (one of) its most similar members
        assert label[idx[cl]] == cl
        assert sims[idx[cl], cl] == pytest.approx(sims[members, cl].max(), abs=1e-5)
        taken.add(int(idx[cl]))
    for cl in empties:  # in cluster order, the most similar row nobody has taken yet
        free = np.array([i for i in range(len(xn)) if i not in taken])
        assert idx[cl] in free
        assert sims[idx[cl], cl] == pytest.approx(sims[free, cl].max(), abs=1e-5)
        taken.add(int(idx[cl]))
    return len(empties)


def test_joint_features_formula():
    rng = np.random.default_rng(0)
    zv, zt = rng.normal(size=(5, 4)) * 3, rng.normal(size=(5, 6)) * 0.1
    j = joint_features(torch.from_numpy(zv), torch.from_numpy(zt)).numpy()
    expected = _unit(np.concatenate([_unit(zv), _unit(zt)], axis=1))
    np.testing.assert_allclose(j, expected, atol=1e-12)
    # each half carries exactly 1/sqrt(2) of the norm, whatever the input scales
    np.testing.assert_allclose(np.linalg.norm(j[:, :4], axis=1), 2**-0.5, atol=1e-12)
    with pytest.raises(ValueError, match="one text embedding per image"):
        joint_features(torch.ones(3, 4), torch.ones(2, 4))


def test_kmeans_follows_the_mdm_rule_on_clustered_data():
    x = _blobs()
    idx, cent = kmeans_select(x, 10, seed=0, return_centroids=True)
    assert idx.dtype == torch.long and idx.shape == (10,)
    np.testing.assert_allclose(cent.norm(dim=1).numpy(), 1.0, atol=1e-5)
    _check_kmeans_rule(x, idx, cent)
    # the centroids are those spherical_kmeans returns for the same seed
    torch.testing.assert_close(cent, spherical_kmeans(x, 10, seed=0))


def test_kmeans_empty_clusters_take_nearest_free_points():
    # 5 distinct rows, 4 copies each: at most 5 clusters can own members, so >= 7 of 12 must be empty.
    rng = np.random.default_rng(1)
    x = torch.from_numpy(np.tile(rng.normal(size=(5, 8)), (4, 1)).astype(np.float32))
    idx, cent = kmeans_select(x, 12, seed=3, return_centroids=True)
    assert _check_kmeans_rule(x, idx, cent) >= 7


def test_kmeans_empty_block_path_matches(monkeypatch):
    rng = np.random.default_rng(2)
    x = torch.from_numpy(np.tile(rng.normal(size=(6, 8)), (3, 1)).astype(np.float32))
    ref = kmeans_select(x, 15, seed=0)
    monkeypatch.setattr(selection, "_EMPTY_BLOCK_ELEMS", 1)  # one empty centroid per block
    torch.testing.assert_close(kmeans_select(x, 15, seed=0), ref)


def test_kmeans_deterministic_and_seeded():
    x = _blobs(n_blobs=8, per=25, seed=4)
    a = kmeans_select(x, 16, seed=7)
    torch.testing.assert_close(a, kmeans_select(x, 16, seed=7))
    assert not torch.equal(a, kmeans_select(x, 16, seed=8))
    # scale of the rows does not matter: they are normalised first
    scale = torch.from_numpy(np.random.default_rng(0).uniform(0.5, 4.0, size=(len(x), 1)).astype(np.float32))
    idx_s, cent_s = kmeans_select(x * scale, 16, seed=7, return_centroids=True)
    _check_kmeans_rule(x, idx_s, cent_s)


@pytest.mark.parametrize("method", SELECTION_METHODS)
def test_full_budget_is_a_permutation(method):
    x = _blobs(n_blobs=3, per=7, seed=5)
    idx = select_pairs(method, x, len(x), seed=0)
    assert sorted(idx.tolist()) == list(range(len(x)))


def _herding_reference(x: np.ndarray, k: int) -> list[int]:
    x = _unit(x)
    mu = x.mean(axis=0)
    chosen: list[int] = []
    for _ in range(k):
        best, best_i = np.inf, -1
        for i in range(len(x)):
            if i in chosen:
                continue
            gap = float(np.sum((mu - x[chosen + [i]].mean(axis=0)) ** 2))
            if gap < best:
                best, best_i = gap, i
        chosen.append(best_i)
    return chosen


def test_herding_matches_brute_force():
    x = np.random.default_rng(6).normal(size=(40, 5))
    assert herding_select(torch.from_numpy(x), 15).tolist() == _herding_reference(x, 15)
    assert select_pairs("herding", torch.from_numpy(x), 15).tolist() == _herding_reference(x, 15)


def test_herding_distinct_on_duplicates():
    x = torch.from_numpy(np.tile(np.random.default_rng(7).normal(size=(3, 4)), (5, 1)))
    idx = herding_select(x, 12)
    assert idx.unique().numel() == 12


def _kcenter_reference(x: np.ndarray, start: int, k: int) -> list[int]:
    x = _unit(x)
    chosen = [start]
    while len(chosen) < k:
        best, best_i = -1.0, -1
        for i in range(len(x)):
            if i in chosen:
                continue
            d = min(float(np.linalg.norm(x[i] - x[j])) for j in chosen)
            if d > best:
                best, best_i = d, i
        chosen.append(best_i)
    return chosen


def test_kcenter_matches_brute_force_and_seed():
    x = np.random.default_rng(8).normal(size=(50, 6))
    picks = kcenter_select(torch.from_numpy(x), 12, seed=3).tolist()
    assert picks == _kcenter_reference(x, picks[0], 12)
    assert kcenter_select(torch.from_numpy(x), 12, seed=3).tolist() == picks
    starts = {int(kcenter_select(torch.from_numpy(x), 1, seed=s)[0]) for s in range(6)}
    assert len(starts) > 1  # the seed chooses the start


def test_kcenter_distinct_on_duplicates():
    x = torch.from_numpy(np.tile(np.random.default_rng(9).normal(size=(4, 3)), (3, 1)))
    assert kcenter_select(x, 12, seed=0).unique().numel() == 12


def test_random_select():
    a = random_select(100, 30, seed=1)
    assert a.unique().numel() == 30 and int(a.min()) >= 0 and int(a.max()) < 100
    torch.testing.assert_close(a, random_select(100, 30, seed=1))
    assert not torch.equal(a, random_select(100, 30, seed=2))
    torch.testing.assert_close(select_pairs("random", torch.zeros(100, 2), 30, seed=1), a)


def test_dispatch_matches_direct_calls():
    x = _blobs(n_blobs=4, per=10, seed=10)
    torch.testing.assert_close(select_pairs("kmeans", x, 6, seed=2), kmeans_select(x, 6, seed=2))
    torch.testing.assert_close(select_pairs("kcenter", x, 6, seed=2), kcenter_select(x, 6, seed=2))
    torch.testing.assert_close(select_pairs("herding", x, 6), herding_select(x, 6))


def test_errors():
    x = torch.randn(10, 4)
    with pytest.raises(
        ValueError, match=r"budget k=11 is larger than the dataset \(N=10\) — lower num_pairs"
    ):
        select_pairs("kmeans", x, 11)
    for method in SELECTION_METHODS:
        with pytest.raises(ValueError, match="larger than the dataset"):
            select_pairs(method, x, 11)
        with pytest.raises(ValueError, match="must be positive"):
            select_pairs(method, x, 0)
    with pytest.raises(ValueError, match="kmeans, random, herding, kcenter"):
        select_pairs("forgetting", x, 3)
    bad = x.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        select_pairs("random", bad, 3)
    with pytest.raises(ValueError, match="2-D"):
        select_pairs("kmeans", torch.randn(10), 3)
    with pytest.raises(ValueError, match="integer"):
        select_pairs("herding", x, 2.5)


def test_single_modality_kmeans_selects_like_kmeans_select_on_that_modality():
    zv, zt = _blobs(n_blobs=5, per=12, d=8, seed=3), _blobs(n_blobs=3, per=20, d=6, seed=4)
    image = select_pairs("kmeans_image", selection_features("kmeans_image", zv, zt), 7, seed=1)
    text = select_pairs("kmeans_text", selection_features("kmeans_text", zv, zt), 7, seed=1)
    torch.testing.assert_close(image, kmeans_select(zv, 7, seed=1))
    torch.testing.assert_close(text, kmeans_select(zt, 7, seed=1))
    assert not torch.equal(image, text)
    torch.testing.assert_close(selection_features("kmeans", zv, zt), joint_features(zv, zt))
    torch.testing.assert_close(selection_features("herding", zv, zt), joint_features(zv, zt))
