"""Configs, presets, towers, tokenizer, inference API and our checkpoint format on tiny models."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

from cxr_search.checkpoints import load_model, model_fingerprint, save_model
from cxr_search.config import ModelConfig, get_model_config, list_models, parse_set_options
from cxr_search.errors import CheckpointError, ConfigError, ImageReadError, TokenizerError
from cxr_search.images import eval_transform
from cxr_search.inference import Embedder, cpu_has_fast_bf16, resolve_precision
from cxr_search.model import create_model
from cxr_search.tokenizer import TextTokenizer, basic_vocab
from cxr_search.towers import IMAGE_BACKENDS, TEXT_POOLING, ImageTower


def test_registry_has_released_and_small_presets():
    names = list_models()
    for name in ("cxr-clip-r50", "cxr-clip-swint", "tiny", "small"):
        assert name in names
    r50 = get_model_config("cxr-clip-r50")
    assert r50.embed_dim == 512 and r50.image.name == "resnet50" and r50.text.pooling == "eos"
    assert r50.text.bert_config["vocab_size"] == 28996 and r50.tokenizer.max_length == 256
    swin = get_model_config("cxr-clip-swint")
    assert swin.image.backend == "hf_swin" and swin.image.pooling == "first_token"
    assert swin.preprocess.mean == (0.5, 0.5, 0.5)


def test_overrides_change_config_and_unknown_keys_fail():
    cfg = get_model_config("tiny", embed_dim=32, image={"name": "resnet18"}, preprocess={"crop_size": 48})
    assert (cfg.embed_dim, cfg.image.name, cfg.preprocess.crop_size) == (32, "resnet18", 48)
    assert cfg.preprocess.resize == 64  # untouched siblings survive
    with pytest.raises(ConfigError, match="image.nmae"):
        get_model_config("tiny", image={"nmae": "x"})
    with pytest.raises(ConfigError, match="unknown model preset"):
        get_model_config("no-such-preset")
    with pytest.raises(ConfigError, match="'preprocess.crop_size': expected an integer, got \"48\""):
        get_model_config("tiny", preprocess={"crop_size": "48"})  # `--set preprocess.crop_size='"48"'`
    assert parse_set_options(["image.name=resnet18", "embed_dim=16", "preprocess.mean=[0.5,0.5,0.5]"]) == {
        "image": {"name": "resnet18"}, "embed_dim": 16, "preprocess": {"mean": [0.5, 0.5, 0.5]}}
    # Round trip through a plain dict (what checkpoints store).
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_tiny_is_seeded_and_embeddings_are_normalised():
    a, b = create_model("tiny"), create_model("tiny")
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=False):
        assert ka == kb and torch.equal(va, vb)
    texts = ["Large right pleural effusion.", "no acute process", "cardiomegaly"]
    emb = Embedder(a).embed_texts(texts)
    assert emb.shape == (3, 64) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    img = (np.random.default_rng(0).random((90, 70)) * 4000).astype(np.uint16)
    out = Embedder(a).embed_images([img, Image.fromarray((img / 16).astype(np.uint8))], batch_size=1)
    assert out.shape == (2, 64)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)


def test_text_pooling_matches_naive_loop():
    hidden = torch.randn(3, 7, 5)
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] * 2 + [0] * 5])
    eos = TEXT_POOLING["eos"](hidden, mask)
    mean = TEXT_POOLING["mean"](hidden, mask)
    for i in range(3):
        n = int(mask[i].sum())
        assert torch.equal(eos[i], hidden[i, n - 1])
        assert torch.allclose(mean[i], hidden[i, :n].mean(0), atol=1e-6)
    assert torch.equal(TEXT_POOLING["cls"](hidden, mask), hidden[:, 0])


def test_image_backends_are_a_registry_with_actionable_errors():
    assert set(IMAGE_BACKENDS) == {"timm", "hf_swin"}
    assert IMAGE_BACKENDS["timm"].channels_last and not IMAGE_BACKENDS["hf_swin"].channels_last
    cfg = get_model_config("tiny").image
    with pytest.raises(ConfigError, match="unknown image.backend 'keras'; registered backends: timm, hf_swin"):
        ImageTower(replace(cfg, backend="keras"))
    with pytest.raises(ConfigError, match="image.pooling 'first_token' is not supported with backend timm; use avg"):
        ImageTower(replace(cfg, pooling="first_token"))
    tower = ImageTower(cfg)
    assert tower.channels_last and all(k.startswith("trunk.") for k in tower.state_dict())
    # The swin backend's own pooling choices, on a two-stage toy Swin.
    swin = get_model_config("cxr-clip-swint").image
    small = replace(swin, model_kwargs={**swin.model_kwargs, "embed_dim": 8, "depths": [1, 1], "num_heads": [1, 1],
                                        "image_size": 32, "window_size": 2})
    with pytest.raises(ConfigError, match="not supported with backend hf_swin; use first_token or mean"):
        ImageTower(replace(small, pooling="avg"))
    pixels = torch.randn(2, 3, 32, 32)
    first, mean = ImageTower(small).eval(), ImageTower(replace(small, pooling="mean")).eval()
    mean.load_state_dict(first.state_dict())
    with torch.no_grad():
        hidden = first.trunk(pixel_values=pixels).last_hidden_state  # [B, N, F]
        assert torch.equal(first(pixels), hidden[:, 0]) and torch.allclose(mean(pixels), hidden.mean(dim=1))
    assert first.feature_dim == 16 and not first.channels_last


def test_batched_inference_equals_one_by_one_and_workers():
    embedder = Embedder(create_model("tiny"))
    rng = np.random.default_rng(1)
    images = [(rng.random((80 + 7 * i, 64 + 5 * i)) * 255).astype(np.uint8) for i in range(5)]
    batched = embedder.embed_images(images, batch_size=4)
    single = np.concatenate([embedder.embed_images([im]) for im in images])
    # Batch sizes pick differently blocked kernels. The rows are unit vectors, so an absolute tolerance is a
    # relative one: measured differences <= 6e-8 (AVX2 and AVX-512, one or two threads), 1e-5 leaves 150x.
    np.testing.assert_allclose(batched, single, atol=1e-5)
    texts = ["a", "pleural effusion on the right", "no pneumothorax", "heart size is normal", "b c"]
    batched_t = embedder.embed_texts(texts, batch_size=2)
    single_t = np.concatenate([embedder.embed_texts([t]) for t in texts])
    np.testing.assert_allclose(batched_t, single_t, atol=1e-5)


def test_bf16_close_to_fp32():
    model = create_model("tiny")
    images = [(np.random.default_rng(i).random((96, 96)) * 255).astype(np.uint8) for i in range(4)]
    fp32 = Embedder(model).embed_images(images)
    bf16 = Embedder(model, precision="bf16").embed_images(images)
    assert bf16.dtype == np.float32
    assert (fp32 * bf16).sum(1).min() > 0.99
    with pytest.raises(ConfigError, match="precision"):
        Embedder(model, precision="int4")


def test_eval_transform_equals_torchvision():
    pre = get_model_config("cxr-clip-r50").preprocess
    tf = T.Compose([T.Resize(224), T.CenterCrop(224), T.ToTensor(), T.Normalize(pre.mean, pre.std)])
    rng = np.random.default_rng(3)
    for h, w in [(300, 260), (224, 224), (225, 700), (100, 90)]:
        grey = Image.fromarray((rng.random((h, w)) * 255).astype(np.uint8), mode="L")
        assert torch.equal(eval_transform(grey, pre), tf(grey.convert("RGB")))
        rgb = Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8), mode="RGB")
        assert torch.allclose(eval_transform(rgb, pre), tf(rgb), atol=1e-6)


def test_image_files_and_errors(tmp_path):
    embedder = Embedder(create_model("tiny"))
    arr = (np.random.default_rng(0).random((120, 100)) * 255).astype(np.uint8)
    Image.fromarray(arr).save(tmp_path / "a.png")
    Image.fromarray(arr).save(tmp_path / "b.jpg", quality=95)
    Image.fromarray(arr.astype(np.uint16) * 256).save(tmp_path / "c16.png")
    emb = embedder.embed_images([tmp_path / "a.png", str(tmp_path / "b.jpg"), tmp_path / "c16.png"])
    # A 16-bit PNG of the same content is scaled, not clipped: its embedding stays close.
    assert float(emb[0] @ emb[2]) > 0.99
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(ImageReadError, match="broken.png"):
        embedder.embed_images([tmp_path / "broken.png"])
    with pytest.raises(ImageReadError, match="missing.png"):
        embedder.embed_images([tmp_path / "missing.png"])


def test_tokenizer_dir_train_and_errors(tmp_path):
    tok = TextTokenizer.basic(max_length=16)
    assert tok.vocab_size == len(basic_vocab()) == 141
    enc = tok(["a much longer text than sixteen characters", "ab"])
    assert enc["input_ids"].shape == (2, 16) and enc["attention_mask"][1].sum() == 4
    tok.save(tmp_path / "tok")
    again = TextTokenizer.from_dir(tmp_path / "tok", max_length=16)
    assert again.sha256() == tok.sha256()
    corpus = ["right pleural effusion", "left pleural effusion", "no pneumothorax", "cardiomegaly"] * 20
    trained = TextTokenizer.train(corpus, vocab_size=200)
    assert "effusion" in trained.vocab and trained.tokenize("pleural effusion")[1:-1] == ["pleural", "effusion"]
    with pytest.raises(TokenizerError, match="vocab.txt"):
        TextTokenizer.from_dir(tmp_path / "nowhere")
    # A vocabulary larger than the text tower's embedding table is refused.
    with pytest.raises(TokenizerError, match="tokenizer has"):
        create_model("tiny", tokenizer=trained.__class__(trained.vocab + [f"x{i}" for i in range(200)]))


def test_own_format_round_trip_and_errors(tmp_path):
    model = create_model("tiny")
    out = save_model(model, tmp_path / "m", provenance={"note": "test"})
    again = load_model(out)
    assert model_fingerprint(again) == model_fingerprint(model)
    assert again.provenance["note"] == "test" and "weights_sha256" in again.provenance
    texts = ["no effusion", "large left effusion"]
    np.testing.assert_array_equal(Embedder(model).embed_texts(texts), Embedder(again).embed_texts(texts))
    # Saving over an existing directory replaces it atomically.
    save_model(again, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    (out / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="safetensors"):
        load_model(out)
    with pytest.raises(CheckpointError, match="config.json"):
        load_model(tmp_path)
    # A different preprocessing changes the fingerprint even with equal weights.
    other = create_model("tiny", preprocess={"resize": 72})
    assert model_fingerprint(other) != model_fingerprint(model)


def test_model_folder_tokenizer_must_be_the_saved_one(tmp_path, caplog):
    """A missing or edited vocab.txt would tokenise differently from training: refused, not replaced."""
    trained = TextTokenizer.train(["large left pleural effusion", "no effusion"] * 3, vocab_size=60, max_length=32)
    model = create_model("tiny", tokenizer=trained)
    out = save_model(model, tmp_path / "m")
    texts = ["small right effusion"]
    again = load_model(out)
    assert again.tokenizer.max_length == 32 != model.config.tokenizer.max_length  # the saved tokenizer's, not the config's
    np.testing.assert_array_equal(Embedder(again).embed_texts(texts), Embedder(model).embed_texts(texts))
    vocab = (out / "vocab.txt").read_text(encoding="utf-8")
    (out / "vocab.txt").write_text(vocab + "extra\n", encoding="utf-8")
    with pytest.raises(CheckpointError, match="differ from the ones saved"):
        load_model(out)
    (out / "vocab.txt").unlink()  # the tiny preset's built-in tokenizer must not stand in for it
    with pytest.raises(CheckpointError, match="vocab.txt is missing"):
        load_model(out)
    # A tokenizer passed explicitly is the user's choice: used, with a warning when it is another one.
    with caplog.at_level("WARNING"):
        other = load_model(out, tokenizer=TextTokenizer.basic(max_length=32))
    assert other.tokenizer.vocab == basic_vocab() and "differs from the one saved" in caplog.text


def test_fingerprint_describes_the_saved_weights_not_a_carried_over_value(tmp_path):
    """A model loaded from one checkpoint, trained on and saved again must not keep the old fingerprint."""
    start = load_model(save_model(create_model("tiny"), tmp_path / "start"))
    old = start.provenance["fingerprint"]
    with torch.no_grad():
        next(start.parameters()).add_(0.01)  # "training" changes the weights, provenance is carried along
    resumed = load_model(save_model(start, tmp_path / "resumed"))
    assert resumed.provenance["fingerprint"] == model_fingerprint(resumed) != old
    meta = json.loads((tmp_path / "resumed" / "config.json").read_text())
    assert meta["provenance"]["fingerprint"] == model_fingerprint(resumed)


def test_auto_precision_never_picks_emulated_bf16():
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == ("bf16" if cpu_has_fast_bf16() else "fp32")
    assert resolve_precision("fp32", cpu) == "fp32" and resolve_precision("bf16", cpu) == "bf16"
    with pytest.raises(ConfigError, match="fp16"):
        Embedder(create_model("tiny"), device="cpu").embed_texts(["x"], precision="fp16")


def test_dicom_input_goes_through_the_photometric_chain(tmp_path):
    from pydicom.data import get_testdata_file

    from cxr_search.dicom.read import read_dicom
    from cxr_search.images import resize_shorter_side

    embedder = Embedder(create_model("tiny"))
    src = get_testdata_file("CT_small.dcm")
    pixels = read_dicom(src).pixels
    # The DICOM path = read_dicom's 8-bit pixels, resized to the configured shorter side, then the
    # eval transform, exactly as for an 8-bit image given directly.
    expected_img = resize_shorter_side(Image.fromarray(pixels, mode="L"), embedder.config.preprocess.dicom_shorter_side)
    got = embedder.embed_images([src])
    np.testing.assert_allclose(got, embedder.embed_images([expected_img]), atol=1e-6)
    # Extension-less DICOM files are recognised by their magic bytes.
    copy = tmp_path / "IM0001"
    copy.write_bytes(Path(src).read_bytes())
    np.testing.assert_allclose(embedder.embed_images([copy]), got, atol=1e-6)


def test_int8_query_encoder_is_close_to_fp32_and_tracks_weights():
    model = create_model("tiny")
    embedder = Embedder(model, device="cpu")
    texts = ["large right pleural effusion", "no acute cardiopulmonary process", "enlarged heart"] * 3
    fp32 = embedder.embed_texts(texts)
    int8 = embedder.embed_texts(texts, precision="int8")
    assert int8.dtype == np.float32 and np.allclose(np.linalg.norm(int8, axis=1), 1, atol=1e-5)
    assert float((fp32 * int8).sum(1).min()) > 0.999
    assert not any("int8" in k for k in model.state_dict())  # the cached copy is not part of the model
    assert not any("int8" in k for k in vars(model))  # ... nor stored on it: the Embedder keeps it
    with torch.no_grad():  # changing the weights in place rebuilds the quantised copy
        model.text_projection.weight.mul_(-1)
    flipped = embedder.embed_texts(texts, precision="int8")
    assert float((flipped * embedder.embed_texts(texts)).sum(1).min()) > 0.999
    assert float((flipped * int8).sum(1).max()) < 0.5
    # An Embedder whose default text precision is int8 (a CPU query service) gives the same numbers.
    queries = Embedder(model, device="cpu", text_precision="int8")
    np.testing.assert_array_equal(queries.embed_texts(texts), flipped)
    with pytest.raises(ConfigError, match="int8"):
        Embedder(model, device="cpu", precision="int8")  # int8 is a text-encoder precision only
