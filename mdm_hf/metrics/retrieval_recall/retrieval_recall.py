"""Image–text retrieval recall (IR@k / TR@k) as a Hugging Face ``evaluate`` metric module.

Load it offline from the installed package::

    import evaluate
    from mdm_hf.retrieval import retrieval_metric_path

    recall = evaluate.load(retrieval_metric_path())
    recall.compute(text_embeds=text_embeds, text_to_image=text_to_image, image_embeds=image_embeds)

The numbers come from ``mdm_hf.retrieval.retrieval_metrics`` (one implementation, no copy).
"""

import datasets
import evaluate
import numpy as np
import torch

from mdm_hf.retrieval import retrieval_metrics

_CITATION = """\
@inproceedings{jeong2026mdm,
  title     = {Multimodal Distribution Matching for Vision-Language Dataset Distillation},
  author    = {Jeong, Andy and Kwon and Kim and Yoon},
  booktitle = {Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  year      = {2026},
  note      = {arXiv:2605.23482}
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
    >>> recall = evaluate.load(retrieval_metric_path())
    >>> recall.compute(text_embeds=[[1.0, 0.0], [0.0, 1.0]], text_to_image=[0, 1],
    ...                image_embeds=[[1.0, 0.0], [0.0, 1.0]], ks=[1])
    {'ir@1': 100.0, 'tr@1': 100.0, 'mean': 100.0}
"""


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
        txt = np.asarray(text_embeds)
        if txt.dtype == object:  # rows of different lengths come back as an object array
            raise ValueError("every text_embeds row must have the same dimension d.")
        # Captions are stored as float32, so the gallery is compared in float32 too (as the core does for
        # float32 inputs).
        img = torch.as_tensor(np.asarray(image_embeds, dtype=np.float32))
        return retrieval_metrics(
            img,
            torch.from_numpy(np.ascontiguousarray(txt, dtype=np.float32)),
            torch.as_tensor(np.asarray(text_to_image, dtype=np.int64)),
            ks=tuple(ks),
            chunk_size=chunk_size,
        )
