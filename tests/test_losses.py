"""Loss level (docs/method.md §3): every formula against a brute-force Python loop or a hand-worked case."""

import math

import pytest
import torch

from mdm_hf import losses
from mdm_hf.blending import blend, draw_blend
from mdm_hf.losses import (
    MDMLoss,
    agreement_discrepancy,
    clip_contrastive_loss,
    geodesic_distance,
    geodesic_kernel,
    geodesic_kernel_energy,
    sigmoid_contrastive_loss,
)


def _rows(x: torch.Tensor) -> list[list[float]]:
    return [[float(v) for v in row] for row in x]


def _unit(v: list[float]) -> list[float]:
    n = math.sqrt(sum(c * c for c in v))
    return [c / n for c in v]


def _cos(u: list[float], v: list[float]) -> float:
    return sum(a * b for a, b in zip(_unit(u), _unit(v)))


def _gke_loop(
    a: torch.Tensor, b: torch.Tensor, sigma: float, eps: float = 1e-6, unbiased: bool = False
) -> float:
    """Full (diagonal-including) or off-diagonal within-set means, acos of the clamped cosine, in Python floats."""

    def k(u, v):
        phi = math.acos(min(max(_cos(u, v), -1 + eps), 1 - eps))
        return math.exp(-(phi**2) / (2 * sigma**2))

    A, B = _rows(a), _rows(b)
    if unbiased:  # off-diagonal means: pairs of distinct rows
        kaa = sum(k(x, y) for i, x in enumerate(A) for j, y in enumerate(A) if i != j) / (
            len(A) * (len(A) - 1)
        )
        kbb = sum(k(x, y) for i, x in enumerate(B) for j, y in enumerate(B) if i != j) / (
            len(B) * (len(B) - 1)
        )
    else:
        kaa = sum(k(x, y) for x in A for y in A) / len(A) ** 2
        kbb = sum(k(x, y) for x in B for y in B) / len(B) ** 2
    kab = sum(k(x, y) for x in A for y in B) / (len(A) * len(B))
    return math.sqrt(max(kaa + kbb - 2 * kab, 0.0) + 1e-12)


def _finite_grads(*tensors: torch.Tensor) -> bool:
    return all(t.grad is not None and bool(torch.isfinite(t.grad).all()) for t in tensors)


# ============================================================================================ geodesic kernel
def test_geodesic_distance_and_kernel_match_loops():
    g = torch.Generator().manual_seed(0)
    a, b = (
        torch.randn(4, 3, generator=g, dtype=torch.float64),
        3 * torch.randn(6, 3, generator=g, dtype=torch.float64),
    )
    phi, ker = geodesic_distance(a, b), geodesic_kernel(a, b, sigma=0.7)
    assert phi.shape == (4, 6)
    for i, u in enumerate(_rows(a)):
        for j, v in enumerate(_rows(b)):
            assert phi[i, j].item() == pytest.approx(math.acos(_cos(u, v)), abs=1e-9)
            assert ker[i, j].item() == pytest.approx(
                math.exp(-(math.acos(_cos(u, v)) ** 2) / (2 * 0.49)), abs=1e-9
            )
    # the clamp: identical and antipodal points sit at eps from the ends, not at 0 / π exactly
    d = geodesic_distance(a[:1], torch.cat([a[:1], -a[:1]]))
    assert d[0, 0].item() == pytest.approx(math.acos(1 - 1e-6)) and d[0, 1].item() == pytest.approx(
        math.acos(-1 + 1e-6)
    )


@pytest.mark.parametrize("m,n,d,sigma", [(5, 8, 4, 0.5), (7, 3, 6, 1.3)])
def test_gke_matches_brute_force_loop(m, n, d, sigma):
    g = torch.Generator().manual_seed(m * n)
    a = torch.randn(m, d, generator=g, dtype=torch.float64)
    b = torch.randn(n, d, generator=g, dtype=torch.float64) + 0.5  # a shifted set: a clearly non-zero energy
    value = geodesic_kernel_energy(a, b, sigma=sigma)
    assert value.ndim == 0
    assert value.item() == pytest.approx(_gke_loop(a, b, sigma), rel=1e-9)
    assert value.item() > 0.05
    # symmetric, and scale-invariant per row (rows are normalised inside)
    assert geodesic_kernel_energy(b, a, sigma).item() == pytest.approx(value.item(), rel=1e-12)
    scaled = a * torch.rand(m, 1, generator=g, dtype=torch.float64).add(0.1)
    assert geodesic_kernel_energy(scaled, b, sigma).item() == pytest.approx(value.item(), rel=1e-9)


