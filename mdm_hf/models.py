"""One dual-encoder view over CLIP, SigLIP and VisionTextDualEncoder checkpoints (the MDM "teacher").

MDM (arXiv 2605.23482, "Notation") needs, for any dual encoder:

* image features ``E_v(x)`` and normalised embeddings ``z_v = normalize(P_v(E_v(x)))``, differentiable in the pixels;
* frozen text features ``e = E_t(c)`` -- the pooled text output, i.e. the *input* of the text projection ``P_t`` --
  and ``z_t = normalize(P_t(e))`` for given (possibly learned) text features;
* the logit scale (and SigLIP's bias);
* which parameters are vision tower, projections or text tower (experts train and merge the first two only).

Where each family keeps these pieces:

============  ==========================  ======================  ==========================================
family        image feature (E_v)         P_v                     text feature (E_t) / P_t
============  ==========================  ======================  ==========================================
clip          vision_model pooler (CLS)   visual_projection       text_model pooler (EOS) / text_projection
siglip        vision_model pooler (MAP)   identity                text_model last token / text_model.head
dual_encoder  vision_model pooler         visual_projection       pooler or masked mean / text_projection
============  ==========================  ======================  ==========================================

For a ``VisionTextDualEncoderModel`` whose text tower is a sentence-transformers model (e.g. all-MiniLM-L6-v2) the
right text feature is the attention-masked mean of the token states, not BERT's ``pooler_output`` (CLS -> dense ->
tanh, which MiniLM was never trained to produce). The pooling is chosen by ``text_pooling`` and, for checkpoints
saved by mdm-hf, recorded in the config as ``mdm_text_pooling``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

# Re-exported: the Hub/offline helpers live in mdm_hf.hub; importing them from here keeps working.
from .hub import OfflineHubError, is_hub_offline, offline_hint  # noqa: F401

TextPooling = Literal["auto", "pooler", "mean", "last"]

SUPPORTED_MODEL_TYPES = {
    "clip": "clip",
    "siglip": "siglip",
    "vision-text-dual-encoder": "dual_encoder",
}


@dataclass(frozen=True)
class ParameterGroups:
    """Parameter names of a dual encoder by role (names as in ``model.named_parameters()``)."""

    vision: list[str]
    projections: list[str]
    text: list[str]

    @property
    def trainable(self) -> list[str]:
        """What experts fine-tune and MDM merges: the vision tower and the projections."""
        return self.vision + self.projections


class DualEncoder(nn.Module):
    """A uniform view over a CLIP / SigLIP / VisionTextDualEncoder model, its tokenizer and image processor.

    Build it with :meth:`from_pretrained` (a Hub id or a local directory). ``self.model`` is the underlying
    ``transformers`` model; its parameter names are the keys the expert bank and the merge use.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        image_processor,
        name_or_path: str = "",
        revision: str | None = None,
        text_pooling: TextPooling = "auto",
    ) -> None:
        super().__init__()
        model_type = getattr(model.config, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"'{name_or_path}' is a '{model_type}' checkpoint, which is not a supported dual encoder. "
                f"Supported model types: {sorted(SUPPORTED_MODEL_TYPES)} (CLIPModel, SiglipModel, "
                "VisionTextDualEncoderModel)."
            )
        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.family = SUPPORTED_MODEL_TYPES[model_type]
        self.name_or_path = name_or_path
        self.revision = revision
        if text_pooling == "auto":
            default = "last" if self.family == "siglip" else "pooler"
            text_pooling = getattr(model.config, "mdm_text_pooling", None) or default
        if text_pooling not in ("pooler", "mean", "last"):
            raise ValueError(f"text_pooling must be 'auto', 'pooler', 'mean' or 'last', got {text_pooling!r}")
        self.text_pooling: str = text_pooling

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        revision: str | None = None,
        text_pooling: TextPooling = "auto",
        trust_remote_code: bool = False,
        dtype: torch.dtype | None = None,
    ) -> DualEncoder:
        """Load model, tokenizer and image processor with ``from_pretrained`` from a Hub id or local directory."""
        from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoTokenizer

        kwargs = {"revision": revision, "trust_remote_code": trust_remote_code}
        try:
            config = AutoConfig.from_pretrained(name_or_path, **kwargs)
        except OSError as err:
            if not os.path.isdir(name_or_path):
                raise OfflineHubError(offline_hint(name_or_path, "model")) from err
            raise
        if config.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"'{name_or_path}' is a '{config.model_type}' checkpoint, which is not a supported dual encoder. "
                f"Supported model types: {sorted(SUPPORTED_MODEL_TYPES)}."
            )
        # safetensors only: a pickle-only checkpoint (pytorch_model.bin) is refused, never unpickled
        model = AutoModel.from_pretrained(
            name_or_path, dtype=dtype or torch.float32, use_safetensors=True, **kwargs
        )
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, **kwargs)
        image_processor = AutoImageProcessor.from_pretrained(name_or_path, **kwargs)
        model.eval()
        return cls(model, tokenizer, image_processor, name_or_path, revision, text_pooling)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Save model, tokenizer and image processor so :meth:`from_pretrained` restores them."""
        if self.family == "dual_encoder":
            self.model.config.mdm_text_pooling = self.text_pooling
        self.model.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        self.image_processor.save_pretrained(directory)

    # ------------------------------------------------------------------ image side
    @property
    def image_size(self) -> int:
        """Side of the square pixel tensors the vision tower expects."""
        return int(self.model.config.vision_config.image_size)

    @property
    def image_mean(self) -> list[float]:
        return [float(v) for v in self.image_processor.image_mean]

    @property
    def image_std(self) -> list[float]:
        return [float(v) for v in self.image_processor.image_std]

    def preprocess_images(self, images: Sequence) -> torch.Tensor:
        """PIL images -> normalised pixel tensor ``[B, 3, S, S]`` (the teacher's pixel space)."""
        out = self.image_processor(images=list(images), return_tensors="pt")
        return out["pixel_values"].float()

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``E_v(x)``: the pooled vision output, before the projection. Differentiable in the pixels."""
        return self.model.vision_model(pixel_values=pixel_values).pooler_output

    def project_image(self, features: torch.Tensor) -> torch.Tensor:
        """``normalize(P_v(features))``."""
        if self.family != "siglip":
            features = self.model.visual_projection(features)
        return F.normalize(features, dim=-1)

    def image_embeds(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``z_v``: unit-norm image embeddings from normalised pixels."""
        return self.project_image(self.image_features(pixel_values))

    # ------------------------------------------------------------------ text side
    @property
    def text_feature_dim(self) -> int:
        """Dimension of the frozen text features ``e`` (input of the text projection)."""
        return int(self.text_projection.in_features)

    @property
    def text_projection(self) -> nn.Linear:
        """``P_t`` as a module."""
        if self.family == "siglip":
            return self.model.text_model.head
        return self.model.text_projection

    def tokenize(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        """Tokenise captions the way the family was trained (SigLIP pads to max length)."""
        padding = "max_length" if self.family == "siglip" else True
        max_length = getattr(self.model.config.text_config, "max_position_embeddings", None)
        return self.tokenizer(
            list(captions), padding=padding, truncation=True, max_length=max_length, return_tensors="pt"
        )

    def text_features_from_tokens(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``e = E_t(c)`` from token ids: the pooled text output, before the projection."""
        if self.family == "siglip":
            # SigLIP's text model applies its head inside; take the state before it (last token, post-LN).
            # SigLIP was trained on max-length padded text WITHOUT a padding mask (big_vision; pad == eos in the
            # released tokenizers), so the mask is deliberately not passed: with it the features would differ.
            hidden = self.model.text_model(input_ids=input_ids).last_hidden_state
            return hidden[:, -1, :]
        out = self.model.text_model(input_ids=input_ids, attention_mask=attention_mask)
        if self.text_pooling == "mean":
            mask = (
                attention_mask if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.long)
            )
            mask = mask.unsqueeze(-1).to(out.last_hidden_state.dtype)
            return (out.last_hidden_state * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        if self.text_pooling == "last":
            return out.last_hidden_state[:, -1, :]
        return out.pooler_output

    @torch.no_grad()
    def encode_text_features(
        self, captions: Sequence[str], batch_size: int = 256, progress: bool = False
    ) -> torch.Tensor:
        """Frozen text features for captions, ``[N, D]`` float32 on CPU (no gradient: ``E_t`` is frozen)."""
        from tqdm.auto import tqdm

        device = next(self.parameters()).device
        chunks = []
        starts = range(0, len(captions), batch_size)
        for start in tqdm(starts, desc="text features", disable=not progress):
            tokens = self.tokenize(captions[start : start + batch_size])
            tokens = {k: v.to(device) for k, v in tokens.items()}
            feats = self.text_features_from_tokens(tokens["input_ids"], tokens.get("attention_mask"))
            chunks.append(feats.float().cpu())
        if not chunks:
            return torch.zeros(0, self.text_feature_dim)
        return torch.cat(chunks)

    def project_text(self, features: torch.Tensor) -> torch.Tensor:
        """``z_t = normalize(P_t(e))`` for given (frozen or learned) text features."""
        return F.normalize(self.text_projection(features), dim=-1)

    # ------------------------------------------------------------------ similarity
    @property
    def logit_scale(self) -> torch.Tensor:
        """The multiplier applied to cosine similarities: ``exp(logit_scale)`` (always exponentiated here)."""
        return self.model.logit_scale.exp()

    @property
    def logit_bias(self) -> torch.Tensor | None:
        """SigLIP's additive logit bias; ``None`` for softmax (CLIP-style) models."""
        return getattr(self.model, "logit_bias", None)

    @property
    def contrastive_loss_type(self) -> str:
        """The contrastive loss the family was trained with: ``"siglip"`` (sigmoid) or ``"clip"`` (softmax)."""
        return "siglip" if self.family == "siglip" else "clip"

    # ------------------------------------------------------------------ parameter roles
    def parameter_groups(self) -> ParameterGroups:
        """Parameter names of ``self.model`` by role: vision tower, projections (+ scale/bias), text tower."""
        projection_prefixes = ["visual_projection.", "text_projection.", "text_model.head."]
        projection_names = {"logit_scale", "logit_bias"}
        vision, projections, text = [], [], []
        for name, _ in self.model.named_parameters():
            if name in projection_names or any(name.startswith(p) for p in projection_prefixes):
                projections.append(name)
            elif name.startswith("vision_model."):
                vision.append(name)
            elif name.startswith("text_model."):
                text.append(name)
            else:
                raise ValueError(f"Parameter '{name}' of the {self.family} model has no known role.")
        return ParameterGroups(vision=vision, projections=projections, text=text)

    def freeze_text_tower(self) -> None:
        """Freeze ``E_t`` (MDM never trains or merges it)."""
        params = dict(self.model.named_parameters())
        for name in self.parameter_groups().text:
            params[name].requires_grad_(False)

    def forward(
        self, pixel_values: torch.Tensor, text_features: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Unit-norm image and text embeddings for pixels and text features."""
        return self.image_embeds(pixel_values), self.project_text(text_features)
