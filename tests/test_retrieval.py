"""Retrieval recall (IR@k / TR@k) against brute-force rankings, a hand-worked case and the evaluate module."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from mdm_hf.retrieval import retrieval_metric_path, retrieval_metrics, retrieval_ranks


def _random_case(seed: int = 0, n_img: int = 30, d: int = 6, dtype=torch.float64):
    """Images with 0-4 captions each (so some images have none), captions = noisy copies of their image."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, 5, (n_img,), generator=g)
    counts[0] = 3  # at least one caption
    t2i = torch.repeat_interleave(torch.arange(n_img), counts)
    t2i = t2i[torch.randperm(len(t2i), generator=g)]
    img = torch.randn(n_img, d, generator=g, dtype=dtype)
    txt = img[t2i] + 1.2 * torch.randn(len(t2i), d, generator=g, dtype=dtype)
    return img, txt, t2i


def _brute_force(img, txt, t2i, ks):
    """Rank by sorting, per query, with ties broken against the target (pessimistic), in plain Python."""
    img = [np.asarray(r) / np.linalg.norm(r) for r in img.double().numpy()]
    txt = [np.asarray(r) / np.linalg.norm(r) for r in txt.double().numpy()]
    t2i = t2i.tolist()
    ir_ranks = []
    for j, t in enumerate(txt):
        sims = [float(t @ v) for v in img]
        order = sorted(range(len(img)), key=lambda i: (-sims[i], i == t2i[j]))
        ir_ranks.append(order.index(t2i[j]))
    tr_ranks = []
    for i, v in enumerate(img):
        if i not in t2i:
            continue
        sims = [float(v @ t) for t in txt]
        order = sorted(range(len(txt)), key=lambda c: (-sims[c], t2i[c] == i))
        tr_ranks.append(next(pos for pos, c in enumerate(order) if t2i[c] == i))
    out = {f"ir@{k}": 100.0 * sum(r < k for r in ir_ranks) / len(ir_ranks) for k in ks}
    out.update({f"tr@{k}": 100.0 * sum(r < k for r in tr_ranks) / len(tr_ranks) for k in ks})
    out["mean"] = sum(out.values()) / len(out)
    return out, ir_ranks, tr_ranks


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_brute_force(seed):
    img, txt, t2i = _random_case(seed)
    ks = (1, 3, 5, 10)
    expected, ir_ref, tr_ref = _brute_force(img, txt, t2i, ks)
    got = retrieval_metrics(img, txt, t2i, ks=ks)
    assert list(got) == [f"ir@{k}" for k in ks] + [f"tr@{k}" for k in ks] + ["mean"]
    assert got == pytest.approx(expected, abs=1e-9)
    ir, tr = retrieval_ranks(img, txt, t2i)
    assert ir.tolist() == ir_ref
    assert tr[tr >= 0].tolist() == tr_ref
    assert (tr < 0).sum() == sum(i not in t2i.tolist() for i in range(len(img)))
    # not a degenerate case: some hits and some misses at k=1
    assert 0 < got["ir@1"] < 100 and 0 < got["tr@1"] < 100


def test_default_keys_and_float32():
    img, txt, t2i = _random_case(3, n_img=40, dtype=torch.float32)
    got = retrieval_metrics(img, txt, t2i)
    assert list(got) == ["ir@1", "ir@5", "ir@10", "tr@1", "tr@5", "tr@10", "mean"]
    assert all(isinstance(v, float) for v in got.values())
    assert got == pytest.approx(_brute_force(img, txt, t2i, (1, 5, 10))[0], abs=1e-9)


def test_perfect_embeddings_score_100():
    n_img = 12
    img = torch.linalg.qr(torch.randn(16, 16, generator=torch.Generator().manual_seed(0)))[0][:n_img]
    t2i = torch.tensor([i for i in range(n_img) for _ in range(1 + i % 3)])
    txt = 3.0 * img[t2i]  # scale does not matter: cosine
    assert retrieval_metrics(img, txt, t2i) == {
        k: 100.0 for k in ("ir@1", "ir@5", "ir@10", "tr@1", "tr@5", "tr@10", "mean")
    }


def _at(deg: float) -> list[float]:
    return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]


def test_hand_worked_case():
    # Unit vectors in 2-D: cosine similarity orders by angular distance.
    # Images at 0, 90, 180, 270 degrees; image 3 has no caption (a distractor for IR, left out of TR).
    # Captions: c0 -> img0 at 10, c1 -> img0 at 80, c2 -> img1 at 200, c3 -> img2 at 300.
    # IR ranks (other images closer than the own one):
    #   c0 (10):  img0 10 deg away, nothing closer                   -> 0
    #   c1 (80):  img1 10 < img0 80                                   -> 1
    #   c2 (200): img2 20, img3 70 < img1 110                         -> 2
    #   c3 (300): img3 30, img0 60 < img2 120                         -> 2
    #   IR@1 = 1/4 = 25, IR@2 = 2/4 = 50, IR@3 = 4/4 = 100
    # TR ranks (captions of other images closer than the best own caption):
    #   img0 (0):   c0 10 is own and closest                           -> 0
    #   img1 (90):  c1 10, c0 80 < own c2 110                          -> 2
    #   img2 (180): c2 20, c1 100 < own c3 120                         -> 2
    #   TR@1 = 1/3, TR@2 = 1/3, TR@3 = 3/3
    img = torch.tensor([_at(0), _at(90), _at(180), _at(270)], dtype=torch.float64)
    txt = torch.tensor([_at(10), _at(80), _at(200), _at(300)], dtype=torch.float64)
    t2i = torch.tensor([0, 0, 1, 2])
    got = retrieval_metrics(img, txt, t2i, ks=(1, 2, 3))
    third = 100.0 / 3
    expected = {"ir@1": 25.0, "ir@2": 50.0, "ir@3": 100.0, "tr@1": third, "tr@2": third, "tr@3": 100.0}
    expected["mean"] = (25 + 50 + 100 + third + third + 100) / 6  # 56.94...
    assert got == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("chunk", [1, 3, 7])
