"""Model level (docs/method.md §2): Model Stock against hand-worked closed forms; LoRA offsets; the expert bank."""

import itertools
import math

import pytest
import torch
from torch import nn

from mdm_hf.merge import ExpertBank, LowRankDelta, merge_deltas, model_stock_merge, model_stock_ratio


def _hand_t(ds: list[list[float]]) -> float:
    """Model Stock's ratio in plain Python: pairwise cosines of the offsets (0 with a zero offset), mean, ratio."""
    norm = [math.sqrt(sum(x * x for x in d)) for d in ds]
    cos = [
        sum(x * y for x, y in zip(ds[i], ds[j])) / (norm[i] * norm[j]) if norm[i] * norm[j] > 0 else 0.0
        for i, j in itertools.combinations(range(len(ds)), 2)
    ]
    c = max(0.0, min(1.0, sum(cos) / len(cos)))
    return len(ds) * c / (1 + (len(ds) - 1) * c)


def _hand_merge(w0: list[float], ws: list[list[float]], alpha: float) -> list[float]:
    t, k = _hand_t([[a - b for a, b in zip(w, w0)] for w in ws]), len(ws)
    return [w0[p] + alpha * t * (sum(w[p] for w in ws) / k - w0[p]) for p in range(len(w0))]


def _t(values, dtype=torch.float64) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


# ============================================================================================ ratio
def test_model_stock_ratio_closed_form():
    assert model_stock_ratio(0.5, 2) == pytest.approx(2 / 3)
    assert model_stock_ratio(0.25, 3) == pytest.approx(0.75 / 1.5)
    assert model_stock_ratio(1.0, 4) == pytest.approx(1.0)
    assert model_stock_ratio(0.0, 2) == 0.0
    assert model_stock_ratio(-0.9, 2) == 0.0  # the raw formula gives −18 here: clamped to the anchor
    assert float(model_stock_ratio(torch.tensor(0.5), 2)) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="at least 2"):
        model_stock_ratio(0.5, 1)


# ============================================================================================ full state dicts
def test_k2_orthogonal_identical_and_known_angle():
    w0 = {"w": _t([1.0, 2.0])}
    # orthogonal offsets: cos 0, t 0, the anchor
    out = model_stock_merge(w0, [{"w": _t([2.0, 2.0])}, {"w": _t([1.0, 5.0])}])
    assert torch.equal(out["w"], w0["w"])
    # identical offsets: t 1, the expert itself
    out = model_stock_merge(w0, [{"w": _t([3.0, 1.0])}, {"w": _t([3.0, 1.0])}])
    assert torch.allclose(out["w"], _t([3.0, 1.0]))
    # 60°: d1 = (1, 0), d2 = 2·(cos 60°, sin 60°) -> cos 0.5, t 2/3, mean offset (1, √3)/2 ... scaled below
    d2 = (2 * 0.5, 2 * math.sqrt(3) / 2)
    out = model_stock_merge(w0, [{"w": _t([2.0, 2.0])}, {"w": _t([1.0 + d2[0], 2.0 + d2[1]])}])
    mean_offset = ((1.0 + d2[0]) / 2, d2[1] / 2)
    expected = [1.0 + 2 / 3 * mean_offset[0], 2.0 + 2 / 3 * mean_offset[1]]
    assert out["w"].tolist() == pytest.approx(expected, abs=1e-12)


def test_k3_pairwise_mean_cosine_and_alpha():
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(3, 4, generator=g, dtype=torch.float64)
    common = torch.randn(3, 4, generator=g, dtype=torch.float64)  # a shared direction: positive cosines
    ws = [w0 + common + 0.7 * torch.randn(3, 4, generator=g, dtype=torch.float64) for _ in range(3)]
    out = model_stock_merge({"l": w0}, [{"l": w} for w in ws], alpha=0.5)["l"]
    expected = _hand_merge(w0.flatten().tolist(), [w.flatten().tolist() for w in ws], alpha=0.5)
    assert out.flatten().tolist() == pytest.approx(expected, abs=1e-12)
    assert not torch.allclose(out, w0)  # a real interpolation, not the anchor by accident


