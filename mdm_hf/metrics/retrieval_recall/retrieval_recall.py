"""Image–text retrieval recall (IR@k / TR@k) as a Hugging Face ``evaluate`` metric module.

Self-contained on purpose: the module is loaded by file path (``evaluate.load(<this folder>)``) or published as a
Hub metric, where ``mdm_hf`` may not be installed, so it needs numpy only (``evaluate`` and ``datasets`` for the
``evaluate.Metric`` class, when they are installed). The numbers are those of ``mdm_hf.retrieval.retrieval_metrics``
(the same definition and tie rule, in numpy; the package's tests compare both on random inputs)::

    import evaluate

    recall = evaluate.load("path/to/retrieval_recall")
    recall.compute(text_embeds=text_embeds, text_to_image=text_to_image, image_embeds=image_embeds)

Without ``evaluate``, import this file and call :func:`retrieval_recall` directly.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import numpy as np

try:  # only the evaluate.Metric wrapper needs them; the computation below is numpy alone
    import datasets
    import evaluate
except ImportError:
    datasets = evaluate = None

__all__ = ["retrieval_recall", "retrieval_recall_ranks"]

# The MDM paper (the same entry as mdm_hf.cards.MDM_BIBTEX; copied because this file stands alone).
_CITATION = """\
@inproceedings{jeong2026mdm,
  title     = {Multimodal Distribution Matching for Vision-Language Dataset Distillation},
  author    = {Jeong, Jongoh and Kwon, Hoyong and Kim, Minseok and Yoon, Kuk-Jin},
  booktitle = {Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  year      = {2026},
  eprint    = {2605.23482},
  archivePrefix = {arXiv}
}
"""

_DESCRIPTION = """\
Recall@k for image-text retrieval with cosine similarity. IR@k (text to image): percentage of captions whose
own image ranks in the top k images. TR@k (image to text): percentage of images (with at least one caption)
for which any of their captions ranks in the top k captions. `mean` averages all reported recalls. Ties count
against the model: a target's rank is the number of other gallery items with similarity >= its own.
"""

_KWARGS_DESCRIPTION = """\
Args:
    text_embeds: one embedding per caption, shape [N_txt, d] (a row per caption; may be streamed with
        `add_batch(text_embeds=..., text_to_image=...)`).
    text_to_image: for each caption, the row index of its image in `image_embeds`.
    image_embeds: keyword argument of `compute`, shape [N_img, d] (the whole image gallery).
    ks: cut-offs, default (1, 5, 10).
    chunk_size: queries scored per block (memory bound), default 1024.
Returns:
    dict with `ir@k` and `tr@k` for each k and `mean`, in percent.
Examples:
    >>> recall = evaluate.load("path/to/retrieval_recall")
    >>> recall.compute(text_embeds=[[1.0, 0.0], [0.0, 1.0]], text_to_image=[0, 1],
    ...                image_embeds=[[1.0, 0.0], [0.0, 1.0]], ks=[1])
    {'ir@1': 100.0, 'tr@1': 100.0, 'mean': 100.0}
"""


def _embeddings(name: str, values) -> np.ndarray:
    try:
        array = np.asarray(values)
    except ValueError as err:  # numpy >= 1.24 refuses rows of different lengths
        raise ValueError(f"every {name} row must have the same dimension d ({err}).") from err
    if array.dtype == object:  # older numpy makes an object array of them
        raise ValueError(f"every {name} row must have the same dimension d.")
    if array.ndim != 2 or 0 in array.shape:
        raise ValueError(f"{name} must be a non-empty 2-D array [N, d], got shape {array.shape}.")
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise ValueError(f"{name} must be real-valued, got dtype {array.dtype}.")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contains NaN or inf; check the model outputs before evaluating.")
    return array


def _normalised(array: np.ndarray, dtype) -> np.ndarray:
    array = array.astype(dtype, copy=False)
    norms = np.linalg.norm(array, axis=1, keepdims=True)
    return array / np.maximum(norms, np.asarray(1e-12, dtype=dtype))  # as torch.nn.functional.normalize


def retrieval_recall_ranks(image_embeds, text_embeds, text_to_image, chunk_size: int = 1024):
    """0-based ranks, ties against the model: ``ir[j]`` counts the other images at least as similar to caption
    ``j`` as its own image; ``tr[i]`` counts the captions of other images at least as similar to image ``i`` as
    its best caption (``-1`` for an image without a caption)."""
    img, txt = _embeddings("image_embeds", image_embeds), _embeddings("text_embeds", text_embeds)
    if img.shape[1] != txt.shape[1]:
        raise ValueError(
            f"image_embeds has dimension {img.shape[1]} but text_embeds has {txt.shape[1]}; both must live in "
            "the shared (projected) embedding space."
        )
    t2i = np.asarray(text_to_image)
    if t2i.ndim != 1 or t2i.shape[0] != txt.shape[0]:
        raise ValueError(
            f"text_to_image must be 1-D with one image index per caption ({txt.shape[0]}), got shape {t2i.shape}."
        )
    if not np.issubdtype(t2i.dtype, np.integer):
        raise ValueError(f"text_to_image must hold integer image indices, got dtype {t2i.dtype}.")
    t2i = t2i.astype(np.int64)
    if t2i.min() < 0 or t2i.max() >= img.shape[0]:
        raise ValueError(
            f"text_to_image values must be in [0, {img.shape[0]}) (row indices of image_embeds), got range "
            f"[{t2i.min()}, {t2i.max()}]."
        )
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}.")
    dtype = np.float64 if np.float64 in (img.dtype, txt.dtype) else np.float32
    img, txt = _normalised(img, dtype), _normalised(txt, dtype)

    ir = np.empty(len(txt), dtype=np.int64)
    for s in range(0, len(txt), chunk_size):
        sims = txt[s : s + chunk_size] @ img.T
        target = np.take_along_axis(sims, t2i[s : s + chunk_size, None], axis=1)
        ir[s : s + chunk_size] = (sims >= target).sum(axis=1) - 1  # minus the target itself

    tr = np.full(len(img), -1, dtype=np.int64)
    for s in range(0, len(img), chunk_size):
        sims = img[s : s + chunk_size] @ txt.T
        own = t2i[None, :] == np.arange(s, s + len(sims))[:, None]  # [chunk, N_txt]: the image's own captions
        best = np.where(own, sims, -np.inf).max(axis=1, keepdims=True)
        rank = ((sims >= best) & ~own).sum(axis=1)  # only captions of other images count
        tr[s : s + len(sims)] = np.where(own.any(axis=1), rank, -1)
    return ir, tr


def retrieval_recall(
    image_embeds, text_embeds, text_to_image, ks: Sequence[int] = (1, 5, 10), chunk_size: int = 1024
) -> dict[str, float]:
    """``{"ir@k", ..., "tr@k", ..., "mean"}`` in percent (see the module docstring and ``_DESCRIPTION``)."""
    if isinstance(ks, (str, bytes)) or not isinstance(ks, Sequence) or len(ks) == 0:
        raise ValueError(f"ks must be a non-empty sequence of positive integers, got {ks!r}.")
    if any(isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1 for k in ks):
        raise ValueError(f"ks must contain positive integers, got {ks!r}.")
    if len(set(ks)) != len(ks):
        raise ValueError(f"ks has duplicates: {ks!r}.")
    ir, tr = retrieval_recall_ranks(image_embeds, text_embeds, text_to_image, chunk_size)
    tr = tr[tr >= 0]
    out = {f"ir@{k}": 100.0 * float((ir < k).mean()) for k in ks}
    out.update({f"tr@{k}": 100.0 * float((tr < k).mean()) for k in ks})
    out["mean"] = sum(out.values()) / len(out)
    return out


if evaluate is not None:

    @evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
    class RetrievalRecall(evaluate.Metric):
        """Caption rows are the metric's features; the image gallery is passed to ``compute`` as a keyword."""

        def _info(self) -> evaluate.MetricInfo:
            return evaluate.MetricInfo(
                description=_DESCRIPTION,
                citation=_CITATION,
                inputs_description=_KWARGS_DESCRIPTION,
                features=datasets.Features(
                    {
                        "text_embeds": datasets.Sequence(datasets.Value("float32")),
                        "text_to_image": datasets.Value("int64"),
                    }
                ),
                reference_urls=["https://arxiv.org/abs/2605.23482"],
            )

        def _compute(self, text_embeds, text_to_image, image_embeds=None, ks=(1, 5, 10), chunk_size=1024):
            if image_embeds is None:
                raise ValueError(
                    "retrieval_recall needs the image gallery: call compute(..., image_embeds=<[N_img, d] array>)."
                )
            # Captions are stored in Arrow as float32, so the gallery is compared in float32 too.
            return retrieval_recall(
                _embeddings("image_embeds", image_embeds).astype(np.float32),
                _embeddings("text_embeds", text_embeds).astype(np.float32),
                text_to_image,
                ks=list(ks),
                chunk_size=chunk_size,
            )
