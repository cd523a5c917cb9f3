"""Study-level training data: two images and two texts per study (``docs/compatibility.md`` section 4).

:class:`StudyDataset` groups manifest rows (one per image, see ``docs/manifest.md``) into studies and
returns one sample per study: two images (ideally a frontal and a lateral view), each augmented
independently, and two texts (report sections, or prompt reports written from labels). Decoding and
augmentation happen in ``__getitem__`` so they run in DataLoader workers.

Seeding (how the trainer gets reproducible epochs):

* Every random choice of a training sample (images, sections, paraphrases, prompt sentences,
  augmentation) comes from torch's global RNG, which PyTorch re-seeds in each DataLoader worker from
  the loader's ``generator``. Build the loader with ``generator=epoch_generator(seed, epoch)`` (a
  fresh one per epoch, so a resumed run replays epoch ``k`` exactly), and call
  ``torch.manual_seed(...)`` too when ``num_workers == 0`` (samples are then drawn in the main
  process). Results are reproducible for a fixed ``num_workers`` and batch size: a sample's draws
  depend on the worker that builds it.
* With a ``DistributedSampler``, call its ``set_epoch(epoch)`` as usual; the loader generator still
  seeds the workers (give each rank a different seed: ``epoch_generator(seed + rank, epoch)``).
* ``persistent_workers=True`` keeps the workers (and their RNG streams) across epochs, so a loader
  must then be built once, e.g. with ``epoch_generator(seed, 0)``: the run is reproducible from its
  start, but resuming at epoch ``k`` does not replay the same samples.
* Workers do not limit OpenCV's threads (CLAHE). Do not call ``cv2.setNumThreads`` in a forked
  worker: it can deadlock when the parent already used OpenCV's thread pool.

Memory: the per-study strings (paths, report sections, label JSON) are packed into a few numpy
buffers instead of millions of Python objects, so forked workers share them instead of copying every
page that a reference-count update touches.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import random
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Set, Tuple, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from cxr_search.config import PreprocessConfig
from cxr_search.datasets.manifest import labels_object
from cxr_search.errors import DatasetError, DicomError, ImageReadError
from cxr_search.images import eval_transform, load_image
from cxr_search.labels import CHESTXRAY14_LABELS, CHEXPERT_LABELS, label_set_key
from cxr_search.tokenizer import TextTokenizer
from train.augment import train_transform
from train.prompt_reports import labels_to_report

logger = logging.getLogger(__name__)

__all__ = [
    "FRONTAL_VIEWS",
    "LATERAL_VIEWS",
    "REQUIRED_COLUMNS",
    "StudyCollate",
    "StudyDataset",
    "epoch_generator",
    "make_collate",
    "read_manifest_rows",
]

#: Manifest columns a training dataset needs.
REQUIRED_COLUMNS: Tuple[str, ...] = ("dataset", "split", "patient_id", "study_id", "image_id", "image_path", "view")
FRONTAL_VIEWS = frozenset({"PA", "AP"})
LATERAL_VIEWS = frozenset({"LATERAL", "LL", "RL"})
_FRONTAL, _LATERAL, _OTHER = 0, 1, 2

#: label_vocab -> (vocabulary extra negatives are drawn from, number of extra negatives).
#: ChestX-ray14 lists positives only, so the reference states 3 random absent findings.
_LABEL_VOCABS: Dict[str, Tuple[Tuple[str, ...], int]] = {
    "chestxray14": (CHESTXRAY14_LABELS, 3),
    "chexpert": (CHEXPERT_LABELS, 0),
}

_KIND_REPORT, _KIND_LABELS = 0, 1


def read_manifest_rows(path: Union[str, Path], *, split: Optional[str] = None) -> List[Dict[str, str]]:
    """Read a manifest CSV into row dictionaries (stop-gap until ``cxr_search.datasets`` exists).

    Args:
        path: Manifest file.
        split: Keep only rows of this split (``train`` / ``validate`` / ``test``) when given.

    Returns:
        Rows in file order, every value a string ("" = missing).

    Raises:
        DatasetError: The file is missing, unreadable, or lacks a required column.
    """
    path = Path(path)
    try:
        with path.open("r", encoding="utf-8", newline="") as fh:
            reader = csv.DictReader(fh)
            missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise DatasetError(
                    f"{path}: manifest lacks the required column(s) {', '.join(missing)}; "
                    "write it with `cxr-search data prepare`"
                )
            rows = [dict(r) for r in reader if split is None or r.get("split") == split]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(f"{path}: cannot read the manifest ({exc})") from exc
    return rows


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A ``torch.Generator`` for the DataLoader of one epoch: fixes the shuffle and the worker seeds.

    Example:
        >>> loader = DataLoader(ds, batch_size=128, shuffle=True, num_workers=8,
        ...                     collate_fn=make_collate(tok), generator=epoch_generator(1234, epoch))
    """
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be >= 0, got seed={seed}, epoch={epoch}")
    # Hash (seed, epoch) instead of adding them: seed 1 epoch 2 and seed 2 epoch 1 must differ.
    state = np.random.SeedSequence([int(seed), int(epoch)]).generate_state(1, np.uint64)[0]
    g = torch.Generator()
    g.manual_seed(int(state) & (2**63 - 1))
    return g


