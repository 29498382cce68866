"""Saving trained students (``--save_students``) in the layout ``transformers`` loads.

A student (:func:`save_student`) is written with ``save_pretrained`` as the transformers dual encoder that
computes exactly its embeddings (safetensors only, no pickle), with the tokenizer of
its text tower and an image processor for its pixel space, so ``transformers.AutoModel.from_pretrained(dir)`` loads
it -- and ``mdm_hf.models.DualEncoder.from_pretrained(dir)``, i.e. it can be a teacher or anchor again:

* ``CLIPModel`` -- CLIP towers, linear projections (the clip track's fresh head, or CLIP's own);
* ``SiglipModel`` -- SigLIP towers without a visual projection (``keep_pretrained_head`` or
  ``visual_projection=False``); the text projection becomes the text tower's ``head``;
* ``VisionTextDualEncoderModel`` -- any other vision transformer with a pooled output + text tower, linear
  projections (a missing visual projection is saved as the identity matrix, which is exact).

The text side is the frozen tower the student's text features came from; its pooling is recorded as
``mdm_text_pooling`` in ``config.json`` (the convention of mdm-hf's anchors). With ``pooler`` (CLIP's own) the
model's ``get_text_features`` gives the student's text embeddings; with ``mean`` (sentence-transformers towers) use
``DualEncoder.from_pretrained(dir).encode_text_features`` or mean-pool ``text_model``'s states yourself, then
``text_projection``. A student that none of these represents exactly (the paper track's MLP text head, a ResNet or
timm image backbone, CLS pooling of a separate text encoder, SigLIP towers with a fresh visual projection: SigLIP's
text features exist only inside SiglipModel, which has no visual projection) is saved
as its own state dict (``student.safetensors``) with ``mdm_student.json``, and a warning says why.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .. import __version__
from .model import FrozenTextEncoder, PixelSpace, StudentModel

logger = logging.getLogger(__name__)

__all__ = [
    "STUDENT_INFO_FILE",
    "STUDENT_WEIGHTS_FILE",
    "NoTransformersLayout",
    "save_student",
    "student_image_processor",
    "student_info",
    "student_to_transformers",
]


STUDENT_INFO_FILE = "mdm_student.json"  # what the student is and how it was selected (every saved student)
STUDENT_WEIGHTS_FILE = "student.safetensors"  # the state dict of a student no transformers class represents


class NoTransformersLayout(ValueError):
    """No transformers dual-encoder class computes exactly this student's embeddings (the message says why)."""