def test_unbiased_gke_matches_off_diagonal_loop_and_has_no_floor():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(6, 4, generator=g, dtype=torch.float64)
    b = torch.randn(9, 4, generator=g, dtype=torch.float64) + 0.5
    value = geodesic_kernel_energy(a, b, sigma=0.8, unbiased=True)
    assert value.item() == pytest.approx(_gke_loop(a, b, 0.8, unbiased=True), rel=1e-9)
    assert value.item() != pytest.approx(geodesic_kernel_energy(a, b, sigma=0.8).item(), rel=1e-3)
    # two samples of one distribution: the V-statistic keeps a floor of about sqrt(1/m + 1/n), the U-statistic
    # does not (its square may even go below zero, where the clamp gives 0)
    x = torch.randn(400, 8, generator=g, dtype=torch.float64)
    v, u = geodesic_kernel_energy(x[:200], x[200:]), geodesic_kernel_energy(x[:200], x[200:], unbiased=True)
    assert v.item() > 0.09 and u.item() < 0.5 * v.item()
    with pytest.raises(ValueError, match="≥ 2 points per set"):
        geodesic_kernel_energy(a[:1], b, unbiased=True)


def test_gke_of_a_set_with_itself_is_zero_with_finite_gradients():
    a = torch.randn(6, 5, generator=torch.Generator().manual_seed(1), requires_grad=True)
    value = geodesic_kernel_energy(a, a)
    assert value.item() == pytest.approx(1e-6, abs=1e-6)
    value.backward()
    assert _finite_grads(a)
    b = a.detach().clone().requires_grad_(True)  # identical values, separate leaf
    geodesic_kernel_energy(a.detach(), b).backward()
    assert _finite_grads(b)


def test_gke_gradients_finite_for_duplicates_and_antipodes():
    base = torch.randn(3, 4, generator=torch.Generator().manual_seed(2))
    a = torch.cat([base, base[:1], base[:1]]).requires_grad_(True)  # duplicated rows
    b = torch.cat([-base, base[1:2], base[1:2] * 5]).requires_grad_(True)  # antipodes, duplicates of a's rows
    value = geodesic_kernel_energy(a, b)
    value.backward()
    assert torch.isfinite(value) and _finite_grads(a, b)
    assert b.grad.abs().sum() > 0  # not a gradient silenced everywhere
    assert value.item() == pytest.approx(_gke_loop(a.detach().double(), b.detach().double(), 0.5), rel=1e-4)


def test_gke_half_precision_inputs_are_computed_in_float32():
    a = torch.randn(4, 8, generator=torch.Generator().manual_seed(3)).bfloat16().requires_grad_(True)
    # identical points: arccos at 1 in bfloat16 would have an infinite gradient
    value = geodesic_kernel_energy(a, a.detach())
    value.backward()
    assert value.dtype == torch.float32 and _finite_grads(a)


def test_gke_negative_squared_energy_is_clamped():
    """The geodesic Gaussian kernel is not positive definite on the sphere: MMD² < 0 happens (σ = 2, S²)."""
    found = None
    for seed in range(400):
        g = torch.Generator().manual_seed(seed)
        a, b = (
            torch.randn(3, 3, generator=g, dtype=torch.float64),
            torch.randn(2, 3, generator=g, dtype=torch.float64),
        )
        sq = (
            geodesic_kernel(a, a, 2.0).mean()
            + geodesic_kernel(b, b, 2.0).mean()
            - 2 * geodesic_kernel(a, b, 2.0).mean()
        )
        if sq < -1e-3:
            found = (a.requires_grad_(True), b)
            break
    assert found is not None, "expected a configuration with a negative squared energy"
    value = geodesic_kernel_energy(*found, sigma=2.0)
    value.backward()
    assert value.item() == pytest.approx(1e-6) and _finite_grads(found[0])


def test_gke_rejects_bad_inputs():
    a = torch.randn(3, 4)
    with pytest.raises(ValueError, match="feature dims differ"):
        geodesic_kernel_energy(a, torch.randn(3, 5))
    with pytest.raises(ValueError, match="2-D"):
        geodesic_kernel_energy(a[0], a)
    with pytest.raises(ValueError, match="empty"):
        geodesic_kernel_energy(a[:0], a)
    with pytest.raises(ValueError, match="sigma"):
        geodesic_kernel_energy(a, a, sigma=0.0)
    with pytest.raises(ValueError, match="eps"):
        geodesic_distance(a, a, eps=0.0)


