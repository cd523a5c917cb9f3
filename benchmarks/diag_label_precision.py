"""Where label-precision@10 is lost: diagnostics of a ``bench_tiny_synth.py`` run.

Reads the work folder of ``benchmarks/bench_tiny_synth.py`` (its manifest, both archives' ground
truth) and one run's final model, and reports:

* label-precision@10 in four directions: image->text and text->image (what ``bench_tiny_synth.py`` reports), and
  image->image and text->text (each tower's own neighbourhoods), plus a TF-IDF text->text baseline;
* label-precision@10 by the number of primary findings of the query (0 = normal ... 3), next to the
  ceiling of a perfect model for the same queries;
* the same metrics on 500 *training* studies (a generalisation gap or not);
* per-finding linear-probe AUROC of the frozen 64-d embeddings (logistic regression fitted on the
  training studies' embeddings, scored on the held-out ones): what each tower can tell apart;
* ground-truth "attribute oracles": an embedding built from the generator's truth (finding
  presence, attributes such as side/size/zone, incidental extras) with chosen weights. It shows what
  label precision a model would score if it weighed presence and attributes that way;
* "label-key oracles": an embedding that is exactly the study's label-set key of the label term
  (manifest ``labels``, i.e. what the report labeler found), under the default label set and under
  the run's ``loss.label_names`` / ``loss.label_uncertain``. It shows how far training towards
  those keys can take label precision, given the labeler's disagreements with the truth.

Needs scikit-learn (the ``dev`` extra).

Example:
    .venv/bin/python benchmarks/diag_label_precision.py --work /tmp/tiny-synth --run run --out diag.json
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Dict, FrozenSet, List, Sequence, Tuple

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from cxr_search.checkpoints import load_model
from cxr_search.datasets import read_manifest
from cxr_search.datasets.manifest import labels_object
from cxr_search.evaluation.retrieval_metrics import label_precision_at_k
from cxr_search.evaluation.synth_heldout import HeldoutStudy, evaluate_heldout, heldout_studies
from cxr_search.fileio import emit_json, write_json_atomic
from cxr_search.inference import Embedder
from cxr_search.labels import label_set_key
from cxr_search.synth.findings import EXTRAS, FINDINGS

logger = logging.getLogger("diag_label_precision")

#: Ground-truth attribute columns of ``ground_truth.csv`` used by the attribute oracle.
ATTRIBUTES = ("cardiomegaly_size", "pleural_effusion_side", "pleural_effusion_size", "pneumothorax_side",
              "pneumothorax_size", "consolidation_side", "consolidation_zone", "consolidation_pattern",
              "lung_lesion_side", "lung_lesion_zone", "lung_lesion_size", "atelectasis_side", "edema_size",
              "support_devices_kind")
#: (presence, attributes, extras) weights of the attribute oracles.
ORACLE_WEIGHTS = ((1.0, 0.0, 0.0), (1.0, 1.0, 0.0), (1.0, 1.0, 1.0), (1.0, 0.7, 0.7), (1.0, 0.5, 0.5))


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def by_finding_count(q: np.ndarray, c: np.ndarray, labels: Sequence[FrozenSet[str]], k: int = 10) -> Dict[str, Any]:
    """Label-precision@k grouped by the query's number of findings, with a perfect model's score."""
    counts = Counter(labels)
    top = np.argsort(-(q @ c.T), axis=1, kind="stable")[:, :k]  # [N, k]
    got: Dict[int, List[float]] = defaultdict(list)
    ceiling: Dict[int, List[float]] = defaultdict(list)
    for i, row in enumerate(top):
        n = len(labels[i])
        got[n].append(float(np.mean([labels[j] == labels[i] for j in row])))
        ceiling[n].append(min(counts[labels[i]], k) / k)
    return {str(n): {"queries": len(got[n]), "label_precision": round(float(np.mean(got[n])), 4),
                     "ceiling": round(float(np.mean(ceiling[n])), 4)} for n in sorted(got)}


def probe_aurocs(train_x: np.ndarray, train_sets: Sequence[FrozenSet[str]], test_x: np.ndarray,
                 test_sets: Sequence[FrozenSet[str]]) -> Dict[str, float]:
    """Held-out AUROC of one logistic-regression probe per primary finding."""
    out: Dict[str, float] = {}
    for name in FINDINGS:
        y = np.array([name in s for s in train_sets])
        yt = np.array([name in s for s in test_sets])
        if y.all() or not y.any() or yt.all() or not yt.any():
            continue
        clf = LogisticRegression(max_iter=2000, C=10.0).fit(train_x, y)
        out[name] = round(float(roc_auc_score(yt, clf.decision_function(test_x))), 3)
    return out


def attribute_oracles(studies: Sequence[HeldoutStudy], ground_truth: Path, k: int = 10) -> List[Dict[str, float]]:
    """Label precision of embeddings made from the ground truth with the weights of :data:`ORACLE_WEIGHTS`."""
    with ground_truth.open(encoding="utf-8", newline="") as fh:
        truth = {r["study_id"]: r for r in csv.DictReader(fh)}
    rows = [truth[s.study_id] for s in studies]
    labels = [s.findings for s in studies]
    values = {c: sorted({r[c] for r in rows if r[c]}) for c in ATTRIBUTES}
    rng = np.random.default_rng(0)
    out = []
    for w_presence, w_attr, w_extra in ORACLE_WEIGHTS:
        feats = []
        for r in rows:
            present = [float(r[f] == "1") for f in FINDINGS]
            v = [w_presence * x for x in present + [float(not any(present))]]  # "normal" is a presence too
            v += [w_attr * float(r[c] == x) for c in ATTRIBUTES for x in values[c]]
            v += [w_extra * float(r[e] == "1") for e in EXTRAS]
            feats.append(v)
        x = np.asarray(feats, dtype=np.float64)
        x += 1e-3 * rng.standard_normal(x.shape)  # identical vectors: break ties at random, not by position
        x = _unit(x)
        out.append({"presence": w_presence, "attributes": w_attr, "extras": w_extra,
                    "label_precision": round(label_precision_at_k(x, x, labels, labels, k), 4)})
    return out


def label_key_oracles(manifest: Path, studies: Sequence[HeldoutStudy], run_loss: Dict[str, Any],
                      k: int = 10) -> Dict[str, float]:
    """Label precision of one-hot embeddings of each study's label-set key (default and the run's settings)."""
    labels_of = {r.study_id: r.get("labels") or "" for r in read_manifest(manifest, split="validate")}
    truth = [s.findings for s in studies]
    names = tuple(run_loss.get("label_names") or ()) or None
    settings = {"all labels, uncertain negative": (None, False),
                "the run's label set": (names, run_loss.get("label_uncertain", "negative") == "positive")}
    rng = np.random.default_rng(0)
    out: Dict[str, float] = {}
    for title, (only, uncertain_positive) in settings.items():
        keys = [label_set_key(labels_object(labels_of[s.study_id], s.study_id), only,
                              uncertain_positive=uncertain_positive) for s in studies]
        index = {key: i for i, key in enumerate(dict.fromkeys(keys))}
        x = np.zeros((len(keys), len(index)))
        x[np.arange(len(keys)), [index[key] for key in keys]] = 1.0
        x = _unit(x + 1e-3 * rng.standard_normal(x.shape))  # break ties at random, not by position
        out[title] = round(label_precision_at_k(x, x, truth, truth, k), 4)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True, help="Work folder of bench_tiny_synth.py.")
    ap.add_argument("--run", default="run", help="Run folder under --work (its final model/ is read).")
    ap.add_argument("--probe-studies", type=int, default=1000, help="Training studies the probes are fitted on.")
    ap.add_argument("--out", type=Path, help="Write the result JSON here.")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    work: Path = args.work
    embedder = Embedder(load_model(work / args.run / "model"), batch_size=64)
    manifest = work / "manifest.csv"
    held = heldout_studies(read_manifest(manifest, split="validate"), work / "heldout-archive" / "ground_truth.csv")
    train = heldout_studies(read_manifest(manifest, split="train"), work / "train-archive" / "ground_truth.csv")

    def embed(studies: Sequence[HeldoutStudy]) -> Tuple[np.ndarray, np.ndarray]:
        img = np.asarray(embedder.embed_images([s.image_path for s in studies]), dtype=np.float32)  # [N, D]
        txt = np.asarray(embedder.embed_texts([s.text for s in studies]), dtype=np.float32)  # [N, D]
        return img, txt

    run_loss = json.loads((work / args.run / "config.json").read_text(encoding="utf-8"))["recipe"].get("loss", {})
    hi, ht = embed(held)
    labels = [s.findings for s in held]
    directions = {"i2t": (hi, ht), "t2i": (ht, hi), "i2i": (hi, hi), "t2t": (ht, ht)}
    tfidf = _unit(TfidfVectorizer().fit_transform([s.text for s in held]).toarray())
    probe_set = train[: args.probe_studies]
    pi, pt = embed(probe_set)
    probe_labels = [s.findings for s in probe_set]
    result: Dict[str, Any] = {
        "command": f"benchmarks/diag_label_precision.py --work {work} --run {args.run}",
        "heldout_studies": len(held),
        "label_precision@10": {n: round(label_precision_at_k(q, c, labels, labels, 10), 4)
                               for n, (q, c) in directions.items()},
        "tfidf_t2t_label_precision@10": round(label_precision_at_k(tfidf, tfidf, labels, labels, 10), 4),
        "by_finding_count": {n: by_finding_count(directions[n][0], directions[n][1], labels)
                             for n in ("i2t", "t2i", "t2t")},
        "train_vs_heldout": {
            "train_500": {k: round(v, 4) for k, v in evaluate_heldout(embedder, train[:500]).items()
                          if "R@10" in k or "precision" in k},
            "heldout": {k: round(v, 4) for k, v in evaluate_heldout(embedder, held).items()
                        if "R@10" in k or "precision" in k},
        },
        "probe_auroc": {"image": probe_aurocs(pi, probe_labels, hi, labels),
                        "text": probe_aurocs(pt, probe_labels, ht, labels)},
        "attribute_oracles": attribute_oracles(held, work / "heldout-archive" / "ground_truth.csv"),
        "label_key_oracles": label_key_oracles(manifest, held, run_loss),
    }
    emit_json(result)
    if args.out:
        write_json_atomic(args.out, result)


if __name__ == "__main__":
    main()