def test_chunked_equals_unchunked(chunk):
    img, txt, t2i = _random_case(4, n_img=25)
    full = retrieval_ranks(img, txt, t2i, chunk_size=10_000)
    part = retrieval_ranks(img, txt, t2i, chunk_size=chunk)
    assert torch.equal(full[0], part[0]) and torch.equal(full[1], part[1])
    assert retrieval_metrics(img, txt, t2i, chunk_size=chunk) == retrieval_metrics(
        img, txt, t2i, chunk_size=10_000
    )


def test_ties_count_against_the_model():
    # Exactly representable unit vectors, so the ties are exact in any summation order.
    img = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # images 0 and 1 identical
    txt = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    t2i = torch.tensor([0, 2, 2])
    ir, tr = retrieval_ranks(img, txt, t2i)
    assert ir.tolist() == [1, 0, 0]  # caption 0 ties images 0 and 1: the tie counts against it
    # image 2's two identical captions do not compete with each other; image 1 has no caption
    assert tr.tolist() == [0, -1, 0]
    for chunk in (1, 2, 64):
        assert retrieval_ranks(img, txt, t2i, chunk_size=chunk)[0].tolist() == [1, 0, 0]
    # A collapsed encoder (every embedding the same) must not score: all ranks are the worst possible.
    n_img, n_txt = 20, 40
    same_i, same_t = torch.ones(n_img, 4), torch.ones(n_txt, 4)
    t2i = torch.arange(n_txt) % n_img
    got = retrieval_metrics(same_i, same_t, t2i)
    assert all(v == 0.0 for v in got.values())
    ir, tr = retrieval_ranks(same_i, same_t, t2i)
    assert (ir == n_img - 1).all() and (tr == n_txt - 2).all()


def test_validation_errors():
    img, txt, t2i = torch.randn(4, 3), torch.randn(6, 3), torch.tensor([0, 1, 2, 3, 0, 1])
    with pytest.raises(ValueError, match="dimension 3 but text_embeds has 5"):
        retrieval_metrics(img, torch.randn(6, 5), t2i)
    with pytest.raises(ValueError, match=r"in \[0, 4\)"):
        retrieval_metrics(img, txt, torch.tensor([0, 1, 2, 4, 0, 1]))
    with pytest.raises(ValueError, match=r"in \[0, 4\)"):
        retrieval_metrics(img, txt, torch.tensor([0, 1, 2, -1, 0, 1]))
    with pytest.raises(ValueError, match="one image index per caption"):
        retrieval_metrics(img, txt, t2i[:5])
    with pytest.raises(ValueError, match="integer image indices"):
        retrieval_metrics(img, txt, t2i.float())
    bad = txt.clone()
    bad[2, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics(img, bad, t2i)
    with pytest.raises(ValueError, match="2-D"):
        retrieval_metrics(img[0], txt, t2i)
    with pytest.raises(ValueError, match="positive integers"):
        retrieval_metrics(img, txt, t2i, ks=(0, 5))
    with pytest.raises(ValueError, match="chunk_size"):
        retrieval_metrics(img, txt, t2i, chunk_size=0)


def test_evaluate_module_loads_offline_and_matches(tmp_path):
    evaluate = pytest.importorskip("evaluate")
    path = retrieval_metric_path()
    assert (Path(path) / "retrieval_recall.py").is_file() and (Path(path) / "README.md").is_file()
    metric = evaluate.load(path, cache_dir=str(tmp_path))
    img, txt, t2i = _random_case(5, n_img=30, dtype=torch.float32)
    expected = retrieval_metrics(img, txt, t2i)
    got = metric.compute(text_embeds=txt, text_to_image=t2i, image_embeds=img)
    assert got == pytest.approx(expected, abs=1e-9)
    # caption rows streamed in batches (numpy and lists), the gallery given at compute time, custom ks
    metric.add_batch(text_embeds=txt[:10].numpy(), text_to_image=t2i[:10].numpy())
    metric.add_batch(text_embeds=txt[10:].tolist(), text_to_image=t2i[10:].tolist())
    got = metric.compute(image_embeds=img.numpy(), ks=[1, 2])
    assert got == pytest.approx(retrieval_metrics(img, txt, t2i, ks=(1, 2)), abs=1e-9)
    with pytest.raises(ValueError, match="image_embeds"):
        metric.compute(text_embeds=txt, text_to_image=t2i)
