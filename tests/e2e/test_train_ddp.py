"""torchrun scale-out: two CPU processes (gloo) train to the same weights as one process on the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cxr_search.checkpoints import load_model
from tests.helpers.numerics import assert_relative_close
from tests.helpers.ports import free_port
from tests.helpers.train_data import fast_overrides, make_manifest
from train.config import get_recipe
from train.metrics_log import read_metrics
from train.trainer import train

pytestmark = pytest.mark.ddp  # torchrun with two gloo processes (e2e: tests/conftest.py)

# A normalisation-free-of-batch-statistics image tower: BatchNorm statistics are per process under DDP
# (SyncBatchNorm needs a GPU), so only a LayerNorm model can match one process exactly on CPU.
_MODEL = {"image": {"name": "test_convnext"},
          "text": {"bert_config": {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}}}


def test_torchrun_two_processes_match_one_process(tmp_path: Path) -> None:
    manifest = make_manifest(tmp_path / "data", studies=16)
    # Adam divides by sqrt(v) + eps: a parameter whose true gradient is zero (BERT's key biases: softmax
    # ignores a constant shift) gets float noise of ~1e-12 that the default eps of 1e-8 turns into a
    # full-size step of either sign, so the runs would differ by summation order alone. eps 1e-6 keeps
    # such noise from moving weights while leaving real gradients' steps unchanged in both runs.
    overrides = fast_overrides(model_overrides=_MODEL, optim={"batch_size": 8, "epochs": 1, "eps": 1e-6},
                               checkpoint_every=0)
    single = train(get_recipe("tiny-synth", **overrides), [manifest], tmp_path / "one", progress=False)
    assert single.steps == 2
    sets = ["--set", "model_overrides=" + json.dumps(_MODEL), "--set", "init.vocab_size=200",
            "--set", "data.num_workers=0", "--set", "data.val_split=train", "--set", "data.max_val_studies=8",
            "--set", "optim.batch_size=8", "--set", "optim.epochs=1", "--set", "optim.eps=1e-6", "--set", "optim.warmup_epochs=0.5",
            "--set", "checkpoint_every=0", "--set", "log_every=1", "--set", "device=cpu"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", "2", "--master_port",
           str(free_port()), "-m", "cli", "train", "tiny-synth", "--data", str(manifest), "--out",
           str(tmp_path / "two"), "--json", *sets]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout[proc.stdout.index("{"):proc.stdout.rindex("}") + 1])
    assert summary["steps"] == 2
    assert json.loads((tmp_path / "two" / "config.json").read_text())["world_size"] == 2
    # Same logged loss (process-averaged local terms = the global loss) and the same final weights.
    one_losses = [r["loss"] for r in read_metrics(tmp_path / "one", "train")]
    two_losses = [r["loss"] for r in read_metrics(tmp_path / "two", "train")]
    torch.testing.assert_close(torch.tensor(two_losses), torch.tensor(one_losses), rtol=1e-5, atol=1e-6)
    a = load_model(tmp_path / "one" / "model").state_dict()
    b = load_model(tmp_path / "two" / "model").state_dict()
    assert a.keys() == b.keys()
    lr = get_recipe("tiny-synth", **overrides).optim.lr
    for key in a:
        if key.endswith("attention.self.key.bias"):
            # Zero true gradient: each run only turns float noise nu into steps of lr * nu / eps, which have no
            # relative accuracy; both stay within a hundredth of one real (~lr) step of each other (measured:
            # 1.4e-6 = lr / 1400 apart, so the bound leaves 14x for noisier kernels).
            assert float((b[key] - a[key]).abs().max()) <= 0.01 * lr, key
        else:
            # The gradients are summed in another order (all-reduce of two halves): whole-tensor relative error
            # measured <= 7.5e-6 after the two Adam steps (1e-4 leaves 13x), where element-wise relative errors
            # of near-zero biases would be meaningless.
            assert_relative_close(b[key], a[key], 1e-4, msg=key)
