"""DualEncoder over the tiny CLIP / SigLIP / VisionTextDualEncoder checkpoints, loaded through the real
``from_pretrained`` path (AutoConfig / AutoModel / AutoTokenizer / AutoImageProcessor).

Every feature is checked against an independent computation on the underlying ``transformers`` model: the
family's own ``get_*_features`` / full forward, or a hand-written pooling.
"""

import time

import pytest
import torch
import torch.nn.functional as F

from mdm_hf import testing
from mdm_hf.models import DualEncoder, OfflineHubError

FAMILIES = ("clip", "siglip", "dual_encoder")
CAPTIONS = ["a red square", "a picture of a blue circle on the background", "the stripe green"]
ATOL = 1e-5


@pytest.fixture(scope="module")
def encoders(tiny_model_dirs) -> dict:
    """One loaded encoder per family, shared by the read-only tests of this module."""
    return {family: DualEncoder.from_pretrained(path) for family, path in tiny_model_dirs.items()}


def _pixels(encoder: DualEncoder, n: int = 3) -> torch.Tensor:
    images = [
        testing.toy_image(c, s, 32, seed=i) for i, (c, s) in enumerate(zip(testing.COLOURS, testing.SHAPES))
    ]
    return encoder.preprocess_images(images[:n])


def _reference_tokens(encoder: DualEncoder, captions) -> dict:
    """Tokens made with the tokenizer directly, the way each family is used in transformers' own examples."""
    if encoder.family == "siglip":
        return encoder.tokenizer(list(captions), padding="max_length", max_length=16, return_tensors="pt")
    return encoder.tokenizer(list(captions), padding=True, truncation=True, return_tensors="pt")


def _pooled(out) -> torch.Tensor:
    """transformers 5 returns a ModelOutput from get_*_features (projected features in ``pooler_output``)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


# ---------------------------------------------------------------------------------------------- loading
@pytest.mark.parametrize("family", FAMILIES)
def test_loads_through_auto_classes(encoders, family):
    enc = encoders[family]
    expected_model = {
        "clip": "CLIPModel",
        "siglip": "SiglipModel",
        "dual_encoder": "VisionTextDualEncoderModel",
    }
    assert enc.family == family
    assert type(enc.model).__name__ == expected_model[family]
    assert enc.text_pooling == {"clip": "pooler", "siglip": "last", "dual_encoder": "mean"}[family]
    assert not enc.model.training
    images = [testing.toy_image("red", "square", 40), testing.toy_image("blue", "circle", 24)]
    pixels = enc.preprocess_images(images)
    direct = enc.image_processor(images=images, return_tensors="pt")["pixel_values"]
    assert pixels.shape == (2, 3, enc.image_size, enc.image_size) == (2, 3, 32, 32)
    assert torch.equal(pixels, direct.float())
    assert len(enc.image_mean) == len(enc.image_std) == 3


@pytest.mark.parametrize("family", FAMILIES)
def test_checkpoints_load_through_auto_processor(encoders, tiny_model_dirs, family):
    """The fixtures are complete Hub-layout checkpoints: AutoProcessor agrees with the encoder's own pieces."""
    from transformers import AutoProcessor

    enc = encoders[family]
    processor = AutoProcessor.from_pretrained(tiny_model_dirs[family])
    images = [testing.toy_image("green", "stripe", 32)]
    padding = "max_length" if family == "siglip" else True
    out = processor(text=CAPTIONS, images=images, padding=padding, truncation=True, return_tensors="pt")
    assert torch.equal(out["pixel_values"].float(), enc.preprocess_images(images))
    assert torch.equal(out["input_ids"], enc.tokenize(CAPTIONS)["input_ids"])