# ============================================================================================ u and g
def test_agreement_discrepancy_are_orthogonal_unit_directions():
    g = torch.Generator().manual_seed(4)
    zv, zt = (
        2 * torch.randn(5, 6, generator=g, dtype=torch.float64),
        torch.randn(5, 6, generator=g, dtype=torch.float64),
    )
    u, dis = agreement_discrepancy(zv, zt)
    for i, (x, y) in enumerate(zip(_rows(zv), _rows(zt))):
        x, y = _unit(x), _unit(y)
        assert _rows(u[i : i + 1])[0] == pytest.approx(_unit([p + q for p, q in zip(x, y)]), abs=1e-12)
        assert _rows(dis[i : i + 1])[0] == pytest.approx(_unit([p - q for p, q in zip(x, y)]), abs=1e-12)
    assert (u * dis).sum(-1).abs().max() < 1e-12
    assert torch.allclose(u.norm(dim=-1), torch.ones(5, dtype=torch.float64))


def test_agreement_discrepancy_safe_for_equal_and_opposite_pairs():
    z = torch.randn(2, 4, generator=torch.Generator().manual_seed(5))
    zv = z.clone().requires_grad_(True)
    zt = torch.stack([z[0], -z[1]]).requires_grad_(True)  # pair 0: z_v == z_t; pair 1: z_v == −z_t
    u, g = agreement_discrepancy(zv, zt)
    assert g[0].abs().max() == 0 and u[1].abs().max() == 0
    (
        u.sum()
        + g.sum()
        + geodesic_kernel_energy(u, torch.randn(3, 4))
        + geodesic_kernel_energy(g, g.detach())
    ).backward()
    assert _finite_grads(zv, zt)


# ============================================================================================ contrastive
def _clip_loop(zv: torch.Tensor, zt: torch.Tensor, scale: float) -> float:
    V, T = _rows(zv), _rows(zt)
    n = len(V)
    s = [[scale * _cos(V[i], T[j]) for j in range(n)] for i in range(n)]
    i2t = sum(-s[i][i] + math.log(sum(math.exp(s[i][j]) for j in range(n))) for i in range(n)) / n
    t2i = sum(-s[j][j] + math.log(sum(math.exp(s[i][j]) for i in range(n))) for j in range(n)) / n
    return 0.5 * (i2t + t2i)


def _sigmoid_loop(zv: torch.Tensor, zt: torch.Tensor, scale: float, bias: float) -> float:
    V, T = _rows(zv), _rows(zt)
    n = len(V)
    total = 0.0
    for i in range(n):
        for j in range(n):
            y = 1.0 if i == j else -1.0
            total += math.log(1 + math.exp(-y * (scale * _cos(V[i], T[j]) + bias)))  # −log σ(y·logit)
    return total / n


def test_clip_contrastive_loss_matches_loop():
    g = torch.Generator().manual_seed(6)
    zv, zt = (
        torch.randn(5, 4, generator=g, dtype=torch.float64),
        torch.randn(5, 4, generator=g, dtype=torch.float64),
    )
    assert clip_contrastive_loss(zv, zt, 1 / 0.07).item() == pytest.approx(
        _clip_loop(zv, zt, 1 / 0.07), rel=1e-10
    )
    # an asymmetric case: image→text and text→image differ, so a one-sided loss would not match
    zt2 = zt.clone()
    zt2[0] = zv[1]
    assert clip_contrastive_loss(zv, zt2, 3.0).item() == pytest.approx(_clip_loop(zv, zt2, 3.0), rel=1e-10)
    # a learnable multiplier gets its gradient
    scale = torch.tensor(10.0, dtype=torch.float64, requires_grad=True)
    clip_contrastive_loss(zv, zt, scale).backward()
    assert scale.grad is not None and scale.grad != 0


def test_sigmoid_contrastive_loss_matches_loop():
    g = torch.Generator().manual_seed(7)
    zv, zt = (
        torch.randn(4, 6, generator=g, dtype=torch.float64),
        torch.randn(4, 6, generator=g, dtype=torch.float64),
    )
    got = sigmoid_contrastive_loss(zv, zt, 10.0, -5.0)
    assert got.item() == pytest.approx(_sigmoid_loop(zv, zt, 10.0, -5.0), rel=1e-10)
    got_t = sigmoid_contrastive_loss(
        zv, zt, torch.tensor(7.0, dtype=torch.float64), torch.tensor(-2.0, dtype=torch.float64)
    )
    assert got_t.item() == pytest.approx(_sigmoid_loop(zv, zt, 7.0, -2.0), rel=1e-10)


