"""The end-to-end demo that ``make demo`` runs (``cxr-search demo``).

Stages, each timed and each reused by a rerun with the same settings (``demo-state.json``):

1. synthesize a PACS export (DICOM in every common encoding, a few broken files, a RIS CSV);
2. its manifest, with a seeded patient-level hold-out (``test``) that training never sees;
3. small 8-bit copies of the training images;
4. train the ``tiny-synth`` recipe on the training patients (through ``train_fn``: this package
   does not import the trainer, ``cli.py`` injects it);
5. index the whole export (it is the hospital's archive: held-out patients included; broken files
   become recorded failures);
6. example queries: text -> image, and image -> reports / images for a held-out DICOM (its own
   patient excluded), written to one HTML gallery with thumbnails;
7. the retrieval benchmark (full protocol) on the held-out split: Recall@1/5/10 both directions.

A run killed at any point resumes: the archive is written under a temporary name, the cache, the
training run (checkpoints) and the index build are resumable, and a stage is only marked done once
its outputs are complete. A stage whose settings changed is rebuilt from scratch.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

from cxr_search import __version__
from cxr_search.checkpoints import load_model
from cxr_search.datasets import read_manifest
from cxr_search.datasets.manifest import ManifestRow
from cxr_search.errors import ConfigError, TrainingError
from cxr_search.fileio import write_json_atomic
from cxr_search.inference import Embedder
from cxr_search.model import CXRClip
from cxr_search.reports import choose_report_text
from index.demo import data as dd
from index.demo.defaults import DEFAULT_EPOCHS, DEFAULT_K, DEFAULT_STUDIES
from index.demo.queries import QueryResult, run_image_queries, run_text_queries, write_demo_gallery

logger = logging.getLogger(__name__)

RECIPE = "tiny-synth"
#: The recipe's batch of studies; small archives (tests) get half their studies per batch instead.
RECIPE_BATCH = 32
INDEX = "index"
RUN = "run"
GALLERY = "gallery.html"
SUMMARY = "summary.json"


@dataclass
class DemoOptions:
    """Settings of a demo run (the defaults fit the 10-minute budget on a 2-core CPU).

    Attributes:
        studies: Studies in the synthetic archive (about 1.75 images each).
        seed: Seed of the archive and of the hold-out.
        epochs: Training epochs of ``tiny-synth``.
        image_size: Shorter side of the archive's images.
        broken: Broken files mixed into the export.
        holdout_fraction: Share of patients held out of training (the benchmark's test split).
        cache_side: Shorter side of the cached training images (the model reads 64 px).
        k: Hits per example query.
        bootstrap: Bootstrap resamples of the retrieval benchmark's confidence intervals.
        train_overrides: Extra recipe overrides (``--set``), e.g. a few steps for tests.
        index_workers: Decoding worker processes of the index build.
        progress: Progress bars on stderr.
    """

    studies: int = DEFAULT_STUDIES
    seed: int = 0
    epochs: int = DEFAULT_EPOCHS
    image_size: int = 256
    broken: int = 6
    holdout_fraction: float = 0.2
    cache_side: int = 72
    k: int = DEFAULT_K
    bootstrap: int = 1000
    train_overrides: Dict[str, Any] = field(default_factory=dict)
    index_workers: int = 1
    progress: bool = True

    def check(self) -> None:
        """Raises ConfigError on values the demo cannot run with."""
        if self.studies < 20:
            raise ConfigError(f"--studies {self.studies}: the demo needs at least 20 studies to hold patients out")
        if self.epochs < 1 or self.k < 1 or self.image_size < 64 or self.broken < 0 or self.bootstrap < 0:
            raise ConfigError("epochs and k must be >= 1, image_size >= 64, broken and bootstrap >= 0")
        if not 0.0 < self.holdout_fraction < 0.5:
            raise ConfigError(f"holdout_fraction {self.holdout_fraction} must be in (0, 0.5)")


@dataclass
class TrainRequest:
    """What the demo asks ``train_fn`` to do: train ``recipe`` with ``overrides`` on ``manifest`` into ``run_dir``.

    ``train_fn`` must resume a run already in ``run_dir`` (a killed demo) and return a mapping with
    at least ``model_dir`` (the final model's directory), plus ``steps``, ``epochs`` and ``seconds``.
    """

    recipe: str
    overrides: Dict[str, Any]
    manifest: Path
    run_dir: Path
    progress: bool


TrainFn = Callable[[TrainRequest], Mapping[str, Any]]


@dataclass
class DemoResult:
    """What a demo run did (``to_dict`` is the ``--json`` summary)."""

    out_dir: str
    options: Dict[str, Any]
    timings_s: Dict[str, float] = field(default_factory=dict)
    reused: Dict[str, bool] = field(default_factory=dict)
    archive: Dict[str, Any] = field(default_factory=dict)
    split: Dict[str, Any] = field(default_factory=dict)
    training: Dict[str, Any] = field(default_factory=dict)
    index: Dict[str, Any] = field(default_factory=dict)
    failures: List[Dict[str, str]] = field(default_factory=list)
    broken_files: Dict[str, Any] = field(default_factory=dict)
    queries: List[Dict[str, Any]] = field(default_factory=list)
    retrieval: Dict[str, Any] = field(default_factory=dict)
    gallery: str = ""
    model_dir: str = ""
    model_fingerprint: str = ""
    load_avg: Dict[str, List[float]] = field(default_factory=dict)
    serve_command: str = ""

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready dict."""
        return dataclasses.asdict(self)


class _Stages:
    """Timing, reuse and resumption bookkeeping of the stages."""

    def __init__(self, root: Path, state: dd.DemoState, result: DemoResult, say: Callable[[str], None]) -> None:
        self.root, self.state, self.result, self.say = root, state, result, say

    def run(self, name: str, key: Mapping[str, Any], outputs: Sequence[str], fn: Callable[[], Dict[str, Any]],
            *, valid: Callable[[], bool] = lambda: True) -> Dict[str, Any]:
        """Reuse ``name``'s recorded output when its key matches, else run ``fn`` (after wiping stale outputs)."""
        t0 = time.perf_counter()
        cached = self.state.done(name, key)
        if cached is not None and valid():
            self.result.reused[name] = True
            self.say(f"{name}: reused")
            self.result.timings_s[name] = round(time.perf_counter() - t0, 2)
            return cached
        rec = self.state.stages.get(name) or {}
        if rec.get("key") != dd.DemoState.normal(key) or rec.get("done"):
            # Built from other settings (or its outputs are gone): nothing there can be resumed.
            dd.remove_owned(self.root, *outputs)
        self.state.begin(name, key)
        self.say(f"{name}: running")
        out = fn()
        self.state.record(name, key, out)
        self.result.reused[name] = False
        self.result.timings_s[name] = round(time.perf_counter() - t0, 2)
        return out


def run_demo(out_dir: Union[str, Path], *, train_fn: TrainFn, options: Optional[DemoOptions] = None,
             say: Optional[Callable[[str], None]] = None) -> DemoResult:
    """Run the demo into ``out_dir`` (reusing what an earlier run there built with the same settings).

    Args:
        out_dir: The demo folder (new, empty, or one an earlier demo wrote).
        train_fn: Trains a recipe (see :class:`TrainRequest`); ``cli.py`` passes the trainer.
        options: Settings; :class:`DemoOptions` defaults when None.
        say: Called with one line per stage event (the CLI prints them on stderr).

    Returns:
        The run's summary; also written to ``out_dir/summary.json``.

    Raises:
        ConfigError: Bad options.
        InputFileError: ``out_dir`` holds files the demo did not write.
        TrainingError: Training stopped before its schedule ended.
    """
    opts = options or DemoOptions()
    opts.check()
    t_start = time.perf_counter()
    root = Path(out_dir).expanduser()
    state = dd.DemoState.open(root)
    result = DemoResult(out_dir=str(root), options=dataclasses.asdict(opts))
    result.load_avg["start"] = [round(x, 2) for x in os.getloadavg()]
    stages = _Stages(root, state, result, say or (lambda _msg: None))

    archive_key = {"studies": opts.studies, "seed": opts.seed, "image_size": opts.image_size, "broken": opts.broken,
                   "layout": "pacs", "version": __version__}
    result.archive = stages.run(
        "synthesize", archive_key, (dd.ARCHIVE, f"{dd.ARCHIVE}.partial", dd.RIS_CSV, dd.GROUND_TRUTH),
        lambda: dd.synthesize_archive(root, studies=opts.studies, seed=opts.seed, image_size=opts.image_size,
                                      broken=opts.broken, progress=opts.progress),
        valid=lambda: (root / dd.ARCHIVE).is_dir() and (root / dd.RIS_CSV).is_file())
    dd.remove_owned(root, f"{dd.ARCHIVE}.partial")  # left by a run killed while synthesizing
    # Manifests and the index hold absolute paths: a moved demo folder rebuilds them (not the model).
    here = {"root": str(root.resolve())}
    manifest_key = {**archive_key, "holdout_fraction": opts.holdout_fraction, **here}
    result.split = stages.run("manifest", manifest_key, (dd.MANIFEST,),
                              lambda: dd.prepare_manifest(root, holdout_fraction=opts.holdout_fraction, seed=opts.seed),
                              valid=lambda: (root / dd.MANIFEST).is_file())
    rows = read_manifest(root / dd.MANIFEST)
    cache_key = {**manifest_key, "cache_side": opts.cache_side}
    stages.run("cache", cache_key, (dd.CACHE, dd.TRAIN_MANIFEST),
               lambda: dd.cache_training_images(root, [r for r in rows if r.split == dd.TRAIN_SPLIT],
                                                shorter_side=opts.cache_side, progress=opts.progress),
               valid=lambda: (root / dd.TRAIN_MANIFEST).is_file())

    train_studies = int(result.split["splits"][dd.TRAIN_SPLIT]["studies"])
    overrides = {"optim.epochs": opts.epochs,
                 "optim.batch_size": min(RECIPE_BATCH, max(2, train_studies // 2)), "data.val_split": "",
                 "data.num_workers": min(2, os.cpu_count() or 1), **opts.train_overrides}
    # Worker processes do not change the weights: a machine with another CPU count reuses the model.
    train_key = {**{k: v for k, v in cache_key.items() if k not in here}, "recipe": RECIPE,
                 "overrides": {k: v for k, v in overrides.items() if k != "data.num_workers"}}
    result.training = stages.run("train", train_key, (RUN,), lambda: _train(root, train_fn, overrides, opts.progress),
                                 valid=lambda: (root / RUN / "model").is_dir())
    t0 = time.perf_counter()
    model = load_model(root / RUN / "model")
    result.timings_s["load_model"] = round(time.perf_counter() - t0, 2)
    result.model_dir = str(root / RUN / "model")
    result.model_fingerprint = str(model.provenance.get("fingerprint", ""))

    index_key = {**archive_key, **here, "model_sha256": result.model_fingerprint}
    result.index = stages.run("index", index_key, (INDEX,), lambda: _build_index(root, model, opts),
                              valid=lambda: (root / INDEX / "index.json").is_file())
    t0 = time.perf_counter()
    result.failures = _failures(root)
    result.broken_files = _broken_check(root, result.archive.get("broken_files", []), result.failures)
    truth = dd.read_truth(root)
    # One CPU Embedder serves the queries and the benchmark (the index build makes its own from its options).
    embedder = Embedder(model, device="cpu", batch_size=64, text_batch_size=64)
    queries = _queries(root, embedder, rows, truth, opts)
    result.queries = [q.to_dict() for q in queries]
    result.timings_s["queries"] = round(time.perf_counter() - t0, 2)

    t0 = time.perf_counter()
    say_ = say or (lambda _msg: None)
    say_("bench: retrieval on the held-out split (full protocol)")
    result.retrieval = _retrieval([r for r in rows if r.split == dd.TEST_SPLIT], embedder, opts)
    result.timings_s["bench"] = round(time.perf_counter() - t0, 2)

    t0 = time.perf_counter()
    facts = {"studies": result.archive.get("studies"), "images indexed": result.index.get("totals", {}).get("images"),
             "failures": len(result.failures), "held-out patients": result.split["splits"][dd.TEST_SPLIT]["patients"],
             "model": result.model_fingerprint[:12]}
    result.gallery = str(write_demo_gallery(root / GALLERY, queries, {"retrieval": result.retrieval, "facts": facts}))
    result.timings_s["gallery"] = round(time.perf_counter() - t0, 2)
    result.serve_command = serve_command(root)
    result.timings_s["total"] = round(time.perf_counter() - t_start, 2)
    result.load_avg["end"] = [round(x, 2) for x in os.getloadavg()]
    write_json_atomic(root / SUMMARY, result.to_dict(), default=str)
    return result


def serve_command(root: Path) -> str:
    """The one command that serves the demo's index (the index records its model: no ``--model``)."""
    return shlex.join(["cxr-search", "serve", str(root / INDEX)])


# ------------------------------------------------------------------------------------- the stages
def _train(root: Path, train_fn: TrainFn, overrides: Dict[str, Any], progress: bool) -> Dict[str, Any]:
    out = dict(train_fn(TrainRequest(RECIPE, dict(overrides), root / dd.TRAIN_MANIFEST, root / RUN, progress)))
    model_dir = out.get("model_dir")
    if not model_dir or not Path(model_dir).is_dir():
        raise TrainingError(f"training in {root / RUN} ended without a final model ({out.get('stopped', '?')}); "
                            "run the demo again to continue it")
    return {k: out.get(k) for k in ("model_dir", "steps", "epochs", "seconds", "stopped")}


def _build_index(root: Path, model: CXRClip, opts: DemoOptions) -> Dict[str, Any]:
    from index.build import BuildOptions, build

    summary = build(root / dd.ARCHIVE, root / INDEX, model,
                    BuildOptions(reports_csv=root / dd.RIS_CSV, batch_size=64, num_workers=opts.index_workers,
                                 device="cpu", progress=opts.progress))
    return {"totals": summary["totals"], "failure_reasons": summary["catalogue"].get("failure_reasons", {}),
            "timings": summary["timings"], "faiss": {k: v.get("factory") for k, v in summary["faiss"].items()}}


def _failures(root: Path) -> List[Dict[str, str]]:
    """The index's inputs without an image (``index failures``): file relative to the archive, kind, stage, and
    the reason with that file named in it (the store keeps the path encrypted, ``<file>`` in the reason)."""
    from index.failures import list_failures
    from index.index_dir import IndexDir

    idx = IndexDir.open(root / INDEX, readonly=True)  # a listing writes nothing
    try:
        rows = list_failures(idx.store, idx.secret)
    finally:
        idx.close()
    out = []
    for f in rows:
        rel = dd.relative(root / dd.ARCHIVE, f["path"])
        out.append({"path": rel, "kind": f["kind"], "stage": f["stage"],
                    "reason": (f["stored_reason"] or "").replace("<file>", rel)})
    return out


def _broken_check(root: Path, broken: Sequence[str], failures: Sequence[Mapping[str, str]]) -> Dict[str, Any]:
    """Whether every broken file the generator mixed in was recorded as a failure.

    The generator's pixel-less DICOM SR object is a report source, not an image: it is listed
    apart (``report_objects``), not as a missing failure.
    """
    from cxr_search.datasets.pacs import is_structured_report
    from cxr_search.dicom.header import read_dicom_header
    from cxr_search.errors import InputFileError

    recorded = {f["path"] for f in failures}
    missing: List[str] = []
    reports: List[str] = []
    for rel in broken:
        if rel in recorded:
            continue
        try:
            is_sr = is_structured_report(read_dicom_header(root / dd.ARCHIVE / rel))
        except InputFileError:
            is_sr = False
        (reports if is_sr else missing).append(rel)
    return {"mixed_in": len(broken), "recorded": len(broken) - len(missing) - len(reports),
            "report_objects": reports, "not_recorded": missing}


def _queries(root: Path, embedder: Embedder, rows: Sequence[ManifestRow], truth: Mapping[str, dd.Truth],
             opts: DemoOptions) -> List[QueryResult]:
    from index.search import Searcher

    query_row = dd.pick_query_image(rows, truth)
    report = choose_report_text(query_row.findings or None, query_row.impression or None) or query_row.report_text
    searcher = Searcher(root / INDEX, embedder)
    try:
        out = run_text_queries(searcher, root / dd.ARCHIVE, truth, k=opts.k)
        out += run_image_queries(searcher, root / dd.ARCHIVE, truth, query_row.image_path, query_row.study_id, report,
                                 k=opts.k)
    finally:
        searcher.close()
    return out


def _retrieval(rows: Sequence[ManifestRow], embedder: Embedder, opts: DemoOptions) -> Dict[str, Any]:
    """The retrieval benchmark, full protocol, on the held-out rows (``cxr-search bench retrieval --protocol full``)."""
    from index.bench.retrieval import run_retrieval

    res = run_retrieval(rows, embedder, protocol="full", bootstrap=opts.bootstrap, seed=opts.seed,
                        progress=opts.progress)
    return {"split": dd.TEST_SPLIT, **res}


__all__ = ["DemoOptions", "DemoResult", "RECIPE", "TrainFn", "TrainRequest", "run_demo", "serve_command"]
