"""The Embedder owns inference (mode, device, channels-last, precision, batching); the model stays a plain module."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cxr_search.errors import ConfigError
from cxr_search.images import preprocess_item
from cxr_search.inference import Embedder
from cxr_search.model import ClipOutput, create_model


def _images(n: int = 3) -> list:
    rng = np.random.default_rng(0)
    return [(rng.random((70 + 9 * i, 64)) * 255).astype(np.uint8) for i in range(n)]


def test_encoding_tensors_leaves_a_training_model_alone():
    model = create_model("tiny").train()
    convs = [p for p in model.image_tower.parameters() if p.ndim == 4]
    tokens = model.require_tokenizer()(["small left effusion", "no pneumothorax"])
    out = model(torch.randn(2, 3, 64, 64), tokens["input_ids"], tokens["attention_mask"])
    assert isinstance(out, ClipOutput) and out.image.shape == out.text.shape == (2, 64)
    assert torch.allclose(out.logit_scale, model.logit_scale.exp())
    model.encode_image(torch.randn(2, 3, 64, 64))
    model.encode_text(tokens["input_ids"], tokens["attention_mask"])
    assert model.training and all(m.training for m in model.modules())  # still training
    assert convs and all(p.is_contiguous() for p in convs)  # layout untouched (NCHW)
    assert not any("int8" in k for k in vars(model))


def test_building_an_embedder_prepares_the_model_once():
    model = create_model("tiny").train()
    embedder = Embedder(model, device="cpu")
    assert not model.training and not any(m.training for m in model.modules())  # eval mode, now
    assert embedder.model is model and embedder.device == torch.device("cpu")
    assert embedder.precision == "fp32" and embedder.text_precision == "fp32"
    assert embedder.config is model.config and embedder.embed_dim == 64
    convs = [p for p in model.image_tower.parameters() if p.ndim == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)  # conv trunk: NHWC
    images = _images()
    emb = embedder.embed_images(images)
    assert not model.training  # embedding does not touch the mode either
    # The model step alone, on preprocessed pixels, gives the same rows.
    pixels = torch.stack([preprocess_item(im, model.config.preprocess) for im in images])
    np.testing.assert_allclose(embedder.embed_pixels(pixels), emb, atol=1e-6)
    # A model put back into training is refused, not silently embedded with batch statistics.
    model.train()
    with pytest.raises(RuntimeError, match="training mode"):
        embedder.embed_images(images)
    with pytest.raises(RuntimeError, match="training mode"):
        embedder.embed_texts(["effusion"])
    np.testing.assert_array_equal(Embedder(model, device="cpu").embed_images(images), emb)  # a new Embedder is fine


def test_embedder_settings_and_errors():
    model = create_model("tiny")
    with pytest.raises(ConfigError, match="precision"):
        Embedder(model, precision="int4")
    with pytest.raises(ConfigError, match="fp16"):
        Embedder(model, device="cpu", precision="fp16")
    with pytest.raises(ConfigError, match="batch_size"):
        Embedder(model, batch_size=0)
    with pytest.raises(ConfigError, match="num_workers"):
        Embedder(model, num_workers=-1)
    embedder = Embedder(model, device="cpu", batch_size=2, text_batch_size=1)
    assert (embedder.batch_size, embedder.text_batch_size, embedder.num_workers) == (2, 1, 0)
    assert embedder.embed_images([]).shape == (0, 64) and embedder.embed_texts([]).shape == (0, 64)
    assert embedder.image_features([]).shape == (0, model.image_tower.feature_dim)
    # A bare string is one text.
    np.testing.assert_array_equal(embedder.embed_texts("effusion"), embedder.embed_texts(["effusion"]))
    # Overrides per call give the same numbers as the Embedder's own batch sizes.
    images = _images(5)
    np.testing.assert_allclose(embedder.embed_images(images, batch_size=5), embedder.embed_images(images), atol=1e-5)