def test_contrastive_losses_reject_bad_arguments():
    zv = torch.randn(4, 3)
    with pytest.raises(ValueError, match="same batch size"):
        clip_contrastive_loss(zv, torch.randn(5, 3), 10.0)
    with pytest.raises(ValueError, match="exponentiated"):
        clip_contrastive_loss(zv, zv, -2.0)
    with pytest.raises(ValueError, match="scalar"):
        sigmoid_contrastive_loss(zv, zv, torch.ones(2), 0.0)


# ============================================================================================ MDMLoss
def _batches(m=4, n=9, d=6, seed=8):
    g = torch.Generator().manual_seed(seed)
    real = (torch.randn(n, d, generator=g), torch.randn(n, d, generator=g))
    syn = (
        torch.randn(m, d, generator=g, requires_grad=True),
        torch.randn(m, d, generator=g, requires_grad=True),
    )
    return real, syn


def test_mdm_loss_is_the_weighted_sum_of_its_terms():
    (rv, rt), (sv, st) = _batches()
    out = MDMLoss(lambda_contrastive=1.0, lambda_agreement=0.8, lambda_discrepancy=0.3, sigma=0.6)(
        rv, rt, sv, st
    )
    u_r = rv / rv.norm(dim=-1, keepdim=True) + rt / rt.norm(dim=-1, keepdim=True)  # _gke_loop normalises rows
    u_s = sv / sv.norm(dim=-1, keepdim=True) + st / st.norm(dim=-1, keepdim=True)
    g_r = rv / rv.norm(dim=-1, keepdim=True) - rt / rt.norm(dim=-1, keepdim=True)
    g_s = sv / sv.norm(dim=-1, keepdim=True) - st / st.norm(dim=-1, keepdim=True)
    nce = _clip_loop(sv.detach(), st.detach(), 1 / 0.07)
    agr, dis = _gke_loop(u_r, u_s.detach(), 0.6), _gke_loop(g_r, g_s.detach(), 0.6)
    assert out.contrastive.item() == pytest.approx(nce, rel=1e-5)
    assert out.agreement.item() == pytest.approx(agr, rel=1e-4)
    assert out.discrepancy.item() == pytest.approx(dis, rel=1e-4)
    assert out.loss.item() == pytest.approx(nce + 0.8 * agr + 0.3 * dis, rel=1e-5)
    out.loss.backward()
    assert _finite_grads(sv, st)


def test_mdm_loss_real_side_and_teacher_scale_get_no_gradient():
    (rv, rt), (sv, st) = _batches()
    rv.requires_grad_(True)
    scale = torch.tensor(20.0, requires_grad=True)
    MDMLoss(temperature=None)(rv, rt, sv, st, logit_scale=scale).loss.backward()
    assert rv.grad is None and scale.grad is None and _finite_grads(sv, st)


def test_mdm_loss_teacher_scale_and_siglip():
    (rv, rt), (sv, st) = _batches()
    out = MDMLoss(temperature=None)(rv, rt, sv, st, logit_scale=torch.tensor(20.0))
    assert out.contrastive.item() == pytest.approx(_clip_loop(sv.detach(), st.detach(), 20.0), rel=1e-5)
    out = MDMLoss(contrastive="siglip")(
        rv, rt, sv, st, logit_scale=torch.tensor(12.0), logit_bias=torch.tensor(-4.0)
    )
    assert out.contrastive.item() == pytest.approx(
        _sigmoid_loop(sv.detach(), st.detach(), 12.0, -4.0), rel=1e-5
    )


def test_mdm_loss_zero_weights_skip_terms(monkeypatch):
    calls = []
    real_gke = losses.geodesic_kernel_energy
    monkeypatch.setattr(
        losses, "geodesic_kernel_energy", lambda *a, **k: calls.append(1) or real_gke(*a, **k)
    )
    (rv, rt), (sv, st) = _batches()
    out = MDMLoss(lambda_agreement=0.0, lambda_discrepancy=0.0)(rv, rt, sv, st)
    assert calls == [] and out.agreement.item() == 0 and out.discrepancy.item() == 0
    assert out.loss.item() == pytest.approx(out.contrastive.item())
    # contrastive off: no logit scale needed even with temperature=None
    out = MDMLoss(lambda_contrastive=0.0, lambda_discrepancy=0.0, temperature=None)(rv, rt, sv, st)
    assert len(calls) == 1 and out.contrastive.item() == 0
    assert out.loss.item() == pytest.approx(0.8 * out.agreement.item())


