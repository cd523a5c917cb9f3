"""The resized 8-bit image cache (``cxr-search data cache``) and manifest interoperability."""

from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from cxr_search.cache import CACHE_INFO_FILE, build_cache, cache_path
from cxr_search.config import PreprocessConfig
from cxr_search.datasets import manifest
from cxr_search.datasets.manifest import ManifestRow
from cxr_search.errors import ConfigError, DatasetError
from cxr_search.images import load_image
from tests.helpers.dicom_files import make_ds, save
from tests.helpers.image_files import PRE, noisy, row, write_png
from train.dataset import StudyDataset, read_manifest_rows


# ---------------------------------------------------------------------------------- cache
def test_cache_writes_resized_copies_and_reuses(tmp_path):
    src = tmp_path / "src"
    wide = noisy((100, 200), seed=1)
    tall_rgb = np.repeat(noisy((150, 90), seed=2)[..., None], 3, axis=2)
    colour = np.stack([noisy((60, 60), s) for s in (3, 4, 5)], axis=2)
    rows = [
        row("openi", "s1", "wide/1", write_png(src / "wide.png", wide), findings="x"),
        row("openi", "s1", "tall", write_png(src / "tall.png", tall_rgb)),
        row("openi", "s2", "colour", write_png(src / "colour.jpg", colour)),
        row("openi", "s3", "broken", str(src / "nope.png")),
    ]
    out = tmp_path / "cache"
    res = build_cache(rows, out, shorter_side=48, workers=2, progress=False)
    assert (res.cached, res.reused) == (3, 0)
    assert res.failed == [(str(src / "nope.png"), "file not found")]
    assert [r["image_id"] for r in res.rows] == ["wide/1", "tall", "colour"]
    assert res.rows[0]["findings"] == "x"
    for r, (size, mode) in zip(res.rows, [((96, 48), "L"), ((48, 80), "L"), ((48, 48), "RGB")], strict=False):
        assert Path(r["image_path"]) == cache_path(out, "openi", r["image_id"])
        with Image.open(r["image_path"]) as im:
            assert (im.size, im.mode, im.format) == (size, mode, "PNG")
    # The obvious computation: PIL bilinear resize of the source.
    with Image.open(src / "wide.png") as im:
        want = np.asarray(im.resize((96, 48), Image.Resampling.BILINEAR))
    assert np.array_equal(np.asarray(Image.open(res.rows[0]["image_path"])), want)
    with Image.open(src / "tall.png") as im:
        want = np.asarray(im.convert("L").resize((48, 80), Image.Resampling.BILINEAR))
    assert np.array_equal(np.asarray(Image.open(res.rows[1]["image_path"])), want)
    assert json.loads((out / CACHE_INFO_FILE).read_text())["shorter_side"] == 48

    old = 1_000_000_000
    for r in res.rows:
        os.utime(r["image_path"], (old, old))
    again = build_cache(rows, out, shorter_side=48, workers=2, progress=False)
    assert (again.cached, again.reused, len(again.failed)) == (0, 3, 1)
    assert [r["image_path"] for r in again.rows] == [r["image_path"] for r in res.rows]
    assert all(os.stat(r["image_path"]).st_mtime == old for r in again.rows)
    # The cached manifest itself can be cached again: all reused.
    assert build_cache(res.rows, out, shorter_side=48, workers=1, progress=False).reused == 3
    with pytest.raises(ConfigError, match="shorter side 48"):
        build_cache(rows, out, shorter_side=64, progress=False)


def test_cache_ignores_partial_and_empty_files(tmp_path):
    paths = [write_png(tmp_path / f"{k}.png", noisy((64, 80), seed=k)) for k in range(3)]
    rows = [row("synth", f"s{k}", f"i{k}", p) for k, p in enumerate(paths)]
    out = tmp_path / "cache"
    # What a killed run leaves: a half-written temporary, and (after a crash) an empty final file.
    t0, t1 = cache_path(out, "synth", "i0"), cache_path(out, "synth", "i1")
    t0.parent.mkdir(parents=True, exist_ok=True)
    t0.with_name(t0.name + ".partial").write_bytes(b"\x89PNG half")
    t1.parent.mkdir(parents=True, exist_ok=True)
    t1.write_bytes(b"")
    res = build_cache(rows, out, shorter_side=32, workers=1, progress=False)
    assert (res.cached, res.reused, res.failed) == (3, 0, [])
    for r in res.rows:
        with Image.open(r["image_path"]) as im:
            im.load()
            assert min(im.size) == 32
    assert not list(out.rglob("*.partial"))