def test_partially_zero_offsets_count_as_orthogonal():
    w0 = _t([0.0, 0.0, 1.0])
    ws = [_t([1.0, 1.0, 1.0]), _t([1.0, 2.0, 1.0]), w0.clone()]  # expert 2 left this tensor alone
    out = model_stock_merge({"l": w0}, [{"l": w} for w in ws])["l"]
    assert out.tolist() == pytest.approx(_hand_merge(w0.tolist(), [w.tolist() for w in ws], 1.0), abs=1e-12)


def test_untouched_int_and_dtype_handling():
    w0 = {
        "frozen": torch.randn(3),
        "position_ids": torch.arange(5),
        "half": torch.randn(4, dtype=torch.bfloat16),
    }
    e1 = {"frozen": w0["frozen"].clone(), "position_ids": torch.arange(5) + 7, "half": w0["half"] + 1}
    e2 = {"frozen": w0["frozen"].clone(), "position_ids": torch.arange(5) * 3, "half": w0["half"] + 1}
    out = model_stock_merge(w0, [e1, e2])
    assert out["frozen"] is w0["frozen"] and out["position_ids"] is w0["position_ids"]
    assert out["half"].dtype == torch.bfloat16
    assert torch.equal(out["half"], e1["half"])  # identical offsets: t = 1


def test_state_dict_errors_and_allow_shape_mismatch():
    w0 = {"a": torch.zeros(2, 3), "b": torch.zeros(4)}
    good = {"a": torch.ones(2, 3), "b": torch.ones(4)}
    with pytest.raises(ValueError, match=r"'a'.*\(3, 2\).*\(2, 3\)"):
        model_stock_merge(w0, [good, {"a": torch.ones(3, 2), "b": torch.ones(4)}])
    out = model_stock_merge(
        w0, [good, {"a": torch.ones(3, 2), "b": torch.ones(4)}], allow_shape_mismatch=True
    )
    assert out["a"] is w0["a"] and torch.equal(out["b"], torch.ones(4))
    with pytest.raises(ValueError, match="lacks anchor key 'b'"):
        model_stock_merge(w0, [good, {"a": torch.ones(2, 3)}])
    with pytest.raises(ValueError, match="'c' the anchor lacks"):
        model_stock_merge(w0, [good, {**good, "c": torch.ones(1)}])
    with pytest.raises(ValueError, match="k ≥ 2"):
        model_stock_merge(w0, [good])


# ============================================================================================ offsets and LoRA
def _lora(out: int, inp: int, r: int, scale: float, g: torch.Generator) -> LowRankDelta:
    return LowRankDelta(
        torch.randn(r, inp, generator=g, dtype=torch.float64),
        torch.randn(out, r, generator=g, dtype=torch.float64),
        scale,
    )


def test_merge_deltas_lowrank_equals_dense_model_stock():
    g = torch.Generator().manual_seed(1)
    anchor = {
        "lin.weight": torch.randn(5, 4, generator=g, dtype=torch.float64),
        "lin.bias": torch.zeros(5, dtype=torch.float64),
    }
    shared = _lora(5, 4, 2, 1.0, g).dense()
    deltas = [
        {"lin.weight": _lora(5, 4, 2, 0.5, g), "lin.bias": torch.ones(5, dtype=torch.float64)},
        {"lin.weight": _lora(5, 4, 3, 2.0, g)},  # no bias offset: zero for this expert
        {
            "lin.weight": shared + _lora(5, 4, 2, 0.3, g).dense(),
            "lin.bias": torch.arange(5.0, dtype=torch.float64),
        },
    ]
    merged, ratios = merge_deltas(anchor, deltas, alpha=0.5)
    dense_experts = [
        {k: anchor[k] + (d[k].dense() if isinstance(d.get(k), LowRankDelta) else d.get(k, 0)) for k in anchor}
        for d in deltas
    ]
    reference = model_stock_merge(anchor, dense_experts, alpha=0.5)
    assert set(merged) == {"lin.weight", "lin.bias"}
    for key in anchor:
        assert torch.allclose(merged[key], reference[key], atol=1e-12)
    for key in anchor:
        offsets = [(e[key] - anchor[key]).flatten().tolist() for e in dense_experts]
        assert ratios[key] == pytest.approx(_hand_t(offsets), rel=1e-9)
    assert 0 < ratios["lin.weight"] < 1