def test_mdm_loss_errors():
    (rv, rt), (sv, st) = _batches()
    with pytest.raises(ValueError, match="lambda_agreement"):
        MDMLoss(lambda_agreement=-1.0)
    with pytest.raises(ValueError, match="all three weights are 0"):
        MDMLoss(0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="contrastive="):
        MDMLoss(contrastive="triplet")
    with pytest.raises(ValueError, match="sigma"):
        MDMLoss(sigma=0.0)
    with pytest.raises(ValueError, match="temperature"):
        MDMLoss(temperature=0.0)
    with pytest.raises(ValueError, match="logit_scale"):
        MDMLoss(temperature=None)(rv, rt, sv, st)
    with pytest.raises(ValueError, match="logit_bias"):
        MDMLoss(contrastive="siglip")(rv, rt, sv, st, logit_scale=10.0)
    with pytest.raises(ValueError, match="synthetic pairs"):
        MDMLoss()(rv, rt, sv, st[:2])
    with pytest.raises(ValueError, match="real vs synthetic"):
        MDMLoss()(rv[:, :3], rt[:, :3], sv, st)


def test_mdm_loss_contrastive_pairs_replace_only_the_contrastive_term():
    (rv, rt), (sv, st) = _batches()
    bv, bt = torch.randn(5, sv.shape[1], requires_grad=True), torch.randn(5, st.shape[1], requires_grad=True)
    plain = MDMLoss()(rv, rt, sv, st)
    assert torch.equal(MDMLoss()(rv, rt, sv, st, contrastive_pairs=(sv, st)).loss, plain.loss)
    out = MDMLoss()(rv, rt, sv, st, contrastive_pairs=(bv, bt))
    assert out.contrastive.item() == pytest.approx(_clip_loop(bv.detach(), bt.detach(), 1 / 0.07), rel=1e-5)
    assert torch.equal(out.agreement, plain.agreement) and torch.equal(out.discrepancy, plain.discrepancy)
    out.loss.backward()
    assert _finite_grads(sv, st, bv, bt)
    with pytest.raises(ValueError, match="contrastive pairs"):
        MDMLoss()(rv, rt, sv, st, contrastive_pairs=(bv, bt[:2]))


# ============================================================================================ blending (§7)
def test_blend_matches_a_hand_worked_case():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]])
    y = torch.tensor([[3.0], [6.0], [9.0]])
    bx, by = blend(
        (x, y), 0.25, torch.tensor([2, 0, 1])
    )  # row i mixes pair i (0.25) with pair perm[i] (0.75)
    assert _rows(bx) == [[1.75, 1.5], [0.75, 0.25], [0.5, 1.25]]
    assert _rows(by) == [[7.5], [3.75], [6.75]]
    same = blend((x,), 1.0, torch.tensor([1, 2, 0]))[0]
    assert torch.equal(same, x)
    with pytest.raises(ValueError, match="rows"):
        blend((x, y[:2]), 0.5, torch.tensor([2, 0, 1]))
    with pytest.raises(ValueError, match="lam"):
        blend((x,), 1.5, torch.tensor([2, 0, 1]))


def test_blend_gradient_reaches_both_rows_of_a_pair():
    x = torch.randn(3, 4, requires_grad=True)
    blend((x,), 0.25, torch.tensor([1, 0, 2]))[0][0].sum().backward()  # row 0 = 0.25 x0 + 0.75 x1
    assert torch.allclose(x.grad.sum(dim=1), torch.tensor([0.25 * 4, 0.75 * 4, 0.0]))


def test_draw_blend_is_seeded_and_beta_distributed():
    draws = [draw_blend(6, 1.0, torch.Generator().manual_seed(5)) for _ in range(2)]
    assert draws[0][0] == draws[1][0] and torch.equal(draws[0][1], draws[1][1])  # same seed, same draw
    assert sorted(draws[0][1].tolist()) == list(range(6))
    gen = torch.Generator().manual_seed(0)
    uniform = [draw_blend(4, 1.0, gen)[0] for _ in range(2000)]  # Beta(1, 1) = U(0, 1)
    assert all(0.0 <= lam <= 1.0 for lam in uniform)
    assert sum(uniform) / len(uniform) == pytest.approx(0.5, abs=0.03)
    assert sum(lam < 0.25 for lam in uniform) / len(uniform) == pytest.approx(0.25, abs=0.03)
    # Beta(0.2, 0.2) is U-shaped: most draws sit near 0 or 1
    edge = [draw_blend(4, 0.2, gen)[0] for _ in range(500)]
    assert sum(lam < 0.1 or lam > 0.9 for lam in edge) / len(edge) > 0.5
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="alpha"):
            draw_blend(4, bad, gen)
    with pytest.raises(ValueError, match="batch_size"):
        draw_blend(0, 1.0, gen)
