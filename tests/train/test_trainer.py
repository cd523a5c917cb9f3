"""The trainer end to end on a tiny synthetic archive: outputs, resume after an interruption, bad input."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Tuple

import pytest
import torch

from cxr_search.checkpoints import load_model
from cxr_search.errors import ConfigError, DatasetError
from cxr_search.inference import Embedder
from cxr_search.tokenizer import TextTokenizer
from tests.helpers.numerics import assert_relative_close
from tests.helpers.train_data import fast_overrides, make_manifest
from train.config import get_recipe
from train.metrics_log import read_metrics
from train.state import latest_checkpoint, list_step_checkpoints, load_state
from train.trainer import train


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_manifest(tmp_path_factory.mktemp("train-data"))


def _weights(path: Path) -> dict:
    return {k: v.clone() for k, v in load_model(path).state_dict().items()}


class _Interrupt(Exception):
    pass


@pytest.fixture(scope="module")
def full_run(manifest: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("full") / "run"
    result = train(get_recipe("tiny-synth", **fast_overrides()), [manifest], out, progress=False)
    assert result.stopped == "done"
    return out


def test_run_writes_a_loadable_model_metrics_and_best_checkpoints(full_run: Path) -> None:
    summary = json.loads((full_run / "summary.json").read_text())
    assert summary["steps"] == summary["total_steps"] == 6  # 24 studies / batch 8 x 2 epochs
    model = load_model(full_run / "model")
    assert model.tokenizer is not None and model.tokenizer.vocab_size <= 200
    emb = Embedder(model).embed_texts(["small left pleural effusion", "no pneumothorax"])
    assert emb.shape == (2, model.config.embed_dim)
    train_lines = read_metrics(full_run, "train")
    assert [r["step"] for r in train_lines] == [1, 2, 3, 4, 5, 6]
    assert all(r["loss"] > 0 and r["lr"] > 0 for r in train_lines[:-1])
    assert train_lines[-1]["lr"] == pytest.approx(0.0, abs=1e-12)  # cosine decays to 0 at the last step
    val = read_metrics(full_run, "val")
    assert [r["step"] for r in val] == [3, 6]  # each epoch end
    assert all(0.0 <= r["val_R@10"] <= 1.0 for r in val)
    assert (full_run / "best-loss" / "model.safetensors").is_file()
    assert (full_run / "best-recall" / "model.safetensors").is_file()
    config = json.loads((full_run / "config.json").read_text())
    assert config["recipe"]["name"] == "tiny-synth" and config["world_size"] == 1
    # keep_last=2: older step checkpoints were pruned; latest.json names the newest.
    steps = [p.name for p in list_step_checkpoints(full_run)]
    assert steps == ["step-00000004", "step-00000006"]
    assert latest_checkpoint(full_run).name == "step-00000006"


def test_training_changes_the_weights_and_lowers_the_loss(full_run: Path) -> None:
    lines = read_metrics(full_run, "train")
    assert lines[-1]["loss"] < lines[0]["loss"]


def test_label_term_is_trained_and_logged(full_run: Path) -> None:
    """tiny-synth trains with the label term; the synthetic MIMIC manifest carries CheXpert labels."""
    loss = get_recipe("tiny-synth").loss
    assert loss.label_weight > 0
    for r in read_metrics(full_run, "train"):  # log_every 1, no accumulation: the logged terms are the step's
        assert r["label"] > 0
        total = r["clip"] + loss.icl_weight * r["icl"] + loss.tcl_weight * r["tcl"] + loss.label_weight * r["label"]
        assert r["loss"] == pytest.approx(total, rel=1e-5)
    assert all(r["val_label"] > 0 for r in read_metrics(full_run, "val"))


@pytest.mark.parametrize("stop_at", [3, 5])
def test_interrupted_run_resumes_to_the_same_weights(manifest: Path, full_run: Path, tmp_path: Path,
                                                     stop_at: int) -> None:
    """Killed between checkpoints (step 3: last checkpoint 2; step 5: last checkpoint 4) then resumed."""
    cfg = get_recipe("tiny-synth", **fast_overrides())
    out = tmp_path / "run"

    def interrupt(step: int) -> None:
        if step == stop_at:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        train(cfg, [manifest], out, progress=False, on_step=interrupt)
    assert not (out / "model").exists()
    assert load_state(latest_checkpoint(out))["step"] == stop_at - 1
    result = train(cfg, [manifest], out, resume=True, progress=False)
    assert result.stopped == "done" and result.steps == 6
    ref, got = _weights(full_run / "model"), _weights(out / "model")
    assert ref.keys() == got.keys()
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], rtol=1e-5, atol=1e-6, msg=key)


def test_time_limit_stops_with_a_resumable_checkpoint(manifest: Path, full_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    first = train(get_recipe("tiny-synth", **fast_overrides(max_minutes=0.0)), [manifest], out, progress=False)
    assert first.stopped == "time" and first.steps == 1 and first.model_dir is None
    # max_minutes may change on resume: it does not change the weights.
    result = train(get_recipe("tiny-synth", **fast_overrides()), [manifest], out, resume=True, progress=False)
    assert result.steps == 6
    ref, got = _weights(full_run / "model"), _weights(out / "model")
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.slow
def test_worker_processes_give_the_same_samples_as_the_main_process(manifest: Path, full_run: Path,
                                                                    tmp_path: Path) -> None:
    cfg = get_recipe("tiny-synth", **fast_overrides(data={"num_workers": 2}, optim={"epochs": 2}))
    train(cfg, [manifest], tmp_path / "run", progress=False)
    ref, got = _weights(full_run / "model"), _weights(tmp_path / "run" / "model")
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], rtol=1e-5, atol=1e-6, msg=key)


def test_existing_run_needs_resume_and_same_settings(manifest: Path, full_run: Path) -> None:
    with pytest.raises(ConfigError, match="--resume"):
        train(get_recipe("tiny-synth", **fast_overrides()), [manifest], full_run, progress=False)
    with pytest.raises(ConfigError, match="optim.lr"):
        train(get_recipe("tiny-synth", **fast_overrides(optim={"lr": 0.5})), [manifest], full_run, resume=True,
              progress=False)


def test_bad_inputs_give_actionable_errors(manifest: Path, tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="data.datasets"):
        train(get_recipe("tiny-synth", **fast_overrides(data={"datasets": ["mimic-cxr", "chexpert"]})),
              [manifest], tmp_path / "a", progress=False)
    with pytest.raises(DatasetError, match="optim.batch_size"):
        train(get_recipe("tiny-synth", **fast_overrides(optim={"batch_size": 64})), [manifest], tmp_path / "b",
              progress=False)
    with pytest.raises(ConfigError, match="accum_steps"):
        train(get_recipe("tiny-synth", **fast_overrides(optim={"batch_size": 8, "accum_steps": 3})), [manifest],
              tmp_path / "c", progress=False)
    with pytest.raises(ConfigError, match="fp16"):
        train(get_recipe("tiny-synth", **fast_overrides(precision="fp16", device="cpu")), [manifest],
              tmp_path / "d", progress=False)


def test_manifest_without_reports_is_refused(manifest: Path, tmp_path: Path) -> None:
    from cxr_search.datasets import read_manifest, write_manifest

    rows = read_manifest(manifest)
    for r in rows:
        r.findings = r.impression = r.report_text = ""
    bare = tmp_path / "bare.csv"
    write_manifest(rows, bare)
    with pytest.raises(DatasetError, match="no report text"):
        train(get_recipe("tiny-synth", **fast_overrides()), [bare], tmp_path / "run", progress=False)


def test_channels_last_gives_the_same_loss_and_gradients(manifest: Path) -> None:
    """NHWC is a memory layout only: one study batch gives the same loss and gradients in both layouts.

    The loss is compared in float32, the precision training runs in; the gradients in float64. In float32,
    PyTorch's CPU channels-last BatchNorm backward loses up to ~1e-2 of the stem BatchNorms' gradients
    (whole-tensor error against float64: 7e-3 with one thread, 1e-3 with two; torch 2.14.1, AVX2 and
    AVX-512 alike), which measures that kernel and the machine's thread count, not the layout handling
    tested here. In float64 the two layouts agree to ~1e-14.

    (Whole runs are not compared weight for weight: Adam turns float-rounding differences of near-zero
    gradients into lr-sized steps, so two layouts drift apart by ~lr within a few steps.)
    """
    from cxr_search.config import get_model_config
    from cxr_search.model import create_model
    from train.dataset import StudyDataset, make_collate
    from train.inputs import load_training_rows
    from train.losses import cxr_clip_loss
    from train.trainer import StudyForward
    from train.validate import _pad_cat

    cfg = get_recipe("tiny-synth", **fast_overrides())
    rows, _ = load_training_rows([manifest], cfg.data)
    model = create_model(get_model_config(cfg.model, **cfg.model_overrides))
    ds = StudyDataset(rows, model.config.preprocess, train=False)
    batch = make_collate(TextTokenizer.basic())([ds[i] for i in range(8)])
    tokens = _pad_cat(batch["text1"], batch["text2"])

    def loss_of(channels_last: bool, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.nn.Module]:
        net = copy.deepcopy(model).to(dtype).train()
        if channels_last:
            net.image_tower.to(memory_format=torch.channels_last)
        out = StudyForward(net, channels_last=channels_last)(batch["image1"].to(dtype), batch["image2"].to(dtype),
                                                             tokens["input_ids"], tokens["attention_mask"])
        return cxr_clip_loss(*out)["loss"], net

    # float32 losses differ by <= 3.4e-7 relative (measured, one or two threads): rtol 1e-5 of a loss of ~5.7.
    loss_a, loss_b = (loss_of(cl, torch.float32)[0].detach() for cl in (False, True))
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-6)
    grads = []
    for channels_last in (False, True):
        loss, net = loss_of(channels_last, torch.float64)
        loss.backward()
        grads.append({k: p.grad.contiguous() for k, p in net.named_parameters() if p.grad is not None})
    grads_a, grads_b = grads
    assert grads_a.keys() == grads_b.keys() and any("image_tower" in k for k in grads_a)
    # Whole-tensor relative error: float64 rounding (1.1e-16) amplified as much as the float32 kernel amplifies
    # float32's (7e-3 / 6e-8 ~ 1e5) stays below 1e-10 (measured: 2e-14). Tensors whose true gradient is zero
    # (BERT's key biases: softmax ignores a constant shift) hold rounding noise only, so each tensor is measured
    # against at least 1e-6 of the whole gradient's norm.
    total = math.sqrt(sum(float(g.norm()) ** 2 for g in grads_a.values()))
    for key in grads_a:
        assert_relative_close(grads_b[key], grads_a[key], 1e-10, floor=1e-6 * total, msg=key)


def test_channels_last_run_saves_plain_weights_and_may_change_on_resume(manifest: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"

    def interrupt(step: int) -> None:
        if step == 3:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        train(get_recipe("tiny-synth", **fast_overrides(channels_last=True)), [manifest], out, progress=False,
              on_step=interrupt)
    result = train(get_recipe("tiny-synth", **fast_overrides()), [manifest], out, resume=True, progress=False)
    assert result.stopped == "done" and result.steps == 6
    lines = read_metrics(out, "train")
    assert lines[-1]["loss"] < lines[0]["loss"]
    model = load_model(out / "model")
    assert all(t.is_contiguous() for t in model.state_dict().values())
