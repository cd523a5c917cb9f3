"""train.distributed: a real two-process gloo job compared with one process, plus single-process paths."""

from __future__ import annotations

import datetime
import random
import time
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import train.distributed as td
from cxr_search.errors import ConfigError
from tests.helpers import dist_workers as dw
from tests.helpers.ports import free_port

WORLD = 2
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> List[Dict]:
    """Run the two-rank job once (spawn costs seconds) and load what each rank wrote."""
    out_dir = tmp_path_factory.mktemp("dist")
    ctx = mp.start_processes(
        dw.worker, args=(WORLD, free_port(), str(out_dir)), nprocs=WORLD, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + 90
    try:
        while not ctx.join(timeout=1):  # re-raises a worker's exception with its traceback
            if time.monotonic() > deadline:
                raise TimeoutError("the two-process gloo job did not finish in 90 s")
    finally:
        for proc in ctx.processes:
            if proc.is_alive():
                proc.kill()
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.fixture()
def no_torchrun_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in TORCHRUN_VARS:
        monkeypatch.delenv(name, raising=False)
    assert not dist.is_initialized()
    return monkeypatch


def single_process_reference(label_keys=None, label_within=False):
    model = dw.TinyEncoder()
    out = dw.loss_of(model, model.logit_scale, dw.global_inputs(), gather=None, offset=0, label_keys=label_keys,
                     label_within=label_within)
    out["loss"].backward()
    grads = {name: p.grad.detach() for name, p in model.named_parameters()}
    return {k: v.detach() for k, v in out.items()}, grads


# ---------------------------------------------------------------- two processes


@pytest.mark.ddp
def test_dist_info_and_reuse(ranks: List[Dict]) -> None:
    for r, res in enumerate(ranks):
        info = res["info"]
        assert (info.rank, info.world_size, info.local_rank, info.device) == (r, WORLD, r, torch.device("cpu"))
        assert info.is_distributed and info.is_main == (r == 0)
        assert res["reused"] == info  # second init reuses the group
        assert res["initialised_after_cleanup"] is False  # cleanup destroyed the group it created


@pytest.mark.ddp
def test_broadcast_and_all_reduce_mean(ranks: List[Dict]) -> None:
    for res in ranks:
        assert res["broadcast"] == {"from": 0, "list": [1, 2]}
        torch.testing.assert_close(res["mean_float"], torch.tensor([1.5, 5.0]))
        assert res["mean_int"].dtype == torch.float32 and res["mean_int"].item() == 0.5


@pytest.mark.ddp
def test_all_gather_forward_order_and_backward(ranks: List[Dict]) -> None:
    expected = torch.cat([dw.gather_local(r) for r in range(WORLD)])  # rank order
    rows = dw.GATHER_ROWS
    for r, res in enumerate(ranks):
        torch.testing.assert_close(res["gathered"], expected)
        # d/dx_r of sum_r' <W_r', gather(x)> = sum over ranks of W_r'[rows of rank r]
        want = sum(dw.gather_weights(q)[r * rows : (r + 1) * rows] for q in range(WORLD))
        torch.testing.assert_close(res["gather_grad"], want, atol=1e-12, rtol=0)


@pytest.mark.ddp
def test_mismatched_gather_shapes_raise_on_every_rank(ranks: List[Dict]) -> None:
    for res in ranks:
        assert res["shape_error"] is not None and "same shape on every rank" in res["shape_error"]
        assert "[(1, 2), (2, 2)]" in res["shape_error"]


@pytest.mark.ddp
def test_distributed_loss_and_ddp_gradients_equal_single_process(ranks: List[Dict]) -> None:
    ref_loss, ref_grads = single_process_reference()
    for res in ranks:
        for key in ("loss", "clip", "icl", "tcl"):
            torch.testing.assert_close(res["mean_loss"][key], ref_loss[key], atol=1e-10, rtol=0)
        assert set(res["grads"]) == {"proj.weight", "proj.bias", "logit_scale"}
        for name, grad in res["grads"].items():
            torch.testing.assert_close(grad, ref_grads[name], atol=1e-10, rtol=0)
    # Each rank's own loss differs from the global one (the test is not vacuous).
    assert abs(ranks[0]["local_loss"]["loss"] - ranks[1]["local_loss"]["loss"]) > 1e-3
    for name in ref_grads:
        assert ref_grads[name].abs().max() > 1e-4


@pytest.mark.ddp
def test_distributed_label_term_equals_single_process(ranks: List[Dict]) -> None:
    keys = torch.tensor(dw.LABEL_KEYS, dtype=torch.int64)
    ref_loss, ref_grads = single_process_reference(keys)
    assert ref_loss["label"] > 0 and ref_loss["loss"] > ref_loss["clip"] + ref_loss["icl"] + 0.5 * ref_loss["tcl"]
    for res in ranks:
        assert torch.equal(res["gathered_keys"], keys)
        for key in ("loss", "clip", "icl", "tcl", "label"):
            torch.testing.assert_close(res["label_mean_loss"][key], ref_loss[key], atol=1e-10, rtol=0)
        for name, grad in res["label_grads"].items():
            torch.testing.assert_close(grad, ref_grads[name], atol=1e-10, rtol=0)
    # label_within: the term over all pairs, also equal to one process (and not the plain term).
    within_loss, within_grads = single_process_reference(keys, label_within=True)
    assert within_loss["label"] > ref_loss["label"]
    for res in ranks:
        for key in ("loss", "clip", "icl", "tcl", "label"):
            torch.testing.assert_close(res["within_mean_loss"][key], within_loss[key], atol=1e-10, rtol=0)
        for name, grad in res["within_grads"].items():
            torch.testing.assert_close(grad, within_grads[name], atol=1e-10, rtol=0)


# ---------------------------------------------------------------- one process


def test_init_without_env_is_single_process(no_torchrun_env: pytest.MonkeyPatch) -> None:
    info = td.init_distributed(device="cpu")
    assert info == td.DistInfo(0, 1, 0, torch.device("cpu"))
    assert info.is_main and not info.is_distributed
    assert not dist.is_initialized()
    auto = td.init_distributed()
    assert auto.device == (torch.device("cuda:0") if torch.cuda.is_available() else torch.device("cpu"))


def test_helpers_are_identity_without_group(no_torchrun_env: pytest.MonkeyPatch) -> None:
    x = torch.randn(3, 4, requires_grad=True)
    assert td.all_gather_with_grad(x, check_shapes=True) is x
    mean = td.all_reduce_mean(x)
    assert not mean.requires_grad and torch.equal(mean, x.detach())
    obj = {"a": 1}
    assert td.broadcast_object(obj) is obj
    td.barrier()
    td.cleanup()
    assert not td.is_distributed()


def test_bad_device_and_env_raise_config_error(no_torchrun_env: pytest.MonkeyPatch) -> None:
    monkeypatch = no_torchrun_env
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert td.init_distributed("auto").device == torch.device("cpu")
    with pytest.raises(ConfigError, match="no CUDA"):
        td.init_distributed("cuda")
    with pytest.raises(ConfigError, match="unknown device"):
        td.init_distributed("gpu0")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="MASTER_ADDR, MASTER_PORT"):
        td.init_distributed("cpu")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ConfigError, match="inconsistent"):
        td.init_distributed("cpu")
    monkeypatch.setenv("RANK", "zero")
    with pytest.raises(ConfigError, match="not an integer"):
        td.init_distributed("cpu")
    assert not dist.is_initialized()


