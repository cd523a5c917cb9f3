"""Linear probe: masked BCE, subsets, label matrix, training on features and on real images."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from cxr_search.datasets import write_manifest
from cxr_search.datasets.manifest import ManifestRow
from cxr_search.errors import ConfigError, DatasetError
from cxr_search.images import eval_transform, load_image
from cxr_search.inference import Embedder
from cxr_search.model import create_model
from tests.helpers.numerics import assert_relative_close
from train.probe import default_epochs, extract_features, probe_from_manifest, run_probe
from train.probe_labels import label_matrix, masked_bce, subsample


def _row(i: int, split: str, labels: dict, path: str = "") -> ManifestRow:
    return ManifestRow(dataset="synth", split=split, patient_id=f"p{i}", study_id=f"s{i}", image_id=f"i{i}",
                       image_path=path or f"/nonexistent/img{i}.png", view="PA", labels=labels, label_vocab="synth")


@pytest.fixture(scope="module")
def tiny():
    return create_model("tiny")


@pytest.fixture(scope="module")
def embedder(tiny):
    return Embedder(tiny, device="cpu")


# ------------------------------------------------------------------------------------------- pieces
def test_masked_bce_matches_naive_loop():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 4, generator=g) * 3
    targets = (torch.rand(7, 4, generator=g) > 0.5).float()
    mask = (torch.rand(7, 4, generator=g) > 0.3).float()
    total, count = 0.0, 0
    for i in range(7):
        for j in range(4):
            if mask[i, j]:
                p = 1.0 / (1.0 + math.exp(-float(logits[i, j])))
                t = float(targets[i, j])
                total += -(t * math.log(p) + (1 - t) * math.log(1 - p))
                count += 1
    assert float(masked_bce(logits, targets, mask)) == pytest.approx(total / count, rel=1e-5)
    # Masked entries carry no gradient; nothing known gives 0, not NaN.
    logits.requires_grad_(True)
    masked_bce(logits, targets, mask).backward()
    assert torch.all(logits.grad[mask == 0] == 0)
    assert float(masked_bce(logits.detach(), targets, torch.zeros_like(mask))) == 0.0
    # Same as torch's BCE on the known entries, also for large logits.
    big = logits.detach() * 20
    ref = torch.nn.functional.binary_cross_entropy_with_logits(big[mask > 0], targets[mask > 0])
    torch.testing.assert_close(masked_bce(big, targets, mask), ref, rtol=1e-5, atol=1e-5)


def test_subsample_deterministic_and_sized():
    a, b = subsample(1000, 0.1, seed=3), subsample(1000, 0.1, seed=3)
    assert np.array_equal(a, b) and len(a) == 100 and len(set(a.tolist())) == 100
    assert np.all(np.diff(a) > 0) and a.min() >= 0 and a.max() < 1000
    assert not np.array_equal(a, subsample(1000, 0.1, seed=4))
    assert len(subsample(5, 0.1, seed=0)) == 1  # at least one row
    assert len(subsample(25, 0.1, seed=0)) == 2  # round(2.5) as pandas' sample(frac=) does
    assert np.array_equal(subsample(7, 1.0, seed=9), np.arange(7))
    assert len(subsample(0, 0.5, seed=0)) == 0
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ConfigError):
            subsample(10, bad, seed=0)
    assert default_epochs(0.1) == 300 and default_epochs(1.0) == 30


def test_label_matrix_masks_uncertain_and_missing():
    rows = [_row(0, "train", {"B": 1.0, "C": -1.0}), _row(1, "train", {"A": 0.0, "B": 0.0}), _row(2, "train", {})]
    classes, y, m = label_matrix(rows)
    assert classes == ["B", "C", "A"]  # first appearance
    assert y.tolist() == [[1, 0, 0], [0, 0, 0], [0, 0, 0]]
    assert m.tolist() == [[1, 0, 0], [1, 0, 1], [0, 0, 0]]
    _, y0, m0 = label_matrix(rows, ["C", "B"], uncertain="zero")
    assert y0.tolist() == [[0, 1], [0, 0], [0, 0]] and m0.tolist() == [[1, 1], [0, 1], [0, 0]]
    _, y1, _ = label_matrix(rows, ["C"], uncertain="one")
    assert y1[0, 0] == 1
    with pytest.raises(DatasetError):
        label_matrix([_row(0, "train", {})])
    with pytest.raises(ConfigError):
        label_matrix(rows, uncertain="maybe")


# ------------------------------------------------------------------------------- probe on features
def _separable(n: int, split: str, seed: int, dim: int = 16):
    """Rows + features where class "Pos" is the sign of feature 0 and "Neg" of -feature 1."""
    rng = np.random.default_rng(seed)
    feats = rng.normal(size=(n, dim)).astype(np.float32)
    rows, cache = [], {}
    for i in range(n):
        labels = {"Pos": float(feats[i, 0] > 0), "Neg": float(feats[i, 1] < 0), "Const": 1.0}
        if i % 5 == 0:
            labels["Neg"] = -1.0  # uncertain: masked out
        row = _row(i + (0 if split == "train" else 10_000), split, labels)
        rows.append(row)
        cache[row.image_path] = torch.from_numpy(feats[i])
    return rows, cache


def test_probe_learns_linearly_separable_features(embedder):
    train, cache = _separable(300, "train", seed=0)
    test, test_cache = _separable(120, "test", seed=1)
    cache.update(test_cache)
    rng_before = torch.get_rng_state()
    result = run_probe(embedder, train, test, fraction=1.0, epochs=40, batch_size=32, lr=0.05, seed=0,
                       features_cache=cache)
    assert torch.equal(rng_before, torch.get_rng_state())  # the global RNG is left alone
    assert result.classes == ["Pos", "Neg", "Const"]
    assert result.skipped == ["Const"] and set(result.auroc) == {"Pos", "Neg"}
    assert result.auroc["Pos"] > 0.9 and result.auroc["Neg"] > 0.9 and result.mean_auroc > 0.9
    assert result.n_train == 300 and result.n_test == 120 and result.epochs == 40
    assert len(result.train_loss) == 40 and result.train_loss[-1] < result.train_loss[0]
    again = run_probe(embedder, train, test, fraction=1.0, epochs=40, batch_size=32, lr=0.05, seed=0, features_cache=cache)
    assert again.train_loss == result.train_loss and again.auroc == result.auroc
    json.dumps(result.to_dict())

    # Reference protocol defaults: 10 % of the labels -> 300 epochs at AdamW 5e-5, batch 256.
    few = run_probe(embedder, train, test, fraction=0.1, seed=0, features_cache=cache)
    assert few.epochs == 300 and few.n_train == 30 and len(few.train_loss) == 300
    assert few.settings["lr"] == 5e-5 and few.settings["batch_size"] == 256
    assert all(math.isfinite(v) for v in few.auroc.values())


def test_probe_errors(embedder):
    train, cache = _separable(40, "train", seed=0)
    test, test_cache = _separable(20, "test", seed=1)
    cache.update(test_cache)
    with pytest.raises(DatasetError, match="Nodule"):
        run_probe(embedder, train, test, classes=["Pos", "Nodule"], epochs=1, features_cache=cache)
    with pytest.raises(DatasetError):
        run_probe(embedder, [_row(0, "train", {})], test, epochs=1, features_cache=cache)
    with pytest.raises(DatasetError):
        run_probe(embedder, train, [_row(9, "test", {"Const": -1.0})], epochs=1, features_cache=cache)
    with pytest.raises(DatasetError, match="both positive and negative"):
        run_probe(embedder, train, test, classes=["Const"], epochs=1, features_cache=cache)
    with pytest.raises(ConfigError):
        run_probe(embedder, train, test, fraction=0.0, features_cache=cache)


# ----------------------------------------------------------------------------------- real images
@pytest.fixture(scope="module")
def image_rows(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe_imgs")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(14):
        bright = i % 2 == 0
        arr = rng.integers(120, 255, (48, 40)) if bright else rng.integers(0, 120, (48, 40))
        path = root / f"img{i}.png"
        Image.fromarray(arr.astype(np.uint8), mode="L").save(path)
        split = "test" if i >= 10 else "train"
        rows.append(_row(i, split, {"Bright": float(bright), "Other": [1.0, 0.0, -1.0][i % 3]}, str(path)))
    return rows


def test_extract_features_matches_direct_forward(tiny, image_rows):
    paths = [r.image_path for r in image_rows[:5]]
    tiny.train()
    embedder = Embedder(tiny, device="cpu")
    assert not tiny.training  # building the Embedder puts the model in eval mode, once
    feats = extract_features(embedder, paths, batch_size=2)
    assert not tiny.image_tower.training  # extracting features leaves the mode alone
    assert feats.shape == (5, tiny.image_tower.feature_dim) and feats.dtype == torch.float32
    pre = tiny.config.preprocess
    with torch.no_grad():
        for i, p in enumerate(paths):
            direct = tiny.image_features(eval_transform(load_image(p, pre), pre)[None])[0]  # [F]
            # A batch of 2 and a batch of 1 run differently blocked kernels: whole-vector relative error
            # measured <= 2e-7 (AVX2 and AVX-512, one or two threads), while ReLU zeros make element-wise
            # relative errors meaningless. 1e-5 is 50x that and far below any wrong image or preprocessing.
            assert_relative_close(feats[i], direct, 1e-5, msg=str(p))
    assert extract_features(embedder, []).shape == (0, tiny.image_tower.feature_dim)


def test_run_probe_end_to_end_on_images(tiny, embedder, image_rows):
    train = [r for r in image_rows if r.split == "train"]
    test = [r for r in image_rows if r.split == "test"]
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    cache: dict = {}
    result = run_probe(embedder, train, test, epochs=3, batch_size=4, features_cache=cache)
    assert all(torch.equal(v, tiny.state_dict()[k]) for k, v in before.items())  # tower frozen
    assert set(cache) == {r.image_path for r in image_rows}
    assert result.n_train == 10 and result.n_test == 4 and len(result.train_loss) == 3
    assert "Bright" in result.auroc and all(math.isfinite(x) for x in result.train_loss)
    assert math.isfinite(result.mean_auroc) and 0.0 <= result.mean_auroc <= 1.0 and result.seconds > 0


def test_probe_from_manifest(embedder, image_rows, tmp_path):
    manifest = tmp_path / "m.csv"
    write_manifest(image_rows, manifest)
    result = probe_from_manifest(embedder, [str(manifest)], classes=["Bright"], epochs=2)
    assert result.classes == ["Bright"] and result.n_train == 10 and result.n_test == 4
    with pytest.raises(DatasetError, match="splits present: test, train"):
        probe_from_manifest(embedder, [str(manifest)], test_split="validate", epochs=1)
    with pytest.raises(ConfigError):
        probe_from_manifest(embedder, [str(manifest)], test_split="train", epochs=1)