def test_angles_are_taken_on_delta_w_not_on_the_factors():
    g = torch.Generator().manual_seed(2)
    w0 = {"w": torch.randn(6, 5, generator=g, dtype=torch.float64)}
    a, b = (
        torch.randn(2, 5, generator=g, dtype=torch.float64),
        torch.randn(6, 2, generator=g, dtype=torch.float64),
    )
    m = torch.tensor([[2.0, 1.0], [-1.0, 3.0]], dtype=torch.float64)
    # the same ΔW, factorised differently: cos(ΔW) = 1 -> t = 1, though A and B point elsewhere
    same = [LowRankDelta(a, b, 1.0), LowRankDelta(m @ a, b @ torch.linalg.inv(m), 1.0)]
    merged, ratios = merge_deltas(w0, [{"w": d} for d in same])
    assert ratios["w"] == pytest.approx(1.0)
    assert torch.allclose(merged["w"], w0["w"] + b @ a)
    # the same A, B flipped in sign: ΔW anti-parallel (t = 0), while cos(A, A) = 1 would give t = 1
    flipped = [LowRankDelta(a, b, 1.0), LowRankDelta(a, -b, 1.0)]
    merged, ratios = merge_deltas(w0, [{"w": d} for d in flipped])
    assert ratios["w"] == 0.0 and torch.allclose(merged["w"], w0["w"])
    # scale enters ΔW: a larger scale on one expert does not change the angle, but changes the mean offset
    scaled = [LowRankDelta(a, b, 1.0), LowRankDelta(a, b, 3.0)]
    merged, ratios = merge_deltas(w0, [{"w": d} for d in scaled])
    assert ratios["w"] == pytest.approx(1.0) and torch.allclose(merged["w"], w0["w"] + 2.0 * (b @ a))


def test_lowrank_delta_and_merge_deltas_errors():
    with pytest.raises(ValueError, match="same r"):
        LowRankDelta(torch.zeros(2, 4), torch.zeros(3, 3), 1.0)
    d = LowRankDelta(torch.ones(2, 4), torch.ones(3, 2), 0.5)
    assert d.shape == (3, 4) and torch.equal(d.dense(), torch.full((3, 4), 1.0))
    with pytest.raises(ValueError, match="anchor does not have"):
        merge_deltas({"w": torch.zeros(3, 4)}, [{"w": d}, {"x": d}])
    with pytest.raises(ValueError, match=r"shape \(3, 4\).*\(4, 3\)"):
        merge_deltas({"w": torch.zeros(4, 3)}, [{"w": d}, {"w": d}])


# ============================================================================================ the bank
def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))


def _bank(net: nn.Sequential, epochs=(3, 2)) -> ExpertBank:
    g = torch.Generator().manual_seed(3)
    anchor = {k: v.detach().clone() for k, v in net.state_dict().items()}
    a, b, bias = torch.randn(1, 4, generator=g), torch.randn(3, 1, generator=g), torch.randn(3, generator=g)
    noise = lambda x: x + 0.3 * torch.randn(x.shape, generator=g)  # noqa: E731 - shared direction: cos > 0
    experts = [
        [
            {
                "0.weight": LowRankDelta(noise(a), noise(b), 2.0),
                **({"0.bias": noise(bias)} if i == 1 else {}),
            }
            for _ in range(n)
        ]
        for i, n in enumerate(epochs)
    ]
    return ExpertBank(anchor, experts, names=["a", "b"])