class _StringTable:
    """Immutable strings packed in one uint8 buffer plus offsets (fork-friendly, see module docstring)."""

    def __init__(self, strings: Iterable[str]) -> None:
        encoded = [s.encode("utf-8") for s in strings]
        self._offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        if encoded:
            np.cumsum([len(e) for e in encoded], out=self._offsets[1:])
        self._blob = np.frombuffer(b"".join(encoded), dtype=np.uint8) if encoded else np.zeros(0, np.uint8)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, i: int) -> str:
        return self._blob[self._offsets[i] : self._offsets[i + 1]].tobytes().decode("utf-8")


def _view_group(view: str) -> int:
    v = (view or "").strip().upper()
    if v in FRONTAL_VIEWS:
        return _FRONTAL
    if v in LATERAL_VIEWS:
        return _LATERAL
    return _OTHER


def _cell(row: Mapping[str, Any], key: str) -> str:
    value = row.get(key)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value).strip()


class StudyDataset(Dataset):
    """One sample per study: two images and two texts, for CXR-CLIP's CLIP + ICL + TCL losses.

    Images: two DIFFERENT images of the study, preferring different views: a frontal (PA/AP) and a
    lateral (LATERAL/LL/RL) when both exist, else images of two different view groups when there are
    such, else any two different images; a single-image study gives that image twice (its two
    independent augmentations then form the ICL pair). The reference implementation meant to do the
    same ("two distinct views"), but a bug in its sampler returns two images of the SAME view; we
    sample as intended, so our image pairs are harder positives than the reference's.

    Texts: studies with a report (FINDINGS and/or IMPRESSION; ``report_text`` when neither section is
    set) draw two sections from those available WITH replacement, each swapped with probability 0.5
    for a random paraphrase from ``text_paraphrases`` when that has entries for the section. Studies
    with labels only (CheXpert, ChestX-ray14) get two independent prompt reports from
    :func:`train.prompt_reports.labels_to_report` (ChestX-ray14: 3 extra negatives from its own
    vocabulary). A report wins when a study has both. Studies with neither are dropped and counted
    in the log.

    Validation (``train=False``) is deterministic: the study's first two images in manifest order
    (frontal first), the evaluation transform, texts (findings, impression), or the first available
    section twice, or the deterministic prompt report twice; no paraphrases.

    A file that cannot be read (ImageReadError / DicomError) is logged once per process and replaced
    by another image of the same study; only a study with no readable image raises.

    Args:
        rows: Manifest rows (mappings with the manifest columns; values as strings, "" = missing).
            Filter them to one split before.
        preprocess: The model's preprocessing (crop size, normalisation, DICOM resize).
        train: Random sampling and augmentation when True; the deterministic validation sample else.
        text_paraphrases: Section text (exactly as in the manifest) -> paraphrases of it, e.g.
            back-translations.
        seed: Salt mixed into every sample's random stream, so two datasets seeded identically by
            torch still draw different choices.
        transform: Training augmentation overriding ``train_transform(preprocess)`` (e.g. with the
            trainer's configured parameters).
        label_names: The labels that make up a study's label set (:meth:`label_keys`); None: all.
        uncertain_positive: Uncertain labels (-1.0) count as positive in the label set ("U-Ones").

    Raises:
        DatasetError: A row lacks a required column, has invalid label JSON or values, or no study
            is usable.
    """

    def __init__(
        self,
        rows: Iterable[Mapping[str, Any]],
        preprocess: PreprocessConfig,
        *,
        train: bool = True,
        text_paraphrases: Optional[Mapping[str, List[str]]] = None,
        seed: int = 0,
        transform: Optional[Callable[[Image.Image], torch.Tensor]] = None,
        label_names: Optional[Sequence[str]] = None,
        uncertain_positive: bool = False,
    ) -> None:
        super().__init__()
        self.label_names = tuple(label_names) if label_names else None
        self.uncertain_positive = bool(uncertain_positive)
        self.preprocess = preprocess
        self.train = bool(train)
        self.seed = int(seed)
        self.text_paraphrases: Dict[str, List[str]] = {
            str(k): [str(p) for p in v if str(p).strip()] for k, v in (text_paraphrases or {}).items() if v
        }
        self.transform = transform if transform is not None else train_transform(preprocess)
        self._bad_paths: Set[str] = set()  # per process: files that failed, so each warns once
        self._build(rows)

    # ------------------------------------------------------------------------------ building
    def _build(self, rows: Iterable[Mapping[str, Any]]) -> None:
        groups: Dict[Tuple[str, str], List[Mapping[str, Any]]] = {}
        n_rows = 0
        for n_rows, row in enumerate(rows, start=1):
            missing = [c for c in ("dataset", "study_id", "image_id", "image_path") if not _cell(row, c)]
            if missing:
                raise DatasetError(
                    f"manifest row {n_rows} (image_id {_cell(row, 'image_id')!r}) has no {', '.join(missing)}; "
                    "every row needs dataset, study_id, image_id and image_path"
                )
            groups.setdefault((_cell(row, "dataset"), _cell(row, "study_id")), []).append(row)

        datasets: List[str] = []
        dataset_index: Dict[str, int] = {}
        study_ds: List[int] = []
        study_ids: List[str] = []
        kinds: List[int] = []
        sections: List[str] = []  # two per study: findings (or report_text), impression
        labels_json: List[str] = []  # one per study ("" for report studies)
        label_keys: List[int] = []  # label_set_key of the study's labels (any kind), -1 = none
        vocabs: List[str] = []
        paths: List[str] = []
        view_groups: List[int] = []
        starts = [0]
        dropped = 0
        for (dataset, study_id), members in groups.items():
            findings = next((_cell(r, "findings") for r in members if _cell(r, "findings")), "")
            impression = next((_cell(r, "impression") for r in members if _cell(r, "impression")), "")
            if not findings and not impression:
                findings = next((_cell(r, "report_text") for r in members if _cell(r, "report_text")), "")
            label_row = next((r for r in members if _cell(r, "labels")), None)
            vocab = ""
            if findings or impression:
                kind, label_text = _KIND_REPORT, ""
            elif label_row is not None:
                label_text = _cell(label_row, "labels")
                vocab = _cell(label_row, "label_vocab") or dataset
                if not self._check_labels(label_text, vocab, dataset, study_id):
                    dropped += 1
                    continue
                kind = _KIND_LABELS
            else:
                dropped += 1
                continue
            if dataset not in dataset_index:
                dataset_index[dataset] = len(datasets)
                datasets.append(dataset)
            study_ds.append(dataset_index[dataset])
            study_ids.append(study_id)
            kinds.append(kind)
            sections += [findings, impression]
            labels_json.append(label_text)
            label_keys.append(self._label_key(label_row, dataset, study_id))
            vocabs.append(vocab)
            for r in members:
                paths.append(_cell(r, "image_path"))
                view_groups.append(_view_group(_cell(r, "view")))
            starts.append(len(paths))

        if dropped:
            logger.warning(
                "dropped %d of %d studies that have neither report text nor usable labels", dropped, len(groups)
            )
        if not study_ids:
            raise DatasetError(
                f"no usable study among {n_rows} manifest rows ({len(groups)} studies): every study lacks both "
                "report sections (findings / impression / report_text) and labels"
            )
        self._datasets = tuple(datasets)
        self._study_ds = np.asarray(study_ds, dtype=np.int32)
        self._study_ids = _StringTable(study_ids)
        self._kinds = np.asarray(kinds, dtype=np.int8)
        self._sections = _StringTable(sections)
        self._labels = _StringTable(labels_json)
        self._label_keys = np.asarray(label_keys, dtype=np.int64)
        self._vocab_names = tuple(sorted(set(vocabs)))
        self._vocab_idx = np.asarray([self._vocab_names.index(v) for v in vocabs], dtype=np.int16)
        self._paths = _StringTable(paths)
        self._view_groups = np.asarray(view_groups, dtype=np.int8)
        self._starts = np.asarray(starts, dtype=np.int64)
        logger.info(
            "%s study dataset: %d studies, %d images (%d report, %d label-only)",
            "training" if self.train else "validation",
            len(study_ids),
            len(paths),
            int((self._kinds == _KIND_REPORT).sum()),
            int((self._kinds == _KIND_LABELS).sum()),
        )

    @staticmethod
    def _check_labels(label_text: str, vocab: str, dataset: str, study_id: str) -> bool:
        """Validate a labels cell now (not in a worker mid-epoch); False when it yields no text."""
        where = f"manifest study {dataset}/{study_id}"
        labels = labels_object(label_text, where)
        vocabulary, extra = _LABEL_VOCABS.get(vocab, (CHEXPERT_LABELS, 0))
        try:
            text = labels_to_report(labels, deterministic=True, extra_negatives=extra, vocabulary=vocabulary)
        except ValueError as exc:
            raise DatasetError(f"{where}: {exc}") from exc
        # A row that mentions nothing would only carry the extra negatives: no information about it.
        mentioned = any(v is not None and v != "" and not (isinstance(v, float) and math.isnan(v)) for v in labels.values())
        return bool(text) and mentioned

    def _label_key(self, row: Optional[Mapping[str, Any]], dataset: str, study_id: str) -> int:
        if row is None:
            return -1
        where = f"manifest study {dataset}/{study_id}"
        try:
            return label_set_key(labels_object(_cell(row, "labels"), where), self.label_names,
                                 uncertain_positive=self.uncertain_positive)
        except ValueError as exc:
            raise DatasetError(f"{where}: {exc}") from exc

    # ------------------------------------------------------------------------------ access
    def label_keys(self, indices: Union[Sequence[int], np.ndarray, torch.Tensor]) -> torch.Tensor:
        """[len(indices)] int64 :func:`label_set_key` of each study (-1 = the study has no labels)."""
        idx = np.asarray(indices.cpu() if isinstance(indices, torch.Tensor) else indices, dtype=np.int64)
        return torch.from_numpy(self._label_keys[idx].copy())

    @property
    def labelled_studies(self) -> int:
        """Number of studies with labels (a label-set key), of any kind."""
        return int((self._label_keys >= 0).sum())

    def __len__(self) -> int:
        return len(self._study_ids)

    @property
    def num_images(self) -> int:
        """Number of images over all kept studies."""
        return len(self._paths)

    def study_key(self, index: int) -> Tuple[str, str]:
        """(dataset, study_id) of sample ``index``."""
        return self._datasets[int(self._study_ds[index])], self._study_ids[index]

    def image_paths(self, index: int) -> List[str]:
        """Image paths of sample ``index`` in manifest order."""
        return [self._paths[j] for j in range(int(self._starts[index]), int(self._starts[index + 1]))]

    def __getitem__(self, index: int) -> Dict[str, Any]:
        """Build sample ``index``: ``image1``/``image2`` float tensors ``[3, H, W]``, ``text1``/``text2``, ``study_index``.

        Raises:
            ImageReadError, DicomError: No image of the study can be read.
        """
        if not 0 <= index < len(self):
            raise IndexError(f"study index {index} out of range for {len(self)} studies")
        lo, hi = int(self._starts[index]), int(self._starts[index + 1])
        if self.train:
            # One draw from torch's RNG (seeded per DataLoader worker) drives every choice.
            draw = int(torch.randint(0, 2**62, (1,)).item())
            rng = random.Random(((self.seed & (2**64 - 1)) << 64) | draw)
            first, second = self._choose_images(lo, hi, rng)
            text1, text2 = self._train_texts(index, rng)
        else:
            rng = None
            first, second = lo, (lo + 1 if hi - lo > 1 else lo)
            text1, text2 = self._val_texts(index)
        j1, img1 = self._load(first, lo, hi, avoid=second, rng=rng)
        if second == first or second == j1:
            j2, img2 = j1, img1
        else:
            j2, img2 = self._load(second, lo, hi, avoid=j1, rng=rng)
        if self.train:
            x1, x2 = self.transform(img1), self.transform(img2)
        else:
            x1 = eval_transform(img1, self.preprocess)
            x2 = x1.clone() if j2 == j1 else eval_transform(img2, self.preprocess)
        return {"image1": x1, "image2": x2, "text1": text1, "text2": text2, "study_index": int(index)}

    # ------------------------------------------------------------------------------ images
    def _choose_images(self, lo: int, hi: int, rng: random.Random) -> Tuple[int, int]:
        n = hi - lo
        if n == 1:
            return lo, lo
        by_group: Dict[int, List[int]] = {}
        for j in range(lo, hi):
            by_group.setdefault(int(self._view_groups[j]), []).append(j)
        if _FRONTAL in by_group and _LATERAL in by_group:
            g1, g2 = _FRONTAL, _LATERAL
        elif len(by_group) >= 2:
            g1, g2 = rng.sample(sorted(by_group), 2)
        else:
            a, b = rng.sample(range(lo, hi), 2)
            return a, b
        pair = [rng.choice(by_group[g1]), rng.choice(by_group[g2])]
        rng.shuffle(pair)  # which view is image1 carries no meaning; do not let the order leak it
        return pair[0], pair[1]

    def _load(self, j: int, lo: int, hi: int, *, avoid: int, rng: Optional[random.Random]) -> Tuple[int, Image.Image]:
        """Decode image ``j``, substituting another image of the study when a file cannot be read."""
        tried: Set[int] = set()
        last_error: Optional[Exception] = None
        while True:
            path = self._paths[j]
            if path not in self._bad_paths:
                try:
                    return j, load_image(path, self.preprocess)
                except (ImageReadError, DicomError) as exc:
                    self._bad_paths.add(path)
                    last_error = exc
                    logger.warning("skipping unreadable training image %s: %s", path, exc.reason)
            tried.add(j)
            left = [k for k in range(lo, hi) if k not in tried and self._paths[k] not in self._bad_paths]
            if not left:
                if last_error is None:  # every file failed earlier in this process
                    study = self._study_ids[self._study_index_of(lo)]
                    raise ImageReadError(path, f"no readable image in study {study} (all failed before)")
                raise last_error
            preferred = [k for k in left if k != avoid] or left
            j = rng.choice(preferred) if rng is not None else preferred[0]

    def _study_index_of(self, image_pos: int) -> int:
        return int(np.searchsorted(self._starts, image_pos, side="right") - 1)

    # ------------------------------------------------------------------------------ texts
    def _label_report(self, index: int, *, rng: Optional[random.Random]) -> str:
        labels = json.loads(self._labels[index])
        vocabulary, extra = _LABEL_VOCABS.get(self._vocab_names[int(self._vocab_idx[index])], (CHEXPERT_LABELS, 0))
        return labels_to_report(
            labels, rng=rng, deterministic=rng is None, extra_negatives=extra, vocabulary=vocabulary
        )

    def _train_texts(self, index: int, rng: random.Random) -> Tuple[str, str]:
        if self._kinds[index] == _KIND_LABELS:
            return self._label_report(index, rng=rng), self._label_report(index, rng=rng)
        available = [s for s in (self._sections[2 * index], self._sections[2 * index + 1]) if s]
        texts = []
        for _ in range(2):
            text = rng.choice(available)  # with replacement, as the reference
            alternatives = self.text_paraphrases.get(text)
            if alternatives and rng.random() < 0.5:
                text = rng.choice(alternatives)
            texts.append(text)
        return texts[0], texts[1]

    def _val_texts(self, index: int) -> Tuple[str, str]:
        if self._kinds[index] == _KIND_LABELS:
            text = self._label_report(index, rng=None)
            return text, text
        available = [s for s in (self._sections[2 * index], self._sections[2 * index + 1]) if s]
        return available[0], available[-1]