def test_cache_dicom_input(tmp_path):
    yy, xx = np.mgrid[0:200, 0:160]
    raw = (xx * 15 + yy * 5).astype(np.uint16)  # 12-bit ramp (max 3380), brighter to the right and down
    dcm = tmp_path / "img.dcm"
    save(make_ds(raw, bits_stored=12), dcm)
    bare = tmp_path / "extensionless"
    bare.write_bytes(dcm.read_bytes())
    rows = [row("pacs", "s1", "1.2.3", str(dcm)), row("pacs", "s1", "1.2.4", str(bare))]
    res = build_cache(rows, tmp_path / "cache", shorter_side=64, workers=2, progress=False)
    assert (res.cached, res.failed) == (2, [])
    want = np.asarray(load_image(dcm, PreprocessConfig(dicom_shorter_side=64)))
    for r in res.rows:
        with Image.open(r["image_path"]) as im:
            assert (im.size, im.mode) == ((64, 80), "L")
            got = np.asarray(im)
        assert np.array_equal(got, want)
    # Min-max to 8 bits of a monotone ramp, MONOCHROME2: dark top-left, bright bottom-right.
    small = cv2.resize(raw.astype(np.float64), (64, 80), interpolation=cv2.INTER_AREA)
    assert np.corrcoef(small.ravel(), want.astype(np.float64).ravel())[0, 1] > 0.99
    assert want[0, 0] < 10 and want[-1, -1] > 245


def test_read_manifest_rows(tmp_path):
    path = tmp_path / "m.csv"
    cols = ["dataset", "split", "patient_id", "study_id", "image_id", "image_path", "view", "findings"]
    path.write_text(",".join(cols) + "\n" + "openi,train,p,s,i,/x.png,PA,\"a, b\"\nopeni,test,p,s2,j,/y.png,PA,\n")
    rows = read_manifest_rows(path, split="train")
    assert len(rows) == 1 and rows[0]["findings"] == "a, b"
    (tmp_path / "bad.csv").write_text("dataset,split\nopeni,train\n")
    with pytest.raises(DatasetError, match="bad.csv.*study_id"):
        read_manifest_rows(tmp_path / "bad.csv")


def test_manifest_rows_interoperate(tmp_path):
    paths = [write_png(tmp_path / f"{k}.png", noisy((60, 70), seed=k)) for k in range(3)]
    rows = [
        ManifestRow("chexpert", "train", "p1", "s1", "a", paths[0], "PA", labels={"Edema": 1.0}, label_vocab="chexpert"),
        ManifestRow("chexpert", "train", "p1", "s1", "b", paths[1], "LATERAL", labels={"Edema": 1.0}, label_vocab="chexpert"),
        ManifestRow("openi", "train", "p2", "s2", "c", paths[2], "PA", findings="Clear.", impression="Normal."),
    ]
    manifest.write_manifest(rows, tmp_path / "m.csv")
    typed = manifest.read_manifest(tmp_path / "m.csv", split="train")
    cached = build_cache(typed, tmp_path / "cache", shorter_side=32, workers=1, progress=False)
    manifest.write_manifest(cached.rows, tmp_path / "cached.csv")
    for source in (typed, read_manifest_rows(tmp_path / "cached.csv", split="train")):
        ds = StudyDataset(source, PRE, train=False)
        assert len(ds) == 2 and "edema" in ds[0]["text1"].lower() and ds[1]["text2"] == "Normal."
    assert all(Path(r.image_path).parent.parent.parent == tmp_path / "cache" for r in manifest.read_manifest(tmp_path / "cached.csv"))