def test_bank_sampling_is_deterministic_and_in_range():
    bank = _bank(_net(), epochs=(3, 2))
    assert bank.num_experts == 2 and bank.num_epochs(0) == 3 and bank.touched_keys == ["0.weight", "0.bias"]
    draws = bank.sample(torch.Generator().manual_seed(5), k=2)
    assert draws == bank.sample(torch.Generator().manual_seed(5), k=2)
    many = [d for s in range(60) for d in bank.sample(torch.Generator().manual_seed(s), k=3)]
    assert {i for i, _ in many} == {0, 1}
    assert {e for i, e in many if i == 0} == {1, 2, 3} and {e for i, e in many if i == 1} == {1, 2}
    capped = [d for s in range(40) for d in bank.sample(torch.Generator().manual_seed(s), max_start_epoch=2)]
    assert max(e for _, e in capped) == 2
    with pytest.raises(ValueError, match="k ≥ 2"):
        bank.sample(torch.Generator(), k=1)
    with pytest.raises(ValueError, match="max_start_epoch"):
        bank.sample(torch.Generator(), max_start_epoch=0)


def test_bank_install_is_in_place_and_restore_is_exact():
    net = _net()
    before = {k: v.detach().clone() for k, v in net.state_dict().items()}
    ptrs = {k: p.data_ptr() for k, p in net.named_parameters()}
    bank = _bank(net).to("cpu")
    info = bank.draw(net, torch.Generator().manual_seed(1), k=2, alpha=0.5)
    state, ratios = bank.merged_state(info["draws"], alpha=0.5)
    assert info["mean_t"] == pytest.approx(sum(ratios.values()) / len(ratios))
    assert {k: p.data_ptr() for k, p in net.named_parameters()} == ptrs
    for key, p in net.named_parameters():
        if key in bank.touched_keys:
            assert torch.equal(p.detach(), state[key])
        else:
            assert torch.equal(p.detach(), before[key])
    assert not torch.equal(net[0].weight.detach(), before["0.weight"])
    bank.restore_anchor(net)
    for key, p in net.named_parameters():
        assert torch.equal(p.detach(), before[key]) and p.data_ptr() == ptrs[key]


def test_bank_teacher_leaves_no_trace_and_matches_merge_deltas():
    net = _net()
    bank = _bank(net)
    anchor_bias = net[0].bias.detach().clone()
    bank.install(net, bank.merged_state([(1, 1), (1, 2)])[0])  # expert 1 changes the bias
    assert not torch.equal(net[0].bias.detach(), anchor_bias)
    state, ratios = bank.merged_state([(0, 1), (0, 3)])  # expert 0 never touches the bias
    assert set(ratios) == {"0.weight"} and torch.equal(state["0.bias"], anchor_bias)
    bank.install(net, state)
    assert torch.equal(net[0].bias.detach(), anchor_bias)
    anchor = {k: v.detach().clone() for k, v in _net().state_dict().items()}
    ref, _ = merge_deltas(anchor, [bank._experts[0][0], bank._experts[0][2]])
    assert torch.allclose(state["0.weight"], ref["0.weight"])


def test_bank_stores_clones_and_raises_clear_errors():
    net = _net()
    anchor = dict(net.state_dict())
    delta = {"0.weight": torch.ones(3, 4)}
    bank = ExpertBank(anchor, [[delta], [delta]])
    with torch.no_grad():
        net[0].weight.add_(1.0)  # the caller's tensors change; the bank's anchor must not
    bank.restore_anchor(net)
    assert torch.equal(net[0].weight.detach(), _net()[0].weight.detach())
    assert bank.names == ["expert-0", "expert-1"]
    with pytest.raises(ValueError, match="'2.weight' matches no anchor"):
        ExpertBank(anchor, [[{"2.weight": torch.ones(1)}]])
    with pytest.raises(ValueError, match=r"'0.bias' has shape \(4,\)"):
        ExpertBank(anchor, [[{"0.bias": torch.ones(4)}]])
    with pytest.raises(ValueError, match="2 names for 1 experts"):
        ExpertBank(anchor, [[delta]], names=["a", "b"])
    with pytest.raises(ValueError, match="no parameter 'nope'"):
        bank.install(net, {"nope": torch.ones(1)})
    with pytest.raises(ValueError, match=r"'0.weight' has shape \(4, 3\)"):
        bank.install(net, {"0.weight": torch.ones(4, 3)})
    with pytest.raises(ValueError, match="outside the bank"):
        bank.merged_state([(0, 1), (0, 2)])