class StudyCollate:
    """Batch :class:`StudyDataset` samples: stacked images and tokenised texts (picklable).

    Returns a dict with ``image1``/``image2`` ``[B, 3, H, W]``, ``text1``/``text2`` dicts of
    ``input_ids``/``attention_mask`` (int64 ``[B, L]``, padded to the longest in the batch) and
    ``study_index`` (int64 ``[B]``).
    """

    def __init__(self, tokenizer: Union[TextTokenizer, Callable[[Sequence[str]], Dict[str, torch.Tensor]]]) -> None:
        self.tokenizer = tokenizer

    def __call__(self, batch: Sequence[Mapping[str, Any]]) -> Dict[str, Any]:
        if not batch:
            raise ValueError("cannot collate an empty batch")
        return {
            "image1": torch.stack([b["image1"] for b in batch], dim=0),
            "image2": torch.stack([b["image2"] for b in batch], dim=0),
            "text1": self.tokenizer([b["text1"] for b in batch]),
            "text2": self.tokenizer([b["text2"] for b in batch]),
            "study_index": torch.tensor([int(b["study_index"]) for b in batch], dtype=torch.long),
        }


def make_collate(tokenizer: Union[TextTokenizer, Callable[[Sequence[str]], Dict[str, torch.Tensor]]]) -> StudyCollate:
    """The ``collate_fn`` for a DataLoader over :class:`StudyDataset` (see :class:`StudyCollate`)."""
    return StudyCollate(tokenizer)
