"""``cxr-search bench overlap``: patient and image overlap between two manifests, checked against naive loops."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Dict, List, Set, Tuple

import numpy as np
import pytest
from PIL import Image

import cli
from cxr_search.datasets.manifest import ManifestRow, read_manifest, write_manifest
from cxr_search.evaluation.image_hash import (
    ContentHash,
    hash_files,
    near_duplicate_pairs,
    read_grey,
    stretch_to_full_range,
)
from cxr_search.evaluation.overlap import CRITERIA, id_namespace, overlap_manifests


def smooth_image(seed: int, shape: Tuple[int, int] = (96, 80), lo: int = 0, hi: int = 255) -> np.ndarray:
    """A random smooth uint8 image spanning lo..hi (different seeds give uncorrelated images)."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((6, 5))
    img = np.asarray(Image.fromarray((coarse * 255).astype(np.uint8)).resize(shape[::-1], Image.Resampling.BICUBIC),
                     dtype=np.float64)
    img += rng.normal(0, 6, shape)
    img = (img - img.min()) / (img.max() - img.min())
    return np.rint(lo + img * (hi - lo)).astype(np.uint8)


def write_dicom8(path: Path, pixels: np.ndarray, uid: str) -> None:
    """An 8-bit MONOCHROME2 DX file holding ``pixels`` as stored values (no window)."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    meta.MediaStorageSOPInstanceUID = uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, uid
    ds.Modality, ds.PatientID = "DX", "RSNA-X"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = pixels.tobytes()
    ds.save_as(str(path), enforce_file_format=True)


def row(dataset: str, patient: str, image_id: str, path: str, split: str = "train", uid: str = "") -> ManifestRow:
    return ManifestRow(dataset=dataset, split=split, patient_id=patient, study_id=f"s-{image_id}", image_id=image_id,
                       image_path=path, view="PA", sop_instance_uid=uid)


@pytest.fixture(scope="module")
def sets(tmp_path_factory) -> Dict[str, Path]:
    """Train: NIH-like PNGs; test: NIH rows (shared patient, a shared file) and RSNA-like rows (renamed copies)."""
    root = tmp_path_factory.mktemp("overlap")
    tr, te = root / "train", root / "test"
    (tr / "images").mkdir(parents=True)
    (te / "images").mkdir(parents=True)
    train_rows = []
    for i, patient in enumerate(["pA", "pA", "pB", "pC", "pD", "pE"]):
        # t3 spans 10..240 only: its DICOM twin is stretched to 0..255 by the reader, and must still match.
        pixels = smooth_image(i, lo=10, hi=240) if i == 3 else smooth_image(i)
        Image.fromarray(pixels).save(tr / "images" / f"t{i}.png")
        train_rows.append(row("chestxray14", patient, f"t{i}.png", f"images/t{i}.png",
                              uid="1.2.826.0.1.99.4" if i == 4 else ""))
    jpeg = io.BytesIO()
    Image.fromarray(smooth_image(0)).save(jpeg, format="JPEG", quality=90)
    (te / "images" / "e3.jpg").write_bytes(jpeg.getvalue())
    write_dicom8(te / "images" / "e2.dcm", smooth_image(3, lo=10, hi=240), "1.2.826.0.1.99.77")
    Image.fromarray(smooth_image(100)).save(te / "images" / "e0.png")
    Image.fromarray(smooth_image(101)).save(te / "images" / "e4.png")
    Image.fromarray(smooth_image(102)).save(te / "images" / "e5.png")
    test_rows = [
        row("chestxray14", "pA", "e0.png", "images/e0.png", "test"),  # shared patient, new image
        row("chestxray14", "pZ", "t2.png", str(tr / "images" / "t2.png"), "test"),  # the same file and id
        row("rsna-pneumonia", "r2", "r2", "images/e2.dcm", "test", uid="1.2.826.0.1.99.77"),  # t3 as DICOM
        row("rsna-pneumonia", "r3", "r3", "images/e3.jpg", "test"),  # t0 re-encoded
        row("rsna-pneumonia", "r4", "r4", "images/e4.png", "test"),  # unrelated
        row("rsna-pneumonia", "r5", "r5", "images/e5.png", "test", uid="1.2.826.0.1.99.4"),  # t4's UID only
        row("rsna-pneumonia", "pA", "r6", "images/missing.png", "test"),  # pA of another namespace; no file
    ]
    write_manifest(train_rows, tr / "manifest.csv")
    write_manifest(test_rows, te / "manifest.csv")
    return {"train": tr / "manifest.csv", "test": te / "manifest.csv", "root": root}


def thumb_r(a: np.ndarray, b: np.ndarray) -> float:
    """Naive: max Pearson r of the 16x16 thumbnails, plain and equalised (numpy corrcoef)."""
    from PIL import ImageOps

    best = -1.0
    for eq in (False, True):
        ta, tb = [np.asarray((ImageOps.equalize(Image.fromarray(x)) if eq else Image.fromarray(x))
                             .resize((16, 16), Image.Resampling.LANCZOS), dtype=np.float64).ravel() for x in (a, b)]
        if ta.std() > 0 and tb.std() > 0:
            best = max(best, float(np.corrcoef(ta, tb)[0, 1]))
    return best


def naive_pairs(train: List[ManifestRow], test: List[ManifestRow], train_dir: Path, test_dir: Path
                ) -> Dict[str, Set[Tuple[int, int]]]:
    def real(r: ManifestRow, base: Path) -> str:
        return os.path.realpath(base / r.image_path)

    def pixels(r: ManifestRow, base: Path):
        try:
            return stretch_to_full_range(read_grey(real(r, base)))
        except Exception:
            return None

    out: Dict[str, Set[Tuple[int, int]]] = {c: set() for c in CRITERIA}
    for i, a in enumerate(test):
        pa = pixels(a, test_dir)
        for j, b in enumerate(train):
            pb = pixels(b, train_dir)
            if id_namespace(a.dataset) == id_namespace(b.dataset) and a.image_id == b.image_id:
                out["image_id"].add((i, j))
            if a.sop_instance_uid and a.sop_instance_uid == b.sop_instance_uid:
                out["sop_instance_uid"].add((i, j))
            if real(a, test_dir) == real(b, train_dir):
                out["image_path"].add((i, j))
            if pa is not None and pb is not None:
                if pa.shape == pb.shape and np.array_equal(pa, pb):
                    out["pixels_exact"].add((i, j))
                if thumb_r(pa, pb) >= 0.999:
                    out["near_duplicate"].add((i, j))
    return out


def test_overlap_matches_naive_loops_and_expected_counts(sets, tmp_path):
    result = overlap_manifests(sets["train"], sets["test"], cache_file=tmp_path / "h.sqlite", workers=2)
    train, test = read_manifest(sets["train"]), read_manifest(sets["test"])
    naive = naive_pairs(train, test, sets["train"].parent, sets["test"].parent)
    got = {c: {(p.test, p.train) for p in result.pairs if p.criterion == c} for c in CRITERIA}
    assert got == naive
    # And the planted structure, by hand (test rows: e0, e1=t2, e2=DICOM of t3, e3=JPEG of t0, e4, e5, e6).
    assert got["image_id"] == {(1, 2)} and got["image_path"] == {(1, 2)}
    assert got["sop_instance_uid"] == {(5, 4)}
    assert got["pixels_exact"] == {(1, 2), (2, 3)}
    assert got["near_duplicate"] == {(1, 2), (2, 3), (3, 0)}
    s = result.to_dict()
    assert s["images"]["near_duplicate"]["test_images"] == 3
    assert s["images"]["near_duplicate"]["fraction_of_test"] == round(3 / 7, 6)
    assert s["images"]["any"]["test_images"] == 4  # e1, e2, e3, e5
    near = {(e["test"], e["train"]): e["similarity"] for e in s["images"]["near_duplicate"]["examples"]}
    assert near[("rsna-pneumonia/r3", "chestxray14/t0.png")] < 1.0 <= near[("rsna-pneumonia/r2", "chestxray14/t3.png")]
    # Patients: only pA of chestxray14 by id (rsna's "pA" is another namespace); by images: pZ, r2, r3, r5.
    assert s["patients"]["by_id"]["test_patients"] == 1 and s["patients"]["by_id"]["examples"] == ["chestxray14/pA"]
    assert s["patients"]["by_id"]["test_images_of_these_patients"] == 1
    assert s["patients"]["by_shared_images"]["test_patients"] == 4
    assert s["patients"]["any"]["test_patients"] == 5
    assert s["test"]["patients"] == 7
    assert s["unreadable"] == {"test_images": 1, "train_images": 0, "examples": [
        {"path": os.path.realpath(sets["test"].parent / "images/missing.png"), "reason": "file not found"}]}
    assert result.stats == {"from_cache": 0, "decoded": 11}

    again = overlap_manifests(sets["train"], sets["test"], cache_file=tmp_path / "h.sqlite", workers=1)
    assert again.stats == {"from_cache": 11, "decoded": 0}  # nothing decoded the second time
    assert again.to_dict() == s and again.pairs == result.pairs

    by_ids = overlap_manifests(sets["train"], sets["test"], by="ids")
    assert "unreadable" not in by_ids.to_dict() and by_ids.stats == {}
    assert set(by_ids.to_dict()["images"]) == {"image_id", "sop_instance_uid", "image_path", "any"}


def test_near_duplicate_search_equals_pairwise_loop():
    rng = np.random.default_rng(3)
    base = rng.integers(0, 256, (40, 256)).astype(np.float64)
    train, test = [], []
    for i in range(120):
        t = base[i % 40] + rng.normal(0, 0.6 if i < 80 else 40, 256)  # most close to a base, some far
        train.append(ContentHash("x", np.clip(np.rint(t), 0, 255).astype(np.uint8).tobytes(),
                                 rng.integers(0, 256, 256).astype(np.uint8).tobytes(), 1, 1))
    for i in range(50):
        t = base[i % 40] + rng.normal(0, 0.6, 256)
        test.append(ContentHash("y", np.clip(np.rint(t), 0, 255).astype(np.uint8).tobytes(),
                                rng.integers(0, 256, 256).astype(np.uint8).tobytes(), 1, 1))
    test.append(ContentHash("z", bytes(256), bytes(256), 1, 1))  # constant: matches nothing

    def r(a: bytes, b: bytes) -> float:
        x, y = np.frombuffer(a, np.uint8).astype(float), np.frombuffer(b, np.uint8).astype(float)
        x, y = x - x.mean(), y - y.mean()
        den = np.sqrt((x * x).sum() * (y * y).sum())
        return float((x * y).sum() / den) if den else -1.0

    slow_r = {(i, j): max(r(a.thumb, b.thumb), r(a.thumb_eq, b.thumb_eq))
              for i, a in enumerate(test) for j, b in enumerate(train)}
    for threshold in (0.9999, 0.999, 0.99):
        slow = {key for key, value in slow_r.items() if value >= threshold}
        fast = near_duplicate_pairs(test, train, threshold, chunk=7)
        assert {(i, j) for i, j, _ in fast} == slow
        assert len(slow) > 50
        assert all(abs(rr - slow_r[i, j]) < 1e-9 for i, j, rr in fast)


def test_png_and_its_dicom_fingerprint_equal(sets, tmp_path):
    tr = sets["train"].parent / "images" / "t3.png"
    dcm = sets["test"].parent / "images" / "e2.dcm"
    run = hash_files([str(tr), str(dcm)], workers=1)
    assert not run.errors
    assert run.hashes[str(tr)] == run.hashes[str(dcm)]


def run_cli(capsys, *argv: str):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_json_is_deterministic_and_writes_pairs(sets, tmp_path, capsys):
    args = ["bench", "overlap", str(sets["train"]), str(sets["test"]), "--cache", str(tmp_path / "c.sqlite"),
            "--json", "--out", str(tmp_path / "out")]
    code, out1, _ = run_cli(capsys, *args)
    assert code == 0
    code, out2, _ = run_cli(capsys, *args)
    assert code == 0 and out1 == out2
    report = json.loads(out1)
    assert report["images"]["pixels_exact"]["test_images"] == 2
    assert report["train"]["manifest"] == str(sets["train"])
    with (tmp_path / "out" / "overlap_images.csv").open() as fh:
        pairs = list(csv.DictReader(fh))
    assert len(pairs) == sum(report["images"][c]["pairs"] for c in CRITERIA)
    assert {p["criterion"] for p in pairs} == set(CRITERIA)
    with (tmp_path / "out" / "overlap_patients.csv").open() as fh:
        links = list(csv.DictReader(fh))
    assert {"link": "patient_id", "test_dataset": "chestxray14", "test_patient_id": "pA",
            "train_dataset": "chestxray14", "train_patient_id": "pA"} in links
    assert json.loads((tmp_path / "out" / "overlap_summary.json").read_text()) == report
    code, out, _ = run_cli(capsys, "bench", "overlap", str(sets["train"]), str(sets["test"]), "--by", "ids")
    assert code == 0 and "sop_instance_uid" in out and "patients by_id" in out


def test_cli_errors_are_one_line(sets, tmp_path, capsys):
    code, out, err = run_cli(capsys, "bench", "overlap", str(tmp_path / "nope.csv"), str(sets["test"]), "--json")
    assert code == 6 and out == "" and "nope.csv" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    code, _, err = run_cli(capsys, "bench", "overlap", str(sets["train"]), str(sets["test"]), "--by", "pixel")
    assert code == 2 and "pixel" in err and "Traceback" not in err
    code, _, err = run_cli(capsys, "bench", "overlap", str(sets["train"]), str(sets["test"]),
                           "--test-split", "validate")
    assert code == 6 and "validate" in err
    code, _, err = run_cli(capsys, "bench", "overlap", str(sets["train"]), str(sets["test"]),
                           "--min-correlation", "1.5", "--no-cache")
    assert code == 2 and "min-correlation" in err