# ---------------------------------------------------------------------------------------------- image side
@pytest.mark.parametrize("family", FAMILIES)
def test_image_embeds_unit_norm_and_differentiable(encoders, family):
    enc = encoders[family]
    pixels = _pixels(enc).requires_grad_(True)
    z = enc.image_embeds(pixels)
    torch.testing.assert_close(z.norm(dim=-1), torch.ones(len(z)), atol=ATOL, rtol=0)
    weights = torch.randn(z.shape, generator=torch.Generator().manual_seed(0))
    (z * weights).sum().backward()
    assert pixels.grad is not None
    assert torch.isfinite(pixels.grad).all()
    assert pixels.grad.abs().sum() > 0
    # every image gets its own gradient (no sample is detached from the graph)
    assert (pixels.grad.flatten(1).abs().sum(1) > 0).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_image_embeds_match_get_image_features(encoders, family):
    enc = encoders[family]
    pixels = _pixels(enc)
    with torch.no_grad():
        ours = enc.image_embeds(pixels)
        reference = F.normalize(_pooled(enc.model.get_image_features(pixel_values=pixels)), dim=-1)
    torch.testing.assert_close(ours, reference, atol=ATOL, rtol=0)
    # image_features is the input of P_v: the vision tower's pooled output, not yet projected
    with torch.no_grad():
        feats = enc.image_features(pixels)
    assert feats.shape == (3, enc.model.config.vision_config.hidden_size)
    torch.testing.assert_close(enc.project_image(feats), ours, atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------------------------- text side
@torch.no_grad()
def test_clip_text_features_are_eos_state_and_match_get_text_features(encoders):
    enc = encoders["clip"]
    tokens = _reference_tokens(enc, CAPTIONS)
    feats = enc.encode_text_features(CAPTIONS)
    # independent: the final-layer state at the first EOS token (CLIP's pooling), read off last_hidden_state
    hidden = enc.model.text_model(**tokens).last_hidden_state
    eos_id = enc.tokenizer.eos_token_id
    for i, ids in enumerate(tokens["input_ids"]):
        first_eos = ids.tolist().index(eos_id)
        torch.testing.assert_close(feats[i], hidden[i, first_eos], atol=ATOL, rtol=0)
    reference = F.normalize(_pooled(enc.model.get_text_features(**tokens)), dim=-1)
    torch.testing.assert_close(enc.project_text(feats), reference, atol=ATOL, rtol=0)
    assert feats.shape == (3, enc.text_feature_dim)


@torch.no_grad()
def test_siglip_text_features_are_head_input(encoders):
    enc = encoders["siglip"]
    tokens = _reference_tokens(enc, CAPTIONS)
    assert tokens["input_ids"].shape[1] == 16  # SigLIP is used padded to max length
    feats = enc.encode_text_features(CAPTIONS)
    # SigLIP was trained without a padding mask (big_vision); its text model applies the head inside.
    out = enc.model.text_model(input_ids=tokens["input_ids"])
    torch.testing.assert_close(feats, out.last_hidden_state[:, -1, :], atol=ATOL, rtol=0)
    torch.testing.assert_close(
        enc.project_text(feats), F.normalize(out.pooler_output, dim=-1), atol=ATOL, rtol=0
    )
    assert enc.text_projection is enc.model.text_model.head


@torch.no_grad()
def test_dual_encoder_text_features_are_masked_mean(encoders):
    enc = encoders["dual_encoder"]
    tokens = _reference_tokens(enc, CAPTIONS)
    feats = enc.encode_text_features(CAPTIONS)
    out = enc.model.text_model(**tokens)
    # hand-computed sentence-transformers pooling: mean of the states of the real (unpadded) tokens
    expected = torch.stack(
        [
            out.last_hidden_state[i, : int(tokens["attention_mask"][i].sum())].mean(0)
            for i in range(len(CAPTIONS))
        ]
    )
    torch.testing.assert_close(feats, expected, atol=ATOL, rtol=0)
    z_t = F.normalize(enc.model.text_projection(expected), dim=-1)
    torch.testing.assert_close(enc.project_text(feats), z_t, atol=ATOL, rtol=0)
    # the test can tell mean pooling from BERT's pooler (CLS -> dense -> tanh)
    assert not torch.allclose(feats, out.pooler_output, atol=1e-3)


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_encode_text_features_equals_features_from_tokens(encoders, family):
    enc = encoders[family]
    tokens = enc.tokenize(CAPTIONS)
    direct = enc.text_features_from_tokens(tokens["input_ids"], tokens.get("attention_mask"))
    torch.testing.assert_close(enc.encode_text_features(CAPTIONS, batch_size=2), direct, atol=ATOL, rtol=0)
    assert enc.encode_text_features([]).shape == (0, enc.text_feature_dim)


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_padding_does_not_change_a_caption_feature(encoders, family):
    enc = encoders[family]
    short, long = "a red square", "a picture of a big red square on the background"
    together = enc.encode_text_features([long, short])
    alone = torch.cat([enc.encode_text_features([long]), enc.encode_text_features([short])])
    torch.testing.assert_close(together, alone, atol=ATOL, rtol=0)
    assert not torch.allclose(together[0], together[1], atol=1e-3)


@pytest.mark.parametrize("family", ["clip", "siglip"])
@torch.no_grad()
def test_logits_match_the_models_own_forward(encoders, family):
    """z_v, z_t, exp(logit_scale) and SigLIP's bias reproduce the model's logits (CLIP softmax / SigLIP sigmoid)."""
    enc = encoders[family]
    pixels = _pixels(enc)
    tokens = _reference_tokens(enc, CAPTIONS)
    if family == "siglip":
        tokens = {"input_ids": tokens["input_ids"]}
    out = enc.model(pixel_values=pixels, **tokens)
    z_v, z_t = enc(pixels, enc.encode_text_features(CAPTIONS))
    logits = enc.logit_scale * z_v @ z_t.T
    if enc.logit_bias is not None:
        logits = logits + enc.logit_bias
    torch.testing.assert_close(z_v, out.image_embeds, atol=ATOL, rtol=0)
    torch.testing.assert_close(z_t, out.text_embeds, atol=ATOL, rtol=0)
    torch.testing.assert_close(logits, out.logits_per_image, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_logit_scale_is_exponentiated_and_bias_only_for_siglip(tiny_model_dirs, family):
    enc = DualEncoder.from_pretrained(tiny_model_dirs[family])
    with torch.no_grad():
        enc.model.logit_scale.fill_(1.5)  # exp(1.5) != 1.5: a missing exp cannot pass
    torch.testing.assert_close(enc.logit_scale, torch.tensor(1.5).exp().reshape(enc.logit_scale.shape))
    if family == "siglip":
        assert enc.logit_bias is enc.model.logit_bias
        assert enc.contrastive_loss_type == "siglip"
    else:
        assert enc.logit_bias is None
        assert enc.contrastive_loss_type == "clip"


# ---------------------------------------------------------------------------------------------- parameter roles
@pytest.mark.parametrize("family", FAMILIES)
def test_parameter_groups_partition_all_parameters(encoders, family):
    enc = encoders[family]
    groups = enc.parameter_groups()
    names = [n for n, _ in enc.model.named_parameters()]
    vision, proj, text = set(groups.vision), set(groups.projections), set(groups.text)
    assert len(groups.vision) + len(groups.projections) + len(groups.text) == len(names)
    assert vision | proj | text == set(names)
    assert not (vision & proj) and not (vision & text) and not (proj & text)
    assert groups.trainable == groups.vision + groups.projections
    expected_proj = {"logit_scale"} | {
        "clip": {"visual_projection.weight", "text_projection.weight"},
        "siglip": {"text_model.head.weight", "text_model.head.bias", "logit_bias"},
        "dual_encoder": {"visual_projection.weight", "text_projection.weight"},
    }[family]
    assert proj == expected_proj
    assert all(n.startswith("vision_model.") for n in vision)
    assert all(n.startswith("text_model.") and not n.startswith("text_model.head.") for n in text)


@pytest.mark.parametrize("family", FAMILIES)
def test_parameter_groups_match_what_each_feature_depends_on(tiny_model_dirs, family):
    """Gradients flow from E_v(x) only into "vision", from E_t(c) only into "text", from P_t only into projections."""
    enc = DualEncoder.from_pretrained(tiny_model_dirs[family])
    groups = enc.parameter_groups()
    params = dict(enc.model.named_parameters())

    def touched(loss: torch.Tensor) -> set:
        enc.model.zero_grad(set_to_none=True)
        loss.backward()
        return {n for n, p in params.items() if p.grad is not None and p.grad.abs().sum() > 0}

    vision = touched(enc.image_features(_pixels(enc)).pow(2).sum())
    assert vision and vision <= set(groups.vision)
    tokens = enc.tokenize(CAPTIONS)
    text_feats = enc.text_features_from_tokens(tokens["input_ids"], tokens.get("attention_mask"))
    text = touched(text_feats.pow(2).sum())
    assert text and text <= set(groups.text)
    image_feats = enc.image_features(_pixels(enc)).detach()
    e = torch.randn(2, enc.text_feature_dim)
    projections = touched(enc.project_text(e).sum() + enc.project_image(image_feats).pow(2).sum())
    assert projections and projections <= set(groups.projections)


@pytest.mark.parametrize("family", FAMILIES)
def test_freeze_text_tower(tiny_model_dirs, family):
    enc = DualEncoder.from_pretrained(tiny_model_dirs[family])
    groups = enc.parameter_groups()
    enc.freeze_text_tower()
    params = dict(enc.model.named_parameters())
    assert not any(params[n].requires_grad for n in groups.text)
    assert all(params[n].requires_grad for n in groups.trainable)
    z_v, z_t = enc(_pixels(enc), enc.encode_text_features(CAPTIONS))
    (z_v @ z_t.T).sum().backward()
    assert all(params[n].grad is None for n in groups.text)
    assert params[groups.vision[0]].grad is not None


# ---------------------------------------------------------------------------------------------- save / load
@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_save_pretrained_round_trip(encoders, family, tmp_path):
    enc = encoders[family]
    enc.save_pretrained(tmp_path)
    back = DualEncoder.from_pretrained(str(tmp_path))
    assert back.family == family and back.text_pooling == enc.text_pooling
    pixels = _pixels(enc)
    assert torch.equal(back.image_embeds(pixels), enc.image_embeds(pixels))
    assert torch.equal(back.encode_text_features(CAPTIONS), enc.encode_text_features(CAPTIONS))
    assert torch.equal(back.tokenize(CAPTIONS)["input_ids"], enc.tokenize(CAPTIONS)["input_ids"])
    torch.testing.assert_close(back.logit_scale, enc.logit_scale, atol=0, rtol=0)
    if family == "dual_encoder":
        assert back.text_pooling == "mean"


@torch.no_grad()
def test_dual_encoder_pooling_override_is_used_and_saved(tiny_model_dirs, tmp_path):
    enc = DualEncoder.from_pretrained(tiny_model_dirs["dual_encoder"], text_pooling="pooler")
    assert enc.text_pooling == "pooler"
    tokens = _reference_tokens(enc, CAPTIONS)
    torch.testing.assert_close(
        enc.encode_text_features(CAPTIONS), enc.model.text_model(**tokens).pooler_output, atol=ATOL, rtol=0
    )
    enc.save_pretrained(tmp_path)
    assert DualEncoder.from_pretrained(str(tmp_path)).text_pooling == "pooler"
    source = DualEncoder.from_pretrained(tiny_model_dirs["dual_encoder"])
    assert source.text_pooling == "mean"  # the source checkpoint is untouched


def test_invalid_text_pooling_is_rejected(tiny_clip_dir):
    with pytest.raises(ValueError, match="text_pooling"):
        DualEncoder.from_pretrained(tiny_clip_dir, text_pooling="max")


def test_revision_passes_through_for_a_local_dir(tiny_clip_dir):
    enc = DualEncoder.from_pretrained(tiny_clip_dir, revision="main")
    assert enc.revision == "main" and enc.name_or_path == tiny_clip_dir
    assert enc.encode_text_features(CAPTIONS[:1]).shape == (1, enc.text_feature_dim)


# ---------------------------------------------------------------------------------------------- errors
def test_not_a_dual_encoder_checkpoint(tmp_path):
    from transformers import BertConfig, BertModel

    BertModel(
        BertConfig(
            hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, vocab_size=30
        )
    ).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not a supported dual encoder") as info:
        DualEncoder.from_pretrained(str(tmp_path))
    assert "'bert'" in str(info.value) and "clip" in str(info.value)


def test_hub_id_offline_fails_fast_with_a_local_path_hint():
    # import the auto classes first so the timing measures the lookup, not the lazy import
    from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoTokenizer  # noqa: F401

    start = time.perf_counter()
    with pytest.raises(OfflineHubError) as info:
        DualEncoder.from_pretrained("some-user/some-clip-model")
    elapsed = time.perf_counter() - start
    assert isinstance(info.value, OSError)
    message = str(info.value)
    assert "some-user/some-clip-model" in message and "offline" in message.lower()
    assert "local directory" in message and "--model_name_or_path" in message
    assert elapsed < 2.0, f"offline failure took {elapsed:.1f}s (retries?)"


def test_missing_local_directory_is_reported_as_such(tmp_path):
    missing = str(tmp_path / "no" / "such" / "model")
    with pytest.raises(OSError) as info:
        DualEncoder.from_pretrained(missing)
    message = str(info.value)
    assert missing in message and "does not exist" in message
    assert "hf download" not in message  # not a Hub id: downloading it makes no sense
