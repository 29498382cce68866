"""Students: dual encoders whose cross-modal head starts untrained, so the K training pairs must teach it the
image-text alignment (docs/method.md §5, arXiv 2605.23482). How they are trained is :mod:`mdm_hf.students.trainer`,
how they are scored :mod:`mdm_hf.students.evaluator`.

* **vision tower** -- trained in full. CLIP/SigLIP track (``track="clip"``): the vision tower of a dual-encoder
  checkpoint (by default the teacher's anchor). Paper track (``track="paper"``): an image backbone loaded with
  ``transformers.AutoModel`` (ResNet, ConvNeXt, ViT, ...; the paper's NFNet comes from timm, used only when timm is
  importable). A *cross-architecture* student is any vision tower other than the teacher's.
* **text tower** -- frozen (:class:`FrozenTextEncoder`). Its features ``e = E_t(c)`` are computed once per caption
  (cached on disk); synthetic text features go straight into the text projection.
* **head** -- a visual projection (CLIP track; the paper track has none: its text projection maps into the image
  feature space), a text projection and a temperature, all freshly initialised by default
  (``keep_pretrained_head=True`` keeps a CLIP/SigLIP checkpoint's own head; report such students separately).

Trained students are saved by :mod:`mdm_hf.students.saving`.

Pixel spaces: synthetic pixels live in the teacher's normalised space (the set's ``image_mean`` / ``image_std``);
real images are preprocessed with the teacher's image processor. A student whose processor differs gets
``x_student = resize((x * std_src + mean_src - mean_student) / std_student, student_size)`` (see
:func:`convert_pixels`); bilinear resizing is a convex combination of pixels, so it commutes with the per-channel
affine map and the order does not matter. Real images are thus resized twice (to the teacher's size, then to the
student's), exactly as the synthetic pixels are.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoTokenizer

from ..models import SUPPORTED_MODEL_TYPES, DualEncoder
from .config import StudentConfig

logger = logging.getLogger(__name__)

__all__ = [
    "FrozenTextEncoder",
    "PixelSpace",
    "PretrainedHead",
    "ProjectionHead",
    "StudentModel",
    "VisionBackbone",
    "backbone_feature_dim",
    "convert_pixels",
    "load_vision_backbone",
]


# ============================================================================================ pixel spaces
@dataclass(frozen=True)
class PixelSpace:
    """A normalised pixel space: ``x = (rgb - mean) / std`` at ``size`` = (height, width)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    size: tuple[int, int]

    @classmethod
    def make(cls, mean: Sequence[float], std: Sequence[float], size: int | Sequence[int]) -> PixelSpace:
        size = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
        return cls(tuple(float(m) for m in mean), tuple(float(s) for s in std), size)


def convert_pixels(pixels: torch.Tensor, source: PixelSpace, target: PixelSpace) -> torch.Tensor:
    """Move normalised pixels ``[B, C, H, W]`` from one processor's space to another's.

    ``rgb = x * std_src + mean_src``; ``x' = (rgb - mean_tgt) / std_tgt``; then a bilinear resize to the target
    size (antialiased when shrinking). Identical spaces return the input unchanged.
    """
    if source == target:
        return pixels
    if pixels.dim() != 4 or pixels.shape[1] != len(source.mean):
        raise ValueError(
            f"convert_pixels expects [B, {len(source.mean)}, H, W] pixels, got shape {tuple(pixels.shape)}."
        )
    if len(target.mean) != len(source.mean):
        raise ValueError(
            f"Source has {len(source.mean)} channels but the target space has {len(target.mean)}."
        )

    def col(v: Sequence[float]) -> torch.Tensor:
        return torch.tensor(v, dtype=pixels.dtype, device=pixels.device).view(1, -1, 1, 1)

    if (source.mean, source.std) != (target.mean, target.std):
        pixels = (pixels * col(source.std) + col(source.mean) - col(target.mean)) / col(target.std)
    if tuple(pixels.shape[-2:]) != target.size:
        shrink = target.size[0] < pixels.shape[-2] or target.size[1] < pixels.shape[-1]
        pixels = F.interpolate(
            pixels, size=target.size, mode="bilinear", align_corners=False, antialias=shrink
        )
    return pixels


def _processor_space(processor, fallback_size: int | Sequence[int]) -> PixelSpace:
    """The pixel space an image processor produces (crop size if it centre-crops, else its size)."""
    size = None
    crop = getattr(processor, "crop_size", None)
    if getattr(processor, "do_center_crop", False) and crop:
        size = (crop["height"], crop["width"]) if "height" in crop else None
    sz = getattr(processor, "size", None) or {}
    if size is None and "height" in sz:
        size = (sz["height"], sz["width"])
    if size is None and "shortest_edge" in sz:
        size = sz["shortest_edge"]
    return PixelSpace.make(processor.image_mean, processor.image_std, size or fallback_size)


