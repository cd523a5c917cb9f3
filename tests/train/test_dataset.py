"""Training augmentation, the study-level dataset and collate, and the resized image cache.

Images are generated here with numpy/PIL (and one DICOM with pydicom); every fast path is compared
with a slow, obvious computation of the same thing (torchvision on RGB, a direct cv2 call, PIL's
resize of the source file).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Dict, List

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms as T

from cxr_search.config import PreprocessConfig
from cxr_search.errors import ConfigError, DatasetError, ImageReadError
from cxr_search.images import eval_transform, load_image
from cxr_search.labels import label_set_key
from cxr_search.tokenizer import TextTokenizer
from tests.helpers.image_files import PRE, noisy, row, write_png
from train.augment import TrainTransform, apply_clahe, train_transform
from train.config import AugmentConfig
from train.dataset import StudyDataset, epoch_generator, make_collate

SWIN_PRE = PreprocessConfig(resize=64, crop_size=64, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), dicom_shorter_side=128)


# ---------------------------------------------------------------------------------- helpers
def left_heavy(h: int = 80, w: int = 96, seed: int = 0) -> Image.Image:
    """Bright left 40 %, dark right 60 %, with noise and a soft vertical gradient."""
    rng = np.random.default_rng(seed)
    arr = np.full((h, w), 40.0)
    arr[:, : int(0.4 * w)] = 200.0
    arr += np.linspace(-15, 15, h)[:, None] + rng.normal(0, 10, (h, w))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), mode="L")


def mean_transform(img: Image.Image) -> torch.Tensor:
    """Stand-in augmentation that identifies an image by its mean (module level: picklable)."""
    return torch.full((3, 2, 2), float(np.asarray(img, dtype=np.float64).mean()))


def mean_of(x: torch.Tensor) -> int:
    return int(round(float(x[0, 0, 0])))


@pytest.fixture()
def flat_images(tmp_path: Path):
    """Constant-grey PNGs whose level identifies them: level -> path."""
    def make(*levels: int) -> Dict[int, str]:
        return {lv: write_png(tmp_path / f"img{lv}.png", np.full((40, 48), lv, np.uint8)) for lv in levels}
    return make


# ---------------------------------------------------------------------------------- augment
def test_transform_shape_dtype_and_grey_rgb_equivalence():
    t = train_transform(PRE)
    grey = Image.fromarray(noisy((90, 110)), mode="L")
    torch.manual_seed(3)
    a = t(grey)
    torch.manual_seed(3)
    b = t(grey.convert("RGB"))  # same picture stored as RGB: same result
    assert a.shape == (3, 64, 64) and a.dtype == torch.float32 and torch.isfinite(a).all()
    assert torch.equal(a, b)
    colour = Image.fromarray(np.stack([noisy((90, 110), s) for s in (1, 2, 3)], axis=2), mode="RGB")
    c = t(colour)
    assert c.shape == (3, 64, 64) and not torch.equal(c[0], c[1])
    with pytest.raises(TypeError):
        t(np.zeros((64, 64), np.uint8))


def test_transform_matches_torchvision_on_rgb():
    """The grey fast path equals the obvious pipeline: torchvision on an RGB copy, cv2 CLAHE, ToTensor+Normalize."""
    for p, clip in ((0.0, 2.0), (1.0, 3.0)):
        fast = train_transform(SWIN_PRE, AugmentConfig(clahe_p=p, clahe_clip=(clip, clip)))
        crop = T.RandomResizedCrop(64, scale=(0.8, 1.1))
        jitter = T.ColorJitter(0.1, 0.2, 0.2, 0.1)
        norm = T.Compose([T.ToTensor(), T.Normalize(SWIN_PRE.mean, SWIN_PRE.std)])
        img = Image.fromarray(noisy((100, 84), seed=5, sd=40), mode="L")
        for seed in range(12):
            torch.manual_seed(seed)
            got = fast(img)
            torch.manual_seed(seed)
            x = crop(img.convert("RGB"))
            fire = torch.rand(1).item() < p  # the same two draws the transform makes
            torch.empty(1).uniform_(clip, clip)
            if fire:
                g = cv2.createCLAHE(clipLimit=clip, tileGridSize=(8, 8)).apply(np.asarray(x)[..., 0].copy())
                x = Image.fromarray(np.repeat(g[..., None], 3, axis=2))
            want = norm(jitter(x))
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_no_horizontal_flip():
    t = train_transform(PRE)
    assert "Flip" not in repr(t) and not any("Flip" in type(v).__name__ for v in vars(t).values())
    img = left_heavy()
    for seed in range(60):
        torch.manual_seed(seed)
        x = t(img)[0]
        left, right = float(x[:, :32].mean()), float(x[:, 32:].mean())
        assert left > right + 0.3, f"seed {seed}: left {left:.2f} right {right:.2f}: image flipped?"


def test_clahe_applied_about_half_the_time():
    # Square image of the crop size, scale 1, no jitter: the output is the image, CLAHE'd or not.
    img_arr = noisy((64, 64), seed=7, sd=30)
    img = Image.fromarray(img_arr, mode="L")
    t = train_transform(PRE, AugmentConfig(scale=(1.0, 1.0), clahe_clip=(2.0, 2.0), jitter=(0, 0, 0, 0)))
    plain = eval_transform(img, PRE)
    equalised = eval_transform(Image.fromarray(cv2.createCLAHE(2.0, (8, 8)).apply(img_arr)), PRE)
    assert not torch.equal(plain, equalised)
    fired = 0
    n = 200
    for seed in range(n):
        torch.manual_seed(seed)
        out = t(img)
        if torch.equal(out, equalised):
            fired += 1
        else:
            assert torch.equal(out, plain), f"seed {seed}: neither the image nor its CLAHE"
    assert 0.38 * n < fired < 0.62 * n, fired


def test_apply_clahe_against_cv2():
    arr = noisy((48, 40), seed=2)
    ref = cv2.createCLAHE(clipLimit=3.5, tileGridSize=(4, 4)).apply(arr)
    assert np.array_equal(np.asarray(apply_clahe(Image.fromarray(arr), 3.5, 4)), ref)
    rgb = np.asarray(apply_clahe(Image.fromarray(arr).convert("RGB"), 3.5, 4))
    assert all(np.array_equal(rgb[..., c], ref) for c in range(3))
    colour = np.stack([arr, noisy((48, 40), seed=3), noisy((48, 40), seed=4)], axis=2)
    lab = cv2.cvtColor(colour, cv2.COLOR_RGB2LAB)
    lab[..., 0] = cv2.createCLAHE(clipLimit=3.5, tileGridSize=(4, 4)).apply(lab[..., 0].copy())
    assert np.array_equal(np.asarray(apply_clahe(Image.fromarray(colour), 3.5, 4)), cv2.cvtColor(lab, cv2.COLOR_LAB2RGB))


def test_transform_deterministic_given_seed_and_random_otherwise():
    t = train_transform(PRE)
    img = Image.fromarray(noisy((80, 96), seed=1), mode="L")
    outs = []
    for seed in (11, 11, 12):
        torch.manual_seed(seed)
        outs.append(t(img))
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])


def test_transform_parameters_validated_and_scale_above_one():
    with pytest.raises(ConfigError):
        train_transform(PRE, AugmentConfig(scale=(1.1, 0.8)))
    with pytest.raises(ConfigError):
        train_transform(PRE, AugmentConfig(clahe_p=1.5))
    with pytest.raises(ConfigError):
        train_transform(PreprocessConfig(interpolation="cubic-ish"))
    t = train_transform(PRE, AugmentConfig(scale=(1.05, 1.1)))  # never fits: torchvision's centre-crop fallback
    torch.manual_seed(0)
    assert t(Image.fromarray(noisy((70, 90)), mode="L")).shape == (3, 64, 64)
    assert isinstance(t, TrainTransform)


# ---------------------------------------------------------------------------------- dataset: images
def test_prefers_frontal_and_lateral(flat_images):
    p = flat_images(30, 60, 90, 200)
    rows = [
        row("mimic-cxr", "s1", "a", p[30], "PA", findings="Clear."),
        row("mimic-cxr", "s1", "b", p[60], "AP"),
        row("mimic-cxr", "s1", "c", p[90], "UNKNOWN"),
        row("mimic-cxr", "s1", "d", p[200], "LATERAL"),
    ]
    ds = StudyDataset(rows, PRE, transform=mean_transform)
    seen_pairs = set()
    for seed in range(60):
        torch.manual_seed(seed)
        s = ds[0]
        pair = (mean_of(s["image1"]), mean_of(s["image2"]))
        assert 200 in pair and ({30, 60} & set(pair)), pair  # always one frontal and the lateral
        seen_pairs.add(pair)
    assert {(30, 200), (200, 30), (60, 200), (200, 60)} <= seen_pairs


def test_two_different_images_without_view_pairs(flat_images):
    p = flat_images(30, 60, 90, 120, 150)
    rows = [
        row("chexpert", "s1", "a", p[30], "PA", labels='{"Edema": 1.0}', label_vocab="chexpert"),
        row("chexpert", "s1", "b", p[60], "PA"),
        row("chexpert", "s1", "c", p[90], "AP"),
        row("chexpert", "s2", "d", p[120], "PA", labels='{"Edema": 0.0}', label_vocab="chexpert"),
        row("chexpert", "s2", "e", p[150], "UNKNOWN"),
        row("chexpert", "s3", "f", p[30], "AP", labels='{"Edema": 0.0}', label_vocab="chexpert"),
    ]
    ds = StudyDataset(rows, PRE, transform=mean_transform)
    used = set()
    for seed in range(40):
        torch.manual_seed(seed)
        s1, s2 = ds[0], ds[1]
        a, b = mean_of(s1["image1"]), mean_of(s1["image2"])
        assert a != b and {a, b} <= {30, 60, 90}
        used |= {a, b}
        assert {mean_of(s2["image1"]), mean_of(s2["image2"])} == {120, 150}
        s3 = ds[2]
        assert mean_of(s3["image1"]) == mean_of(s3["image2"]) == 30  # one image: twice
    assert used == {30, 60, 90}


def test_single_image_gets_two_independent_augmentations(tmp_path):
    path = write_png(tmp_path / "x.png", noisy((90, 100), seed=9))
    ds = StudyDataset([row("openi", "s", "i", path, findings="Normal heart.")], PRE)
    torch.manual_seed(0)
    s = ds[0]
    assert s["image1"].shape == s["image2"].shape == (3, 64, 64)
    assert not torch.equal(s["image1"], s["image2"])


# ---------------------------------------------------------------------------------- dataset: texts
def test_report_texts_drawn_from_sections_with_paraphrases(flat_images):
    p = flat_images(50)
    f, i, para = "Heart size normal. Lungs clear.", "No acute process.", "The lungs are clear and the heart is normal."
    rows = [
        row("mimic-cxr", "s1", "a", p[50], findings=f, impression=i),
        row("mimic-cxr", "s2", "b", p[50], impression=i),
        row("openi", "s3", "c", p[50], report_text="Only a full report."),
    ]
    ds = StudyDataset(rows, PRE, text_paraphrases={f: [para]}, transform=mean_transform)
    texts, same, paras = set(), 0, 0
    for seed in range(200):
        torch.manual_seed(seed)
        s = ds[0]
        texts |= {s["text1"], s["text2"]}
        same += s["text1"] == s["text2"]
        paras += (s["text1"] == para) + (s["text2"] == para)
        s2 = ds[1]
        assert s2["text1"] == s2["text2"] == i
        assert ds[2]["text1"] == "Only a full report."
    assert texts == {f, i, para}
    assert same > 20  # with replacement: both texts often the same section
    # Each text is findings with p 1/2, then paraphrased with p 1/2: 400 draws * 1/4.
    assert 60 < paras < 140, paras


def test_label_only_studies_get_prompt_reports(flat_images):
    p = flat_images(50)
    rows = [
        row("chexpert", "s1", "a", p[50], labels=json.dumps({"Cardiomegaly": 1.0, "Edema": 0.0, "Fracture": ""}),
            label_vocab="chexpert"),
        row("chestxray14", "s2", "b", p[50], labels=json.dumps({"Mass": 1.0}), label_vocab="chestxray14"),
    ]
    ds = StudyDataset(rows, PRE, transform=mean_transform)
    differ = 0
    for seed in range(30):
        torch.manual_seed(seed)
        s = ds[0]
        for text in (s["text1"], s["text2"]):
            assert "cardiomegaly" in text.lower() and "edema" in text.lower() and "fracture" not in text.lower()
        differ += s["text1"] != s["text2"]
        s2 = ds[1]
        assert "lung mass" in s2["text1"].lower()
        assert s2["text1"].count(".") == 4  # the positive plus 3 extra negatives
    assert differ > 10  # two independent reports


def test_studies_without_text_or_labels_dropped(flat_images, caplog):
    p = flat_images(50)
    rows = [
        row("pacs", "s1", "a", p[50], findings="Clear lungs."),
        row("pacs", "s2", "b", p[50]),
        row("pacs", "s3", "c", p[50], labels='{"Edema": ""}', label_vocab="chexpert"),
    ]
    with caplog.at_level(logging.WARNING, logger="train.dataset"):
        ds = StudyDataset(rows, PRE)
    assert len(ds) == 1 and ds.study_key(0) == ("pacs", "s1")
    assert "dropped 2 of 3 studies" in caplog.text
    with pytest.raises(DatasetError, match="no usable study"):
        StudyDataset(rows[1:], PRE)
    with pytest.raises(DatasetError, match="not valid JSON"):
        StudyDataset([row("chexpert", "s", "a", p[50], labels="{Edema: 1}")], PRE)
    with pytest.raises(DatasetError, match="pacs/s9"):
        StudyDataset([row("pacs", "s9", "a", p[50], labels='{"Edema": 2.0}')], PRE)
    with pytest.raises(DatasetError, match="image_path"):
        StudyDataset([row("pacs", "s1", "a", "", findings="x")], PRE)


def test_label_set_key_depends_on_the_positive_set_only():
    a = label_set_key({"Edema": 1.0, "Cardiomegaly": 1.0, "Pneumothorax": 0.0})
    assert a == label_set_key({"cardiomegaly": 1.0, " Edema ": 1.0})  # order, case, negatives
    assert a == label_set_key({"Edema": 1.0, "Cardiomegaly": 1.0, "Pneumonia": -1.0, "Fracture": None})
    assert a != label_set_key({"Edema": 1.0})
    assert a != label_set_key({"Edema": 1.0, "Cardiomegaly": 1.0, "Pneumonia": 1.0})
    normal = label_set_key({"No Finding": 1.0})
    assert normal == label_set_key({}) == label_set_key({"Edema": 0.0, "Effusion": -1.0})
    assert normal != a and 0 <= normal < 2**62 and 0 <= a < 2**62
    # With names, labels outside them do not count (any case), but their values are still checked.
    names = ["edema", "CARDIOMEGALY"]
    assert label_set_key({"Edema": 1.0, "Cardiomegaly": 1.0, "Fracture": 1.0}, names) == a
    assert label_set_key({"Fracture": 1.0}, names) == normal
    assert label_set_key({"Fracture": 1.0}, names) != label_set_key({"Fracture": 1.0})
    with pytest.raises(ValueError, match="Fracture"):
        label_set_key({"Edema": 1.0, "Fracture": 2.0}, names)
    # "U-Ones": an uncertain label joins the set; "U-Zeros" (default) leaves it out.
    hedged = {"Edema": -1.0, "Cardiomegaly": 1.0, "Pneumothorax": 0.0}
    assert label_set_key(hedged, uncertain_positive=True) == a
    assert label_set_key(hedged) == label_set_key({"Cardiomegaly": 1.0})
    assert label_set_key(hedged, ["Cardiomegaly"], uncertain_positive=True) == label_set_key({"Cardiomegaly": 1.0})


def test_label_keys_of_report_and_label_studies(flat_images):
    p = flat_images(50)
    rows = [
        row("mimic-cxr", "r1", "a", p[50], findings="Mild edema.", labels=json.dumps({"Edema": 1.0})),
        row("mimic-cxr", "r2", "b", p[50], findings="Clear.", labels=json.dumps({"No Finding": 1.0})),
        row("pacs", "r3", "c", p[50], findings="Edema."),  # a report without labels
        row("chexpert", "l1", "d", p[50], labels=json.dumps({"Edema": 1.0, "Atelectasis": 0.0}), label_vocab="chexpert"),
    ]
    ds = StudyDataset(rows, PRE)
    keys = ds.label_keys(torch.tensor([0, 1, 2, 3]))
    assert keys.dtype == torch.int64
    assert keys.tolist() == [label_set_key({"Edema": 1.0}), label_set_key({}), -1, label_set_key({"Edema": 1.0})]
    assert ds.label_keys([3, 0]).tolist() == [keys[3], keys[0]]
    assert ds.labelled_studies == 3
    only = StudyDataset(rows, PRE, label_names=["Atelectasis"])  # the set ignores Edema: all are "normal"
    assert only.label_keys([0, 1, 2, 3]).tolist() == [label_set_key({})] * 2 + [-1, label_set_key({})]
    hedged = [row("mimic-cxr", "h1", "a", p[50], findings="Possible edema.", labels=json.dumps({"Edema": -1.0}))]
    assert StudyDataset(hedged, PRE).label_keys([0]).tolist() == [label_set_key({})]
    assert StudyDataset(hedged, PRE, uncertain_positive=True).label_keys([0]).tolist() == [keys[0]]
    with pytest.raises(DatasetError, match="mimic-cxr/r9.*not valid JSON"):
        StudyDataset([row("mimic-cxr", "r9", "a", p[50], findings="x", labels="{Edema")], PRE)
    with pytest.raises(DatasetError, match="mimic-cxr/r8.*Edema"):
        StudyDataset([row("mimic-cxr", "r8", "a", p[50], findings="x", labels='{"Edema": 2.0}')], PRE)


# ---------------------------------------------------------------------------------- dataset: validation
def test_validation_is_deterministic(tmp_path):
    a = write_png(tmp_path / "a.png", noisy((80, 96), seed=1))
    b = write_png(tmp_path / "b.png", noisy((96, 80), seed=2))
    rows = [
        row("mimic-cxr", "s1", "a", a, "PA", findings="F text.", impression="I text."),
        row("mimic-cxr", "s1", "b", b, "LATERAL"),
        row("chexpert", "s2", "c", b, "PA", labels='{"Edema": 1.0, "Cardiomegaly": 0.0}', label_vocab="chexpert"),
    ]
    ds = StudyDataset(rows, PRE, train=False, text_paraphrases={"F text.": ["Paraphrase."]})
    torch.manual_seed(0)
    s = ds[0]
    torch.manual_seed(1)
    again = ds[0]
    assert torch.equal(s["image1"], again["image1"]) and torch.equal(s["image2"], again["image2"])
    assert torch.equal(s["image1"], eval_transform(load_image(a, PRE), PRE))
    assert torch.equal(s["image2"], eval_transform(load_image(b, PRE), PRE))
    assert (s["text1"], s["text2"]) == ("F text.", "I text.")
    s2 = ds[1]
    assert s2["text1"] == s2["text2"] == "Pulmonary edema. No cardiomegaly."
    assert torch.equal(s2["image1"], s2["image2"])


# ---------------------------------------------------------------------------------- collate, loader
def test_collate_shapes():
    tok = TextTokenizer.basic()
    batch = [
        {"image1": torch.zeros(3, 64, 64), "image2": torch.ones(3, 64, 64), "text1": "short", "text2": "a longer text",
         "study_index": i}
        for i in range(3)
    ]
    out = make_collate(tok)(batch)
    assert out["image1"].shape == out["image2"].shape == (3, 3, 64, 64)
    assert out["text1"]["input_ids"].shape == (3, len("short") + 2)
    assert out["text2"]["attention_mask"].shape == out["text2"]["input_ids"].shape
    assert out["study_index"].tolist() == [0, 1, 2] and out["study_index"].dtype == torch.long


@pytest.mark.slow
def test_dataloader_with_two_workers_is_reproducible(tmp_path):
    rows = []
    for k in range(10):
        path = write_png(tmp_path / f"{k}.png", noisy((72, 80), seed=k))
        rows.append(row("openi", f"s{k}", f"i{k}", path, findings=f"Finding number {k}.", impression=f"Impression {k}."))
    ds = StudyDataset(rows, PRE)
    tok = TextTokenizer.basic()

    def run(epoch: int) -> List[Dict[str, Any]]:
        loader = DataLoader(ds, batch_size=4, shuffle=True, num_workers=2, collate_fn=make_collate(tok),
                            generator=epoch_generator(1234, epoch))
        return list(loader)

    first, second, other_epoch = run(0), run(0), run(1)
    assert not torch.equal(first[0]["study_index"], other_epoch[0]["study_index"])
    assert [b["image1"].shape[0] for b in first] == [4, 4, 2]
    assert sorted(i for b in first for i in b["study_index"].tolist()) == list(range(10))
    for x, y in zip(first, second, strict=False):
        assert torch.equal(x["study_index"], y["study_index"]) and torch.equal(x["image1"], y["image1"])
        assert torch.equal(x["text1"]["input_ids"], y["text1"]["input_ids"])
    assert first[0]["image1"].shape == (4, 3, 64, 64)


# ---------------------------------------------------------------------------------- unreadable files
def test_unreadable_image_substituted_and_logged_once(tmp_path, caplog):
    good = write_png(tmp_path / "good.png", np.full((40, 40), 77, np.uint8))
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    rows = [
        row("mimic-cxr", "s1", "bad", str(bad), "PA", findings="F."),
        row("mimic-cxr", "s1", "good", good, "LATERAL"),
        row("mimic-cxr", "s2", "gone", str(tmp_path / "missing.png"), "PA", findings="F."),
    ]
    for train in (True, False):
        ds = StudyDataset(rows, PRE, train=train, transform=mean_transform)
        with caplog.at_level(logging.WARNING, logger="train.dataset"):
            caplog.clear()
            for seed in range(5):
                torch.manual_seed(seed)
                s = ds[0]
                if train:
                    assert mean_of(s["image1"]) == mean_of(s["image2"]) == 77
                else:
                    assert torch.equal(s["image1"], eval_transform(load_image(good, PRE), PRE))
        warned = [r for r in caplog.records if "unreadable" in r.getMessage() and str(bad) in r.getMessage()]
        assert len(warned) == 1  # once per process, not once per sample
        with pytest.raises(ImageReadError, match="missing.png"):
            ds[1]