def _linear(module: nn.Module, in_dim: int, what: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias) of a projection; the identity as the identity matrix (exact in floating point)."""
    if isinstance(module, nn.Identity):
        return torch.eye(in_dim), None
    if isinstance(module, nn.Linear):
        bias = None if module.bias is None else module.bias.detach().float().cpu()
        return module.weight.detach().float().cpu(), bias
    hint = (
        " (--text_head mlp, the paper track's default; --text_head linear is one)"
        if what == "text projection"
        else ""
    )
    raise NoTransformersLayout(
        f"its {what} is a {type(module).__name__}, while transformers dual encoders project linearly{hint}"
    )


def _text_tower(text_encoder) -> tuple[nn.Module, str, str | None]:
    """(text model, pooling in mdm_hf.models' names, dual-encoder family or None) of the frozen text side."""
    if isinstance(text_encoder, FrozenTextEncoder):
        pooling = {"mean": "mean", "pooler": "pooler"}.get(text_encoder.text_pooling)
        if pooling is None:
            raise NoTransformersLayout(
                f"its separate text encoder is pooled with {text_encoder.text_pooling!r} (the first token's state), "
                "which no transformers dual encoder computes (--text_model_pooling mean or pooler do)"
            )
        return text_encoder.model, pooling, None
    return text_encoder.model.text_model, text_encoder.text_pooling, text_encoder.family


def _prefixed(state: dict, prefix: str, skip: str | None = None) -> dict:
    return {prefix + k: v for k, v in state.items() if skip is None or not k.startswith(skip)}


def _image_embeds(model, pixels: torch.Tensor) -> torch.Tensor:
    out = model.get_image_features(pixel_values=pixels)
    return F.normalize(getattr(out, "pooler_output", out), dim=-1)


@torch.no_grad()
def student_to_transformers(student: StudentModel, text_encoder, space: PixelSpace | None = None):
    """The student as the transformers dual encoder that computes its embeddings (a CPU ``PreTrainedModel``).

    Args:
        student: the trained student.
        text_encoder: its frozen text side: the teacher (:class:`~mdm_hf.models.DualEncoder`) or a
            :class:`FrozenTextEncoder`; its text tower becomes the model's.
        space: the student's pixel space; when given, the image embeddings of the result are checked against the
            student's on a random batch.

    Returns:
        a ``CLIPModel``, ``SiglipModel`` or ``VisionTextDualEncoderModel`` (see the module doc) with the text
        pooling recorded as ``config.mdm_text_pooling``.

    Raises:
        NoTransformersLayout: no transformers class represents this student exactly.
    """
    from transformers import (
        CLIPConfig,
        CLIPModel,
        SiglipConfig,
        SiglipModel,
        VisionTextDualEncoderConfig,
        VisionTextDualEncoderModel,
    )

    if student.vision.kind == "timm":
        raise NoTransformersLayout("its vision tower is a timm model")
    text_model, pooling, family = _text_tower(text_encoder)
    vision = student.vision.model
    vcfg, tcfg = vision.config, text_model.config
    vision_dim = getattr(vcfg, "hidden_size", None)
    if not isinstance(vision_dim, int):
        raise NoTransformersLayout(
            f"its image backbone ({vcfg.model_type}) has no single pooled feature size, which transformers dual "
            "encoders project"
        )
    w_v, b_v = _linear(student.visual_projection, vision_dim, "visual projection")
    w_t, b_t = _linear(student.text_projection, student.text_projection.in_features, "text projection")
    if b_v is not None:
        raise NoTransformersLayout("its visual projection has a bias")
    projection_dim = int(w_t.shape[0])
    scale = student.log_logit_scale.detach().float().cpu().clamp(max=math.log(100.0))  # the scale it uses
    vision_state = _prefixed(vision.state_dict(), "vision_model.")
    if family == "clip" and vcfg.model_type == "clip_vision_model" and b_t is None:
        config = CLIPConfig(
            text_config=tcfg.to_dict(), vision_config=vcfg.to_dict(), projection_dim=projection_dim,
            logit_scale_init_value=float(scale),
        )  # fmt: skip
        model = CLIPModel(config)
        state = {**vision_state, **_prefixed(text_model.state_dict(), "text_model.")}
        state.update({"visual_projection.weight": w_v, "text_projection.weight": w_t, "logit_scale": scale})
    elif (
        family == "siglip"
        and vcfg.model_type == "siglip_vision_model"
        and isinstance(student.visual_projection, nn.Identity)
    ):
        config = SiglipConfig(
            text_config={**tcfg.to_dict(), "projection_size": projection_dim}, vision_config=vcfg.to_dict()
        )
        model = SiglipModel(config)
        # SigLIP's text features are the state before the text tower's head: the student's projection is the head.
        # The student (softmax InfoNCE) has no logit bias: the teacher's is kept, for sigmoid use.
        bias = text_encoder.logit_bias
        state = {**vision_state, **_prefixed(text_model.state_dict(), "text_model.", skip="head.")}
        state.update({
            "text_model.head.weight": w_t, "text_model.head.bias": torch.zeros(projection_dim) if b_t is None else b_t,
            "logit_scale": scale.view_as(model.logit_scale),
            "logit_bias": bias.detach().float().cpu().view_as(model.logit_bias) if bias is not None
            else torch.zeros_like(model.logit_bias),
        })  # fmt: skip
    else:
        if family == "siglip":
            raise NoTransformersLayout(
                "its text features are SigLIP's (the state before the text tower's head), which only SiglipModel "
                "computes (VisionTextDualEncoderModel cannot hold a SigLIP text tower), and SiglipModel has no "
                "visual projection: it needs the SigLIP vision tower without one (--keep_pretrained_head or "
                "--visual_projection false)"
            )
        if b_t is not None:
            raise NoTransformersLayout("its text projection has a bias")
        config = VisionTextDualEncoderConfig.from_vision_text_configs(
            vcfg, tcfg, projection_dim=projection_dim, logit_scale_init_value=float(scale)
        )
        model = VisionTextDualEncoderModel(config)
        state = {**vision_state, **_prefixed(text_model.state_dict(), "text_model.")}
        state.update({"visual_projection.weight": w_v, "text_projection.weight": w_t, "logit_scale": scale})
    model.load_state_dict(state, strict=True)
    model.config.mdm_text_pooling = pooling
    model.eval()
    if space is not None:
        probe = torch.randn(2, len(space.mean), *space.size, generator=torch.Generator().manual_seed(0))
        was_training = student.training
        student.eval()
        device = next(student.parameters()).device
        expected = student.encode_image(probe.to(device)).float().cpu()
        student.train(was_training)
        if not torch.allclose(_image_embeds(model, probe), expected, atol=1e-4, rtol=1e-3):
            raise NoTransformersLayout(
                f"its vision tower's features are not the pooled output {type(model).__name__} projects"
            )
    return model


def student_image_processor(processor, source: PixelSpace, target: PixelSpace):
    """``processor`` (the teacher's: it made the real images the student saw) re-targeted to the student's pixel
    space (``target``): its normalisation and, when the sizes differ, its output size (one resize where the
    evaluation resized twice, to the teacher's size and then to the student's)."""
    processor = copy.deepcopy(processor)
    processor.image_mean, processor.image_std = list(target.mean), list(target.std)
    if target.size != source.size:
        height, width = target.size
        if getattr(processor, "crop_size", None):
            processor.crop_size = {"height": height, "width": width}
        size = dict(getattr(processor, "size", None) or {})
        processor.size = (
            {"shortest_edge": min(height, width)}
            if "shortest_edge" in size
            else {"height": height, "width": width}
        )
    return processor


def _tokenizer_for(text_encoder):
    """The text tower's tokenizer, truncating at the tower's position limit (``truncation=True`` is then enough)."""
    tokenizer = copy.deepcopy(text_encoder.tokenizer)
    model = text_encoder.model
    model = model if isinstance(text_encoder, FrozenTextEncoder) else model.text_model
    limit = getattr(model.config, "max_position_embeddings", None)
    if isinstance(limit, int) and (tokenizer.model_max_length or 0) > limit:
        tokenizer.model_max_length = limit
    return tokenizer


_CARD = """---
library_name: {library}
tags:
- mdm-hf
- dataset-distillation
- student
---

# Student trained on {trained_on}

A dual encoder trained by `mdm-hf evaluate` (seed {seed}) on {trained_on} and selected on validation retrieval
(step {best_step}; validation mean recall {validation_mean:.2f}). Teacher: `{teacher}`.

Layout: `{layout}`. {usage}
"""

_USAGE = {
    "transformers": (
        "Load it with `transformers.AutoModel.from_pretrained(path)` and its `AutoTokenizer` / "
        "`AutoImageProcessor`. Text features are pooled with `{pooling}` (`config.mdm_text_pooling`): "
        "{pooling_note}"
    ),
    "state_dict": (
        "No transformers class computes this student exactly ({reason}), so `student.safetensors` holds its "
        "`mdm_hf.students.StudentModel` state dict: rebuild it with "
        "`StudentEvaluator(StudentConfig(**info['config'])).build_student()` (`info`: `mdm_student.json`) and "
        "`load_state_dict(safetensors.torch.load_file('student.safetensors'))`."
    ),
}


def save_student(
    student: StudentModel,
    directory: str | Path,
    text_encoder,
    image_processor,
    source: PixelSpace,
    space: PixelSpace,
    info: dict,
) -> str:
    """Write a trained student to ``directory`` with ``save_pretrained`` (safetensors only, never a pickle).

    The model is :func:`student_to_transformers`' (``config.json`` + ``model.safetensors``); a student that no
    transformers class represents is written as ``student.safetensors`` (its state dict) instead, with a warning.
    Either way the folder also holds the tokenizer of the text tower, the image processor of the student's pixel
    space (:func:`student_image_processor` of the teacher's ``image_processor``, whose space is ``source``), a short
    ``README.md`` and ``mdm_student.json`` (``info`` plus the layout).

    Returns:
        the layout: the transformers class name, or ``"StudentModel"`` (state dict).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    try:
        model = student_to_transformers(student, text_encoder, space)
    except NoTransformersLayout as why:
        logger.warning(
            "Saving the student in %s as a state dict (student.safetensors), not as a transformers model: %s.",
            directory, why,
        )  # fmt: skip
        from safetensors.torch import save_file

        state = {k: v.detach().cpu().contiguous() for k, v in student.state_dict().items()}
        save_file(state, str(directory / STUDENT_WEIGHTS_FILE), metadata={"format": "pt"})
        layout, pooling = "StudentModel", None
        usage = _USAGE["state_dict"].format(reason=why)
    else:
        model.save_pretrained(directory)  # config.json + model.safetensors
        layout, pooling = type(model).__name__, model.config.mdm_text_pooling
        if layout == "SiglipModel":
            note = (
                "tokenize as SigLIP does (`padding='max_length'`, no attention mask) and `get_text_features` gives "
                "the student's text embeddings."
            )
        elif pooling == "pooler":
            note = "`get_text_features` gives the student's text embeddings."
        else:
            note = (
                "`mdm_hf.models.DualEncoder.from_pretrained(path)` applies it (`get_text_features` uses the pooler "
                "output instead)."
            )
        usage = _USAGE["transformers"].format(pooling=pooling, pooling_note=note)
    _tokenizer_for(text_encoder).save_pretrained(directory)
    student_image_processor(image_processor, source, space).save_pretrained(directory)
    info = {"layout": layout, "text_pooling": pooling, **info}
    (directory / STUDENT_INFO_FILE).write_text(json.dumps(info, indent=2, default=str) + "\n")
    validation = info.get("validation") or {}
    (directory / "README.md").write_text(
        _CARD.format(
            library="transformers" if layout != "StudentModel" else "mdm-hf",
            layout=layout,
            usage=usage,
            trained_on=info.get("trained_on", "a synthetic set"),
            seed=info.get("seed"),
            best_step=info.get("best_step"),
            validation_mean=float(validation.get("mean", float("nan"))),
            teacher=info.get("teacher"),
        )  # fmt: skip
    )
    return layout


def student_info(config, run, method: str, seed: int, pairs: int | None, protocol: str) -> dict:
    """What ``mdm_student.json`` and the README say about a trained student: its data, selection and protocol."""
    if method == "synthetic":
        trained_on = f"the synthetic set `{config.synthetic}`" if config.synthetic else "a synthetic set"
    elif method == "full":
        trained_on = f"the `{config.train_split}` split of `{config.dataset_name}`"
    else:
        trained_on = f"a {method} coreset of {pairs} pairs of `{config.dataset_name}` ({config.train_split})"
    return {
        "method": method, "seed": seed, "pairs": pairs, "trained_on": trained_on, "best_step": run.best_step,
        "steps": run.steps, "validation": run.validation, "teacher": config.model_name_or_path,
        "synthetic": config.synthetic, "protocol": protocol, "config": config.to_dict(),
        "created_with": f"mdm-hf {__version__}",
    }  # fmt: skip
