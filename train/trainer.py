"""The CXR-CLIP trainer: one function, :func:`train`, for one process or many (``torchrun``).

Per optimiser step: ``accum_steps`` micro-batches, each encoding two images and two texts per study
and adding ``cxr_clip_loss / accum_steps`` (negatives all-gathered across processes with gradients)
-> gradient unscale / clip -> AdamW -> per-step warm-up + cosine schedule. Checkpoints (model in
our format + optimiser, scheduler, scaler, data position and RNG states) every ``checkpoint_every``
steps and at epoch ends; ``resume=True`` continues from the latest one and ends with the same
weights as an uninterrupted run (data order and augmentation are functions of (seed, epoch, index),
see :mod:`train.sampling`). Validation at epoch ends (or every ``eval_every`` steps) keeps the best
model by validation loss and by validation Recall@10.

Gradient accumulation splits a global batch into smaller contrastive batches: each micro-batch only
sees its own negatives, so ``accum_steps > 1`` is a memory trade, not an exact equivalent.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.utils.data import DataLoader

from cxr_search.checkpoints import load_model, save_model
from cxr_search.errors import ConfigError, TrainingError
from cxr_search.fileio import write_json_atomic
from cxr_search.inference import autocast_context
from cxr_search.model import CXRClip
from train.augment import train_transform
from train.config import TrainConfig
from train.dataset import StudyDataset, epoch_generator, make_collate
from train.distributed import (
    DistInfo,
    all_gather_tensor,
    all_gather_with_grad,
    all_reduce_mean,
    barrier,
    cleanup,
    init_distributed,
    seed_everything,
)
from train.inputs import load_paraphrases, load_training_rows, report_texts, worker_init
from train.losses import cxr_clip_loss
from train.metrics_log import MetricsLog
from train.optim import build_optimizer, build_scheduler
from train.sampling import SeededSamples, StepSampler
from train.state import capture_rng, latest_checkpoint, load_state, restore_rng, save_checkpoint
from train.validate import _pad_cat, validate
from train.warm_start import initial_model

logger = logging.getLogger(__name__)

__all__ = ["TrainResult", "train"]

# Settings that may change between a run and its resumption (they do not change the weights).
_RESUMABLE_CHANGES = {"max_minutes", "device", "log_every", "data.num_workers", "description", "channels_last"}


@dataclass
class TrainResult:
    """What a call to :func:`train` did."""

    out_dir: Path
    model_dir: Optional[Path]
    steps: int
    total_steps: int
    epochs: float
    seconds: float
    stopped: str  # "done", "time" (max_minutes reached, resumable)
    last_val: Dict[str, float] = field(default_factory=dict)
    best: Dict[str, Any] = field(default_factory=dict)
    is_main: bool = True  # False on ranks > 0 of a torchrun job (they print nothing)

    def to_dict(self) -> Dict[str, Any]:
        """JSON-able summary."""
        return {"out_dir": str(self.out_dir), "model_dir": str(self.model_dir) if self.model_dir else None,
                "steps": self.steps, "total_steps": self.total_steps, "epochs": round(self.epochs, 4),
                "seconds": round(self.seconds, 2), "stopped": self.stopped, "last_val": self.last_val,
                "best": self.best}


class StudyForward(nn.Module):
    """Both towers on a study batch, in one forward (what DDP wraps)."""

    def __init__(self, model: CXRClip, *, channels_last: bool = False) -> None:
        super().__init__()
        self.model = model
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def forward(self, image1: torch.Tensor, image2: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        b = image1.shape[0]
        images = torch.cat([image1, image2], dim=0).contiguous(memory_format=self.memory_format)  # [2b, C, H, W]
        img = self.model.encode_image(images)  # [2b, D]
        txt = self.model.encode_text(input_ids, attention_mask)  # [2b, D]
        scale = self.model.logit_scale.float().exp()  # []
        return img[:b], img[b:], txt[:b], txt[b:], scale


def _flatten(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and k != "model_overrides":
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _check_resume_config(saved: Dict[str, Any], current: Dict[str, Any], out_dir: Path) -> None:
    a, b = _flatten(saved), _flatten(current)
    diff = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k) and k not in _RESUMABLE_CHANGES]
    if diff:
        shown = "; ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in diff[:6])
        raise ConfigError(
            f"{out_dir}: the run there was started with other settings ({shown}); resume with the same "
            "recipe and --set options, or start a new run in another --out"
        )


def _precision(cfg: TrainConfig, device: torch.device) -> str:
    if cfg.precision == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    if cfg.precision == "fp16" and device.type != "cuda":
        raise ConfigError("precision fp16 (AMP with a gradient scaler) needs a CUDA device; use --set precision=fp32 or bf16")
    return cfg.precision


def _enable_grad_checkpointing(model: CXRClip) -> None:
    trunk = model.image_tower.trunk
    if hasattr(trunk, "set_grad_checkpointing"):
        trunk.set_grad_checkpointing(True)
    elif hasattr(trunk, "gradient_checkpointing_enable"):
        trunk.gradient_checkpointing_enable()
    model.text_tower.transformer.gradient_checkpointing_enable()


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
    )


def train(
    cfg: TrainConfig,
    manifests: Sequence[Union[str, Path]],
    out_dir: Union[str, Path],
    *,
    resume: bool = False,
    progress: bool = True,
    on_step: Optional[Callable[[int], None]] = None,
) -> TrainResult:
    """Train (or resume) a run of recipe ``cfg`` on the manifests' rows into ``out_dir``.

    Args:
        cfg: The resolved recipe.
        manifests: Manifest CSV files (``cxr-search data prepare`` / ``data cache`` output).
        out_dir: Run directory (see :mod:`train.state` for its layout).
        resume: Continue from ``out_dir``'s latest checkpoint (a fresh start when it has none).
        progress: tqdm progress bar (rank 0).
        on_step: Called with the global step after every optimiser step (tests use it to interrupt).

    Returns:
        The run summary; the final model is in ``out_dir/model`` when the schedule completed.

    Raises:
        ConfigError: Bad settings, or ``out_dir`` holds a run and ``resume`` is False.
        DatasetError: Manifests that do not fit the recipe.
        TrainingError: Out of memory or a non-finite loss.
    """
    t_start = time.monotonic()
    out = Path(out_dir)
    dist = init_distributed(None if cfg.device == "auto" else cfg.device)
    device = dist.device
    precision = _precision(cfg, device)
    ckpt = latest_checkpoint(out) if resume else None
    if not resume and (latest_checkpoint(out) is not None or (out / "model").exists()):
        raise ConfigError(f"{out}: already holds a training run; pass --resume to continue it or choose another --out")
    run_info = {"recipe": cfg.to_dict(), "manifests": [str(Path(m).resolve()) for m in manifests],
                "world_size": dist.world_size}
    if ckpt is not None:
        saved = json.loads((out / "config.json").read_text(encoding="utf-8"))
        _check_resume_config(saved["recipe"], run_info["recipe"], out)

    train_rows, val_rows = load_training_rows(manifests, cfg.data)
    seed_everything(cfg.seed)
    if ckpt is not None:
        model = load_model(ckpt / "model")
        state: Optional[Dict[str, Any]] = load_state(ckpt)
        logger.info("resuming %s from %s (step %d)", out, ckpt.name, state["step"])
    else:
        model = initial_model(cfg, lambda: report_texts(train_rows))
        state = None
    assert model.tokenizer is not None
    if state is None:
        # Ranks built identical weights from one seed; from here on (dropout) each rank draws its own numbers.
        seed_everything(cfg.seed + 7919 * dist.rank)
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / "config.json", {**run_info, "model": model.config.to_dict()})
    model.to(device).train()
    if cfg.grad_checkpointing:
        _enable_grad_checkpointing(model)
    if cfg.channels_last:
        model.image_tower.to(memory_format=torch.channels_last)  # 4-D conv weights become NHWC; the rest is unchanged

    preprocess = model.config.preprocess
    transform = train_transform(preprocess, cfg.augment)
    paraphrases = load_paraphrases(cfg.data.paraphrases)
    label_set = {"label_names": cfg.loss.label_names or None, "uncertain_positive": cfg.loss.label_uncertain == "positive"}
    train_set = StudyDataset(train_rows, preprocess, train=True, text_paraphrases=paraphrases, seed=cfg.seed,
                             transform=transform, **label_set)
    val_set = StudyDataset(val_rows, preprocess, train=False, **label_set) if val_rows else None
    if cfg.loss.label_weight:
        # Info, not a warning, when none has labels: tiny-synth keeps its label term on PACS exports, which have
        # none, and the term then adds nothing.
        logger.info("label term (weight %s): %d of %d training studies have labels (manifest column 'labels')",
                    cfg.loss.label_weight, train_set.labelled_studies, len(train_set))
    # The label-grouped order needs every study's key up front; without labels (a PACS export) it is the plain shuffle.
    grouped = cfg.data.label_groups > 1 and train_set.labelled_studies > 0
    group_keys = train_set.label_keys(range(len(train_set))) if grouped else None
    group_size = cfg.data.label_groups if grouped else 0
    samples = SeededSamples(train_set, cfg.seed)
    optim_cfg = cfg.optim
    probe = StepSampler(len(train_set), optim_cfg.batch_size, seed=cfg.seed, epoch=0, rank=dist.rank,
                        world_size=dist.world_size, accum_steps=optim_cfg.accum_steps)
    steps_per_epoch = probe.steps_per_epoch
    total_steps = steps_per_epoch * optim_cfg.epochs
    warmup = int(round(optim_cfg.warmup_epochs * steps_per_epoch))

    forward: nn.Module = StudyForward(model, channels_last=cfg.channels_last)
    if dist.is_distributed:
        forward = nn.parallel.DistributedDataParallel(
            forward, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = build_optimizer(model, optim_cfg)
    scheduler = build_scheduler(optimizer, warmup, total_steps, optim_cfg.min_lr_ratio)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    step = 0
    best: Dict[str, Any] = {"val_loss": math.inf, "val_R@10": -math.inf}
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        restore_rng(state["rng"])
        step = int(state["step"])
        best = dict(state["best"])

    log = MetricsLog(out, enabled=dist.is_main)
    bar = None
    if progress and dist.is_main:
        from tqdm import tqdm

        bar = tqdm(total=total_steps, initial=step, unit="step", desc=f"train {cfg.name}", dynamic_ncols=True)

    def checkpoint() -> None:
        st = {"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
              "scaler": scaler.state_dict(), "rng": capture_rng(), "best": best}
        if dist.is_main:
            save_checkpoint(out, model, st, step=step, keep_last=cfg.keep_last)
        barrier()

    def evaluate(epoch_f: float) -> Dict[str, float]:
        if val_set is None:
            return {}
        metrics: Dict[str, float] = {}
        if dist.is_main:
            metrics = validate(model, val_set, batch_size=max(2, probe.local * 2), device=device,
                               precision=precision, icl_weight=cfg.loss.icl_weight, tcl_weight=cfg.loss.tcl_weight,
                               label_weight=cfg.loss.label_weight, label_within=cfg.loss.label_within)
            log.write({"kind": "val", "step": step, "epoch": round(epoch_f, 4), **metrics})
            if metrics["val_loss"] < best["val_loss"]:
                best.update({"val_loss": metrics["val_loss"], "val_loss_step": step})
                save_model(model, out / "best-loss", provenance={"step": step, "val_loss": metrics["val_loss"]})
            if metrics["val_R@10"] > best["val_R@10"]:
                best.update({"val_R@10": metrics["val_R@10"], "val_R@10_step": step})
                save_model(model, out / "best-recall", provenance={"step": step, "val_R@10": metrics["val_R@10"]})
        barrier()
        return metrics

    stopped, last_val = "done", {}
    window: List[float] = []
    t_window = time.monotonic()
    try:
        while step < total_steps:
            epoch, in_epoch = divmod(step, steps_per_epoch)
            sampler = StepSampler(len(train_set), optim_cfg.batch_size, seed=cfg.seed, epoch=epoch, rank=dist.rank,
                                  world_size=dist.world_size, accum_steps=optim_cfg.accum_steps, start_step=in_epoch,
                                  label_keys=group_keys, group_size=group_size)
            loader = DataLoader(samples, batch_sampler=sampler, num_workers=cfg.data.num_workers,
                                collate_fn=make_collate(model.tokenizer), worker_init_fn=worker_init,
                                pin_memory=device.type == "cuda", generator=epoch_generator(cfg.seed, epoch))
            micro = 0
            for batch in loader:
                last_micro = micro == optim_cfg.accum_steps - 1
                sync = contextlib.nullcontext() if last_micro or not dist.is_distributed else forward.no_sync()
                with sync:
                    keys = train_set.label_keys(batch["study_index"]) if cfg.loss.label_weight else None
                    terms = _micro_step(forward, batch, cfg, dist, device, precision, scaler, probe.local, keys)
                window.append(float(terms["loss"]))
                micro += 1
                if not last_micro:
                    continue
                micro = 0
                if optim_cfg.grad_clip is not None:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), optim_cfg.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                if optim_cfg.max_logit_scale is not None:
                    with torch.no_grad():
                        model.logit_scale.clamp_(max=math.log(optim_cfg.max_logit_scale))
                step += 1
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{terms['loss']:.3f}")
                if step % cfg.log_every == 0 or step == total_steps:
                    dt = time.monotonic() - t_window
                    log.write({"kind": "train", "step": step, "epoch": round(step / steps_per_epoch, 4),
                               "lr": scheduler.get_last_lr()[0], "loss": sum(window) / len(window),
                               **{k: terms[k] for k in ("clip", "icl", "tcl", "label")},
                               "scale": float(model.logit_scale.detach().exp()),
                               "studies_per_s": len(window) / optim_cfg.accum_steps * optim_cfg.batch_size / max(dt, 1e-9)})
                    window, t_window = [], time.monotonic()
                epoch_end = step % steps_per_epoch == 0
                epochs_done = step // steps_per_epoch
                if ((cfg.eval_every and step % cfg.eval_every == 0) or step == total_steps
                        or (epoch_end and cfg.eval_every_epochs and epochs_done % cfg.eval_every_epochs == 0)):
                    last_val = evaluate(step / steps_per_epoch)
                if on_step is not None:
                    on_step(step)
                timed_out = cfg.max_minutes is not None and time.monotonic() - t_start > 60 * cfg.max_minutes
                if epoch_end or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or timed_out:
                    checkpoint()
                if timed_out and step < total_steps:
                    stopped = "time"
                    break
            if stopped == "time":
                break
    finally:
        if bar is not None:
            bar.close()
        log.close()
    model_dir = None
    if stopped == "done" and dist.is_main:
        model_dir = save_model(model, out / "model", provenance={"recipe": cfg.name, "steps": step})
    barrier()
    result = TrainResult(out, model_dir, step, total_steps, step / steps_per_epoch, time.monotonic() - t_start,
                         stopped, last_val, {k: v for k, v in best.items() if math.isfinite(v)}, dist.is_main)
    if dist.is_main:
        write_json_atomic(out / "summary.json", result.to_dict())
    cleanup()  # destroys the process group only when init_distributed created it
    return result


def _micro_step(forward: nn.Module, batch: Dict[str, Any], cfg: TrainConfig, dist: DistInfo, device: torch.device,
                precision: str, scaler: torch.amp.GradScaler, local: int,
                label_keys: Optional[torch.Tensor] = None) -> Dict[str, float]:
    """Forward + backward of one micro-batch; returns the (process-averaged) loss terms.

    ``label_keys`` ([local] int64, this process's studies) feed the optional label term; they are
    gathered here so every rank sees the global batch's keys in rank order.
    """
    tokens = _pad_cat(batch["text1"], batch["text2"])
    try:
        with autocast_context(device, precision):
            i1, i2, t1, t2, scale = forward(batch["image1"].to(device, non_blocking=True),
                                            batch["image2"].to(device, non_blocking=True),
                                            tokens["input_ids"].to(device), tokens["attention_mask"].to(device))
        keys_all = all_gather_tensor(label_keys.to(device)) if label_keys is not None else None  # [world * local]
        terms = cxr_clip_loss(i1.float(), i2.float(), t1.float(), t2.float(), scale,
                              icl_weight=cfg.loss.icl_weight, tcl_weight=cfg.loss.tcl_weight,
                              label_weight=cfg.loss.label_weight, label_keys=keys_all,
                              label_within=cfg.loss.label_within,
                              gather=all_gather_with_grad if dist.is_distributed else None, offset=dist.rank * local)
        # Every rank must agree before raising: one rank leaving alone would hang the others in backward.
        bad = all_reduce_mean((~torch.isfinite(terms["loss"].detach())).float()) if dist.is_distributed \
            else (~torch.isfinite(terms["loss"].detach())).float()
        if float(bad) > 0:
            raise TrainingError(
                f"the loss became {float(terms['loss'])}; lower --set optim.lr, or use precision=fp32 / a grad_clip"
            )
        scaler.scale(terms["loss"] / cfg.optim.accum_steps).backward()
    except RuntimeError as exc:
        if _is_oom(exc):
            raise TrainingError(
                f"out of memory with {local} studies per process and micro-batch; lower --set optim.batch_size, "
                "raise --set optim.accum_steps, or --set grad_checkpointing=true"
            ) from None
        raise
    return {k: float(all_reduce_mean(v.detach())) for k, v in terms.items()}
