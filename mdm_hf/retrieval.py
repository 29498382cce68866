"""Image–text retrieval recall (IR@k, TR@k), the metric of the MDM paper's evaluation (arXiv 2605.23482, §5).

- IR@k (text → image): percentage of captions whose own image is among the k most similar images.
- TR@k (image → text): percentage of images for which at least one of their captions is among the k most
  similar captions.
- ``mean``: the mean of all reported IR@k and TR@k values.

Similarity is the cosine (rows are L2-normalised inside). Ranks are computed without sorting, in query chunks,
so 5,000 images x 25,000 captions never materialise the full similarity matrix.

Tie rule (pessimistic, deterministic): the rank of a target is the number of *other* gallery items whose
similarity is **greater than or equal to** the target's; it is a hit at k when ``rank < k``. Ties therefore
count against the model: an encoder that collapses every input onto one vector scores 0, not 100 (with an
optimistic rule, every rank would be 0). For TR the target is the image's best-scoring caption and only
captions of *other* images are counted, so an image's own captions never compete with each other.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from importlib import resources
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["METRIC_NAMES", "retrieval_metric_path", "retrieval_metrics", "retrieval_ranks"]

# The keys of retrieval_metrics at the paper's cut-offs (docs/method.md §5), in table order.
METRIC_NAMES = ("ir@1", "ir@5", "ir@10", "tr@1", "tr@5", "tr@10", "mean")


def retrieval_metric_path() -> str:
    """Folder of the bundled ``evaluate`` metric module; use ``evaluate.load(retrieval_metric_path())``."""
    return str(resources.files("mdm_hf.metrics") / "retrieval_recall")


def _validate(
    image_embeds: Any, text_embeds: Any, text_to_image: Any, chunk_size: Any
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    img = torch.as_tensor(image_embeds)
    txt = torch.as_tensor(text_embeds)
    for name, t in (("image_embeds", img), ("text_embeds", txt)):
        if t.ndim != 2:
            raise ValueError(f"{name} must be a 2-D tensor [N, d], got shape {tuple(t.shape)}.")
        if t.shape[0] == 0 or t.shape[1] == 0:
            raise ValueError(
                f"{name} is empty (shape {tuple(t.shape)}); pass at least one row and dimension."
            )
        if t.is_complex():
            raise ValueError(f"{name} must be real-valued, got dtype {t.dtype}.")
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ValueError(f"{name} contains NaN or inf; check the model outputs before evaluating.")
    if img.shape[1] != txt.shape[1]:
        raise ValueError(
            f"image_embeds has dimension {img.shape[1]} but text_embeds has {txt.shape[1]}; both must live in "
            "the shared (projected) embedding space."
        )
    t2i = torch.as_tensor(text_to_image)
    if t2i.ndim != 1 or t2i.shape[0] != txt.shape[0]:
        raise ValueError(
            f"text_to_image must be 1-D with one image index per caption ({txt.shape[0]}), got shape "
            f"{tuple(t2i.shape)}."
        )
    if t2i.is_floating_point() or t2i.dtype == torch.bool or t2i.is_complex():
        raise ValueError(f"text_to_image must hold integer image indices, got dtype {t2i.dtype}.")
    t2i = t2i.long()
    if int(t2i.min()) < 0 or int(t2i.max()) >= img.shape[0]:
        raise ValueError(
            f"text_to_image values must be in [0, {img.shape[0]}) (row indices of image_embeds), got range "
            f"[{int(t2i.min())}, {int(t2i.max())}]."
        )
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}.")
    dtype = torch.float64 if torch.float64 in (img.dtype, txt.dtype) else torch.float32
    device = img.device
    img = F.normalize(img.to(device=device, dtype=dtype), dim=1)
    txt = F.normalize(txt.to(device=device, dtype=dtype), dim=1)
    return img, txt, t2i.to(device)


@torch.no_grad()
def retrieval_ranks(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    text_to_image: torch.Tensor,
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """0-based ranks under the module's pessimistic tie rule.

    Returns:
        ``(ir_ranks, tr_ranks)``: ``ir_ranks[j]`` (``[N_txt]``) is the number of other images at least as
        similar to caption j as its own image; ``tr_ranks[i]`` (``[N_img]``) is the number of captions of
        other images at least as similar to image i as its best caption, or ``-1`` for an image with no
        caption.
    """
    img, txt, t2i = _validate(image_embeds, text_embeds, text_to_image, chunk_size)
    n_img, n_txt = img.shape[0], txt.shape[0]

    # Text -> image: one [chunk, N_img] block at a time; the target's own score comes from the same block,
    # so it is compared with exactly the numbers it competes against.
    ir = torch.empty(n_txt, dtype=torch.long, device=img.device)
    for s in range(0, n_txt, chunk_size):
        sims = txt[s : s + chunk_size] @ img.t()
        target = sims.gather(1, t2i[s : s + chunk_size, None])
        ir[s : s + chunk_size] = (sims >= target).sum(dim=1, dtype=torch.int32) - 1  # minus the target itself
        del sims, target  # free the block before the next one is allocated

    # Image -> text: one [chunk, N_txt] block. Captions sorted by image give each chunk its own captions as
    # one slice, so the best own score is gathered from the block itself (no [chunk, N_txt] mask or copy).
    order = torch.argsort(t2i, stable=True)
    counts = torch.bincount(t2i, minlength=n_img)
    ptr = torch.zeros(n_img + 1, dtype=torch.long, device=img.device)
    ptr[1:] = torch.cumsum(counts, dim=0)
    tr = torch.empty(n_img, dtype=torch.long, device=img.device)
    for s in range(0, n_img, chunk_size):
        sims = img[s : s + chunk_size] @ txt.t()
        b = sims.shape[0]
        cap = order[int(ptr[s]) : int(ptr[s + b])]
        rows = t2i[cap] - s
        own = sims[rows, cap]
        best = torch.full((b,), -torch.inf, dtype=sims.dtype, device=img.device)
        best.scatter_reduce_(0, rows, own, reduce="amax")
        at_least = (sims >= best[:, None]).sum(dim=1, dtype=torch.int32)
        del sims
        own_at_least = torch.zeros(b, dtype=torch.long, device=img.device)
        own_at_least.scatter_add_(0, rows, (own >= best[rows]).long())
        rank = at_least - own_at_least  # only captions of other images count
        tr[s : s + b] = torch.where(counts[s : s + b] > 0, rank, torch.full_like(rank, -1))
    return ir, tr


def retrieval_metrics(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    text_to_image: torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = 1024,
) -> dict[str, float]:
    """Recall@k for text→image (``ir@k``) and image→text (``tr@k``) retrieval, in percent, plus their mean.

    Args:
        image_embeds: ``[N_img, d]`` image embeddings (the gallery for IR, the queries for TR).
        text_embeds: ``[N_txt, d]`` caption embeddings, any number of captions per image.
        text_to_image: ``[N_txt]`` integer index of each caption's image (row of ``image_embeds``).
        ks: the cut-offs reported.
        chunk_size: queries scored per block. Peak extra memory is the normalised inputs plus about 10 bytes
            per entry of a ``[chunk_size, max(N_img, N_txt)]`` block (float32 scores, the comparison and
            its count); 5,000 images x 25,000 captions x 512-d at 1024: about 0.3 GB above the inputs.

    Returns:
        ``{"ir@1", "ir@5", "ir@10", "tr@1", "tr@5", "tr@10", "mean"}`` (keys follow ``ks``) as Python floats
        in [0, 100]. IR averages over all captions. TR averages over the images that have at least one
        caption; images without a caption are excluded from TR but stay in the IR gallery as distractors.
        Ties count against the model (see the module docstring).
    """
    if isinstance(ks, (str, bytes)) or not isinstance(ks, Sequence) or len(ks) == 0:
        raise ValueError(f"ks must be a non-empty sequence of positive integers, got {ks!r}.")
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
            raise ValueError(f"ks must contain positive integers, got {k!r} in {ks!r}.")
    if len(set(ks)) != len(ks):
        raise ValueError(f"ks has duplicates: {ks!r}.")
    ir, tr = retrieval_ranks(image_embeds, text_embeds, text_to_image, chunk_size=chunk_size)
    tr = tr[tr >= 0]
    out: dict[str, float] = {}
    for k in ks:
        out[f"ir@{k}"] = 100.0 * float((ir < k).double().mean())
    for k in ks:
        out[f"tr@{k}"] = 100.0 * float((tr < k).double().mean())
    out["mean"] = sum(out.values()) / len(out)
    return out