# ============================================================================================ students
class VisionBackbone(nn.Module):
    """A vision tower as ``pixels -> pooled features [B, D]``, whatever library it comes from.

    ``kind``: ``"dual_encoder"`` (the ``vision_model`` of CLIP / SigLIP / VisionTextDualEncoder: pooler output),
    ``"transformers"`` (an ``AutoModel`` image backbone: pooler output flattened, else CLS / spatial mean) or
    ``"timm"`` (``num_classes=0`` models return pooled features).
    """

    def __init__(self, model: nn.Module, kind: str) -> None:
        super().__init__()
        self.model, self.kind = model, kind

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.kind == "timm":
            return self.model(pixel_values).flatten(1)
        out = self.model(pixel_values=pixel_values)
        pooled = getattr(out, "pooler_output", None)
        if pooled is None:
            hidden = out.last_hidden_state
            pooled = hidden[:, 0] if hidden.dim() == 3 else hidden.mean(dim=(-2, -1))
        return pooled.flatten(1)


@dataclass
class PretrainedHead:
    """A dual encoder's own head (kept only with ``keep_pretrained_head=True``)."""

    visual_projection: nn.Module
    text_projection: nn.Module
    logit_scale: float  # the raw (log) parameter


class ProjectionHead(nn.Module):
    """``LayerNorm(p + Dropout(Linear(GELU(p))))`` with ``p = Linear(x)``: the MLP text head of the VL-distillation
    students (LoRS / MDM paper track), as opposed to CLIP's single linear projection."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.projection = nn.Linear(in_dim, out_dim)
        self.fc = nn.Linear(out_dim, out_dim)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.projection(x)
        return self.norm(p + self.dropout(self.fc(F.gelu(p))))


class StudentModel(nn.Module):
    """Vision tower + projections + temperature; text enters as frozen features ``e`` (``[B, D_text]``).

    ``z_v = normalize(P_v(V(x)))`` (``P_v`` is the identity without a visual projection) and
    ``z_t = normalize(P_t(e))``; :attr:`logit_scale` is already exponentiated (``1 / tau``, capped at 100 as in
    CLIP).
    """

    def __init__(
        self,
        vision: nn.Module,
        vision_dim: int,
        text_dim: int,
        projection_dim: int | None = None,
        visual_projection: bool = True,
        temperature: float = 0.07,
        learn_temperature: bool = True,
        head: PretrainedHead | None = None,
        text_head: str = "linear",
    ) -> None:
        super().__init__()
        self.vision = vision
        if head is not None:
            self.visual_projection = copy.deepcopy(head.visual_projection)
            self.text_projection = copy.deepcopy(head.text_projection)
            init_scale = head.logit_scale
        else:
            if not visual_projection:
                if projection_dim not in (None, vision_dim):
                    raise ValueError(
                        f"Without a visual projection the shared space is the image feature space ({vision_dim}-d); "
                        f"projection_dim={projection_dim} does not match. Drop projection_dim or enable "
                        "visual_projection."
                    )
                projection_dim = vision_dim
            projection_dim = projection_dim or vision_dim
            self.visual_projection = (
                nn.Linear(vision_dim, projection_dim, bias=False) if visual_projection else nn.Identity()
            )
            self.text_projection = (
                ProjectionHead(text_dim, projection_dim)
                if text_head == "mlp"
                else nn.Linear(text_dim, projection_dim, bias=False)
            )
            init_scale = math.log(1.0 / temperature)
        self.log_logit_scale = nn.Parameter(torch.tensor(float(init_scale)), requires_grad=learn_temperature)

    @property
    def logit_scale(self) -> torch.Tensor:
        """``exp(log_logit_scale)`` capped at 100 (CLIP's cap): the multiplier of cosine similarities."""
        return self.log_logit_scale.clamp(max=math.log(100.0)).exp()

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.visual_projection(self.vision(pixel_values)), dim=-1)

    def encode_text(self, text_features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_projection(text_features), dim=-1)

    def forward(
        self, pixel_values: torch.Tensor, text_features: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode_image(pixel_values), self.encode_text(text_features)


def backbone_feature_dim(backbone: VisionBackbone, space: PixelSpace) -> int:
    """Pooled feature size by one dry forward pass (robust across backbone families)."""
    was_training = backbone.training
    backbone.eval()
    device = next(backbone.parameters()).device
    with torch.no_grad():
        dim = backbone(torch.zeros(1, len(space.mean), *space.size, device=device)).shape[-1]
    backbone.train(was_training)
    return int(dim)


def _head_of(encoder) -> PretrainedHead:
    visual = nn.Identity() if encoder.family == "siglip" else encoder.model.visual_projection
    return PretrainedHead(
        copy.deepcopy(visual),
        copy.deepcopy(encoder.text_projection),
        float(encoder.model.logit_scale.detach()),
    )


def _json_config(value: str) -> dict:
    value = value.strip()
    if value.startswith("{"):
        return json.loads(value)
    with open(value) as f:
        return json.load(f)


def load_vision_backbone(
    config: StudentConfig, teacher
) -> tuple[VisionBackbone, PixelSpace, PretrainedHead | None]:
    """The student's vision tower (a CPU copy), its pixel space and, from a dual encoder, its pretrained head."""
    teacher_space = PixelSpace.make(teacher.image_mean, teacher.image_std, teacher.image_size)
    name, head, space = config.vision_model_name_or_path, None, None
    if config.vision_config is not None:
        values = _json_config(config.vision_config)
        if "model_type" not in values:
            raise ValueError(
                "vision_config needs a 'model_type' key (e.g. resnet, vit, convnext, clip_vision_model)."
            )
        model = AutoModel.from_config(AutoConfig.for_model(**values))
        backbone = VisionBackbone(model, "transformers")
        size = getattr(model.config, "image_size", None) or teacher_space.size
        space = PixelSpace.make(teacher_space.mean, teacher_space.std, size)
    elif name is None:
        backbone = VisionBackbone(copy.deepcopy(teacher.model.vision_model).cpu(), "dual_encoder")
        space, head = teacher_space, _head_of(teacher)
    elif name.startswith(("timm/", "timm:", "hf-hub:")):
        backbone, space = _load_timm(name)
    else:
        kwargs = {"revision": config.vision_revision, "trust_remote_code": config.trust_remote_code}
        model_type = AutoConfig.from_pretrained(name, **kwargs).model_type
        if model_type in SUPPORTED_MODEL_TYPES:
            encoder = DualEncoder.from_pretrained(
                name, config.vision_revision, trust_remote_code=kwargs["trust_remote_code"]
            )
            backbone = VisionBackbone(encoder.model.vision_model, "dual_encoder")
            space = PixelSpace.make(encoder.image_mean, encoder.image_std, encoder.image_size)
            head = _head_of(encoder)
        else:
            model = AutoModel.from_pretrained(name, use_safetensors=True, **kwargs)
            backbone = VisionBackbone(model, "transformers")
            fallback = getattr(model.config, "image_size", None) or teacher_space.size
            try:
                space = _processor_space(AutoImageProcessor.from_pretrained(name, **kwargs), fallback)
            except (OSError, ValueError):
                logger.warning("No image processor for %s: using the teacher's normalisation.", name)
                space = PixelSpace.make(teacher_space.mean, teacher_space.std, fallback)
    space = PixelSpace.make(
        config.student_image_mean or space.mean,
        config.student_image_std or space.std,
        config.student_image_size or space.size,
    )
    return backbone.cpu(), space, head


def _load_timm(name: str) -> tuple[VisionBackbone, PixelSpace]:
    """A timm image tower with pooled outputs (optional path: timm is not a dependency)."""
    try:
        import timm
    except ImportError as err:
        raise ImportError(
            f"'{name}' is a timm model but timm is not installed (it pulls torchvision). Install timm, or use a "
            "transformers image backbone such as microsoft/resnet-50 or facebook/convnext-tiny-224."
        ) from err
    model_id = name.split(":", 1)[1] if name.startswith("timm:") else name
    if model_id.startswith("timm/"):
        model_id = "hf-hub:" + model_id
    model = timm.create_model(model_id, pretrained=True, num_classes=0)
    data = timm.data.resolve_data_config({}, model=model)
    return VisionBackbone(model, "timm"), PixelSpace.make(data["mean"], data["std"], data["input_size"][1:])


class FrozenTextEncoder(nn.Module):
    """A separate frozen text encoder (``AutoModel`` + tokenizer) with CLS / mean / pooler pooling.

    Exposes the attributes :func:`mdm_hf.data.cached_text_features` keys its cache on.
    """

    def __init__(self, model, tokenizer, name_or_path: str, revision: str | None, pooling: str) -> None:
        super().__init__()
        self.model, self.tokenizer = model.eval().requires_grad_(False), tokenizer
        self.name_or_path, self.revision, self.text_pooling = name_or_path, revision, pooling

    @classmethod
    def from_pretrained(
        cls, name: str, revision: str | None = None, pooling: str = "cls"
    ) -> FrozenTextEncoder:
        model = AutoModel.from_pretrained(name, revision=revision, use_safetensors=True)
        return cls(model, AutoTokenizer.from_pretrained(name, revision=revision), name, revision, pooling)

    @property
    def text_feature_dim(self) -> int:
        return int(self.model.config.hidden_size)

    @torch.no_grad()
    def encode_text_features(self, captions: Sequence[str], batch_size: int = 256, progress: bool = False):
        device = next(self.model.parameters()).device
        chunks = []
        for start in range(0, len(captions), batch_size):
            tokens = self.tokenizer(
                list(captions[start : start + batch_size]), padding=True, truncation=True, return_tensors="pt"
            ).to(device)
            out = self.model(**tokens)
            if self.text_pooling == "pooler":
                feats = out.pooler_output
            elif self.text_pooling == "mean":
                mask = tokens["attention_mask"].unsqueeze(-1).to(out.last_hidden_state.dtype)
                feats = (out.last_hidden_state * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
            else:
                feats = out.last_hidden_state[:, 0]
            chunks.append(feats.float().cpu())
        return torch.cat(chunks) if chunks else torch.zeros(0, self.text_feature_dim)