@pytest.mark.ddp
def test_world_of_one_from_env_creates_and_cleans_up(no_torchrun_env: pytest.MonkeyPatch) -> None:
    for name, value in zip(TORCHRUN_VARS, ("0", "1", "0", "127.0.0.1", str(free_port())), strict=False):
        no_torchrun_env.setenv(name, value)
    try:
        info = td.init_distributed("cpu", timeout=datetime.timedelta(seconds=10))
        assert dist.is_initialized() and dist.get_backend() == "gloo"
        assert info.world_size == 1 and not info.is_distributed
        x = torch.ones(2, 3)
        assert td.all_gather_with_grad(x) is x
    finally:
        td.cleanup()
    assert not dist.is_initialized()


@pytest.mark.ddp
def test_existing_group_is_reused_and_not_destroyed(no_torchrun_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        info = td.init_distributed("cpu")
        assert (info.rank, info.world_size) == (0, 1)
        td.cleanup()
        assert dist.is_initialized()  # not ours to destroy
    finally:
        dist.destroy_process_group()


def test_seed_everything_is_reproducible() -> None:
    def draw():
        return random.random(), float(np.random.rand()), float(torch.rand(()))

    td.seed_everything(1234)
    first = draw()
    td.seed_everything(1234)
    assert draw() == first
    td.seed_everything(1235)
    assert draw() != first