# ============================================================================================ mean merge (ablation)
def test_mean_merge_is_alpha_times_the_average_offset_by_hand():
    w0, ws = [1.0, 2.0], [[2.0, 2.0], [1.0, 5.0]]  # orthogonal offsets: Model Stock keeps the anchor (t = 0)
    anchor = {"w": _t(w0)}
    deltas = [{"w": _t([a - b for a, b in zip(w, w0)])} for w in ws]
    for alpha in (1.0, 0.5):
        merged, ratios = merge_deltas(anchor, deltas, alpha, method="mean")
        expected = [
            w0[p] + alpha * ((ws[0][p] + ws[1][p]) / 2 - w0[p]) for p in range(2)
        ]  # (1.5, 3.5) at alpha 1
        assert merged["w"].tolist() == pytest.approx(expected, abs=1e-12) and ratios == {"w": 1.0}
    stock, ratios = merge_deltas(anchor, deltas, 1.0)
    assert torch.equal(stock["w"], anchor["w"]) and ratios == {"w": 0.0}
    with pytest.raises(ValueError, match="merge method 'sum'; choose one of model_stock, mean"):
        merge_deltas(anchor, deltas, 1.0, method="sum")


def test_mean_merge_of_lowrank_offsets_and_the_bank_agree_with_dense():
    g = torch.Generator().manual_seed(1)
    w0 = torch.randn(3, 4, generator=g, dtype=torch.float64)
    lows = [_lora(3, 4, 2, 1.5, g) for _ in range(3)]
    lows = [LowRankDelta(d.lora_A.double(), d.lora_B.double(), d.scale) for d in lows]
    merged, _ = merge_deltas({"w": w0}, [{"w": d} for d in lows], 0.5, method="mean")
    torch.testing.assert_close(merged["w"], w0 + 0.5 * sum(d.dense() for d in lows) / 3)
    net = _net()
    bank = _bank(net)
    state, ratios = bank.merged_state([(0, 1), (1, 2)], 0.7, method="mean")
    anchor = {k: v.detach().clone() for k, v in _net().state_dict().items()}
    ref, _ = merge_deltas(anchor, [bank._experts[0][0], bank._experts[1][1]], 0.7, method="mean")
    assert set(ratios.values()) == {1.0}
    for key in ref:
        torch.testing.assert_close(state[key], ref[key])
    # a bias only expert 1 touches: mean with expert 0's zero offset halves it
    torch.testing.assert_close(state["0.bias"], anchor["0.bias"] + 0.7 * bank._experts[1][1]["0.bias"] / 2)


def test_offset_cosines_match_a_hand_computation():
    net = _net()
    bank = _bank(net)
    cos = bank.offset_cosines([(0, 1), (1, 2)])
    d0, d1 = bank._experts[0][0]["0.weight"].dense(), bank._experts[1][1]["0.weight"].dense()
    by_hand = float((d0 * d1).sum() / (d0.norm() * d1.norm()))
    assert cos["0.weight"] == pytest.approx(by_hand, abs=1e-6)
    assert cos["0.bias"] == 0.0  # expert 0 leaves the bias: orthogonal, as in the merge
    _, ratios = bank.merged_state([(0, 1), (1, 2)])
    assert ratios["0.weight"] == pytest.approx(model_stock_ratio(by_hand, 2), abs=1e-6)
