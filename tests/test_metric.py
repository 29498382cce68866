"""The ``evaluate`` metric module (mdm_hf/metrics/retrieval_recall): self-contained, and the same numbers as
``mdm_hf.retrieval``."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from mdm_hf import cards
from mdm_hf.retrieval import retrieval_metric_path, retrieval_metrics

MODULE_FILE = Path(retrieval_metric_path()) / "retrieval_recall.py"

# Run in a fresh `python -I` (no cwd, no PYTHON* variables) where importing any of the blocked top-level packages
# fails -- the editable install of mdm_hf included -- then load the module file by path, as evaluate does.
_ISOLATED = """
import importlib.abc, importlib.util, json, sys
BLOCKED = set(sys.argv[2].split(","))

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is blocked in this test")

sys.meta_path.insert(0, Block())
for name in BLOCKED:
    try:
        __import__(name)
    except ImportError:
        pass
    else:
        raise SystemExit(f"{name} is still importable: the test proves nothing")
spec = importlib.util.spec_from_file_location("retrieval_recall", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
out = module.retrieval_recall([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], [[1.0, 0.1], [0.2, 1.0], [1.0, 0.0]],
                              [0, 1, 1], ks=[1, 2])
print(json.dumps({"recall": out, "has_metric_class": hasattr(module, "RetrievalRecall"),
                  "loaded": sorted(m for m in ("torch", "mdm_hf", "evaluate", "datasets") if m in sys.modules)}))
"""


def _run_isolated(blocked: list[str]) -> dict:
    done = subprocess.run(
        [sys.executable, "-I", "-c", _ISOLATED, str(MODULE_FILE), ",".join(blocked)],
        capture_output=True, text=True, timeout=120, cwd=str(MODULE_FILE.parent),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-500:]
    return json.loads(done.stdout.strip().splitlines()[-1])


# Hand-worked: images e0, e1 and e2 = (1, 1) (no caption: an IR distractor, out of TR); captions c0 = (1, .1) and
# c1 = (.2, 1) of their own image, c2 = (1, 0) of image 1.
# IR: c0 -> e0 and c1 -> e1 first; c2 has e0 (cos 1) and e2 (cos .71) before its e1 (cos 0): rank 2.
#     IR@1 = IR@2 = 2/3.
# TR: e0's only caption c0 (cos .995) is beaten by image 1's c2 (cos 1): rank 1; e1's best caption c1 (cos .98)
#     beats c0 (cos .1): rank 0. TR@1 = 1/2, TR@2 = 1.
_HAND_WORKED = {"ir@1": 200 / 3, "ir@2": 200 / 3, "tr@1": 50.0, "tr@2": 100.0}
_HAND_WORKED["mean"] = sum(_HAND_WORKED.values()) / 4


def test_the_module_imports_and_computes_with_numpy_alone():
    result = _run_isolated(["mdm_hf", "torch", "evaluate", "datasets"])
    assert result["recall"] == pytest.approx(_HAND_WORKED)
    assert result["has_metric_class"] is False and result["loaded"] == []


def test_the_evaluate_metric_class_needs_no_mdm_hf():
    pytest.importorskip("evaluate")
    result = _run_isolated(["mdm_hf"])
    assert result["has_metric_class"] is True and "mdm_hf" not in result["loaded"]
    assert result["recall"] == pytest.approx(_HAND_WORKED)


def _load_module():
    spec = importlib.util.spec_from_file_location("retrieval_recall_under_test", MODULE_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _random_case(seed: int, n_img: int, n_txt: int, d: int = 8, dtype=np.float64):
    rng = np.random.default_rng(seed)
    img = rng.normal(size=(n_img, d)).astype(dtype)
    # several captions per image, some images without any (they stay IR distractors, out of TR)
    t2i = rng.integers(0, n_img - 3, size=n_txt)
    txt = (img[t2i] + 1.2 * rng.normal(size=(n_txt, d))).astype(dtype)
    return img, txt, t2i


@pytest.mark.parametrize(("dtype", "chunk_size"), [(np.float64, 1024), (np.float64, 7), (np.float32, 5)])
def test_recall_equals_mdm_hf_retrieval_on_random_inputs(dtype, chunk_size):
    module = _load_module()
    for seed in range(4):
        img, txt, t2i = _random_case(seed, n_img=40, n_txt=90, dtype=dtype)
        ks = (1, 3, 5, 10)
        got = module.retrieval_recall(img, txt, t2i, ks=ks, chunk_size=chunk_size)
        expected = retrieval_metrics(
            torch.from_numpy(img), torch.from_numpy(txt), torch.from_numpy(t2i), ks=ks
        )
        assert got == pytest.approx(expected, abs=1e-12)
        assert 0 < got["ir@1"] < got["ir@10"] < 100  # a case where the cut-offs matter
        ir, tr = module.retrieval_recall_ranks(img, txt, t2i, chunk_size=chunk_size)
        torch_ir, torch_tr = _torch_ranks(img, txt, t2i)
        np.testing.assert_array_equal(ir, torch_ir)
        np.testing.assert_array_equal(tr, torch_tr)
        assert (tr[-3:] == -1).all()  # the images without captions


def _torch_ranks(img, txt, t2i):
    from mdm_hf.retrieval import retrieval_ranks

    ir, tr = retrieval_ranks(torch.from_numpy(img), torch.from_numpy(txt), torch.from_numpy(t2i))
    return ir.numpy(), tr.numpy()


def test_ties_count_against_the_model():
    module = _load_module()
    collapsed = np.tile([[1.0, 0.0, 0.0]], (4, 1))  # every similarity exactly 1
    assert module.retrieval_recall(collapsed, collapsed, [0, 1, 2, 3], ks=[1, 3]) == {
        "ir@1": 0.0, "ir@3": 0.0, "tr@1": 0.0, "tr@3": 0.0, "mean": 0.0,
    }  # fmt: skip
    # an image's own captions never compete with each other: two identical captions of image 0 -> rank 0
    ir, tr = module.retrieval_recall_ranks(np.eye(2), [[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], [0, 0, 1])
    assert ir.tolist() == [0, 0, 0] and tr.tolist() == [0, 0]


def test_inputs_are_checked_with_the_fix_named():
    module = _load_module()
    img, txt, t2i = _random_case(0, n_img=6, n_txt=8)
    for args, kwargs, match in [
        ((img[:, :3], txt, t2i), {}, "dimension"),
        ((img, txt, t2i[:-1]), {}, "one image index per caption"),
        ((img, txt, t2i + 10), {}, r"in \[0, 6\)"),
        ((img, txt, t2i.astype(float)), {}, "integer image indices"),
        ((img, [[1.0], [1.0, 2.0]], t2i[:2]), {}, "same dimension"),
        ((img * np.nan, txt, t2i), {}, "NaN"),
        ((img, txt, t2i), {"ks": (0, 5)}, "positive integers"),
        ((img, txt, t2i), {"ks": (1, 1)}, "duplicates"),
        ((img, txt, t2i), {"chunk_size": 0}, "chunk_size"),
    ]:
        with pytest.raises(ValueError, match=match):
            module.retrieval_recall(*args, **kwargs)


def test_evaluate_load_gives_the_same_numbers_as_mdm_hf(tmp_path):
    evaluate = pytest.importorskip("evaluate")
    metric = evaluate.load(retrieval_metric_path(), cache_dir=str(tmp_path))
    img, txt, t2i = _random_case(3, n_img=30, n_txt=70, dtype=np.float32)
    expected = retrieval_metrics(torch.from_numpy(img), torch.from_numpy(txt), torch.from_numpy(t2i))
    assert metric.compute(text_embeds=txt, text_to_image=t2i, image_embeds=img) == pytest.approx(expected)
    with pytest.raises(ValueError, match="image_embeds"):
        metric.compute(text_embeds=txt, text_to_image=t2i)


def test_metric_card_front_matter_and_the_one_citation():
    readme = (MODULE_FILE.parent / "README.md").read_text(encoding="utf-8")
    assert readme.startswith("---\n")
    meta = yaml.safe_load(readme.split("---\n")[1])
    assert {"title", "emoji", "sdk", "tags", "description"} <= set(meta)
    assert {"evaluate", "metric"} <= set(meta["tags"]) and meta["sdk"] == "gradio"
    assert "Recall@k" in meta["description"]
    source = MODULE_FILE.read_text(encoding="utf-8")
    for text in (readme, source):  # the package's one BibTeX of the paper, not a variant of it
        assert cards.MDM_BIBTEX in text and text.count("@inproceedings{") == 1
    assert "import mdm_hf" not in source and "from mdm_hf" not in source
