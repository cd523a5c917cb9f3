"""Training configuration: frozen dataclasses read from the JSON recipes in ``train/recipes/``.

A recipe names a model preset (plus overrides), how to initialise it, which datasets it expects,
and the optimiser, schedule, loss and augmentation settings. ``get_recipe(name, **overrides)``
resolves one, exactly like :func:`cxr_search.config.get_model_config` for models: overrides change
the config (``--set optim.lr=1e-4``), unknown keys are refused by name.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

from cxr_search.config import build_dataclass, list_json_registry, load_json_registry, merge_overrides
from cxr_search.errors import ConfigError

__all__ = [
    "AugmentConfig",
    "DataConfig",
    "InitConfig",
    "LossConfig",
    "OptimConfig",
    "TrainConfig",
    "get_recipe",
    "list_recipes",
]

INIT_KINDS = ("scratch", "pretrained", "released", "checkpoint")
PRECISIONS = ("fp32", "fp16", "bf16", "auto")


@dataclass(frozen=True)
class InitConfig:
    """Where the weights start.

    Attributes:
        kind: ``scratch`` (random towers; a WordPiece vocabulary is trained on the training reports
            unless the preset has a built-in tokenizer or ``tokenizer`` is given), ``pretrained``
            (local pretrained towers: ``image_weights`` a timm checkpoint file and/or ``text_dir`` a
            Hugging Face BERT directory, whose ``vocab.txt`` is the tokenizer), ``released`` (a
            released CXR-CLIP ``.tar``; needs ``tokenizer``) or ``checkpoint`` (a directory written by
            this project).
        path: The released file or our checkpoint directory.
        image_weights: timm checkpoint file of the image tower (``pretrained``).
        text_dir: Hugging Face BERT directory of the text tower (``pretrained``).
        tokenizer: Tokenizer directory (``vocab.txt``) overriding the default.
        vocab_size: Size of the WordPiece vocabulary trained for ``scratch`` (default: the text
            tower's ``vocab_size``).
    """

    kind: str = "scratch"
    path: Optional[str] = None
    image_weights: Optional[str] = None
    text_dir: Optional[str] = None
    tokenizer: Optional[str] = None
    vocab_size: Optional[int] = None

    def __post_init__(self) -> None:
        if self.kind not in INIT_KINDS:
            raise ConfigError(f"init.kind must be one of {', '.join(INIT_KINDS)}, got {self.kind!r}")


@dataclass(frozen=True)
class DataConfig:
    """What the training data must be and how it is loaded.

    Attributes:
        datasets: Dataset names the recipe trains on (the manifests' ``dataset`` column); the
            trainer refuses manifests that miss one or bring another. Empty: any dataset.
        train_split: Manifest split used for training.
        val_split: Manifest split used for validation ("" = no validation).
        max_val_studies: Validation studies used (the first ones in manifest order; 0 = all).
        num_workers: DataLoader worker processes.
        paraphrases: Optional JSON file ``{section text: [paraphrases]}`` (back-translations).
        label_groups: > 1: an epoch's order puts studies that share a label set (manifest
            ``labels``) next to each other in groups of up to this many, so the label term finds
            positives in each batch (:func:`train.sampling.grouped_permutation`). 0: a plain
            shuffle, as the reference.
    """

    datasets: Tuple[str, ...] = ("mimic-cxr",)
    train_split: str = "train"
    val_split: str = "validate"
    max_val_studies: int = 2000
    num_workers: int = 4
    paraphrases: Optional[str] = None
    label_groups: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.label_groups, bool) or not isinstance(self.label_groups, int) or self.label_groups < 0:
            raise ConfigError(f"data.label_groups must be an integer >= 0, got {self.label_groups!r}")


@dataclass(frozen=True)
class OptimConfig:
    """AdamW and the per-step warm-up + cosine schedule.

    Attributes:
        lr: Peak learning rate.
        weight_decay: AdamW weight decay.
        no_decay_norm_bias: Put biases, norm weights and ``logit_scale`` in a group without decay.
        betas: AdamW betas.
        eps: AdamW epsilon.
        epochs: Training epochs.
        warmup_epochs: Linear warm-up length in epochs (may be fractional).
        min_lr_ratio: Cosine floor as a fraction of ``lr`` (the reference decays to 0).
        batch_size: GLOBAL batch size (studies per optimiser step, over all processes).
        accum_steps: Micro-batches per optimiser step (each process sees
            ``batch_size / (world_size * accum_steps)`` studies per forward pass).
        grad_clip: Clip the gradient norm to this value (None = no clipping).
        max_logit_scale: Upper bound of ``exp(logit_scale)`` (None = unclamped, as the reference; CLIP uses 100).
    """

    lr: float = 5e-5
    weight_decay: float = 1e-4
    no_decay_norm_bias: bool = False
    betas: Tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    epochs: int = 15
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.0
    batch_size: int = 128
    accum_steps: int = 1
    grad_clip: Optional[float] = None
    max_logit_scale: Optional[float] = None

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.epochs < 1 or self.batch_size < 1 or self.accum_steps < 1:
            raise ConfigError("optim.lr must be > 0 and optim.epochs, batch_size, accum_steps >= 1")
        if self.warmup_epochs < 0 or not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError("optim.warmup_epochs must be >= 0 and optim.min_lr_ratio in [0, 1]")


@dataclass(frozen=True)
class LossConfig:
    """Weights of the study-level terms (the reference CXR-CLIP loss weights ICL 1.0 and TCL 0.5).

    ``label_weight`` > 0 adds cxr-search's label term (:func:`train.losses.cxr_clip_loss`): studies
    of a batch with the same set of positive labels (manifest ``labels``) are positives of each
    other. 0, the default of the released recipes, is the reference CXR-CLIP loss. ``label_names``
    limits the labels that make up a study's set (for the term and ``data.label_groups``), e.g. to
    the findings retrieval is judged on; empty: every label. ``label_uncertain`` says how an
    uncertain label (-1.0) counts in the set: "negative" (CheXpert's U-Zeros) or "positive" (U-Ones,
    for archives where a hedged mention means the finding is there). ``label_within`` extends the
    term to the image-image and text-text pairs (weighted as ICL and TCL).
    """

    icl_weight: float = 1.0
    tcl_weight: float = 0.5
    label_weight: float = 0.0
    label_names: Tuple[str, ...] = ()
    label_uncertain: str = "negative"
    label_within: bool = False

    def __post_init__(self) -> None:
        for name in ("icl_weight", "tcl_weight", "label_weight"):
            value = getattr(self, name)
            if not math.isfinite(float(value)) or float(value) < 0:
                raise ConfigError(f"loss.{name} must be a finite number >= 0, got {value}")
        if not all(isinstance(n, str) and n.strip() for n in self.label_names):
            raise ConfigError(f"loss.label_names must be label names (non-empty strings), got {list(self.label_names)!r}")
        if not isinstance(self.label_within, bool):
            raise ConfigError(f"loss.label_within must be true or false, got {self.label_within!r}")
        if self.label_uncertain not in ("negative", "positive"):
            raise ConfigError(f"loss.label_uncertain must be 'negative' or 'positive', got {self.label_uncertain!r}")


@dataclass(frozen=True)
class AugmentConfig:
    """Training augmentation (see :func:`train.augment.train_transform`, which validates the values).

    The defaults are the reference CXR-CLIP recipe's, and this is their only home: the transform is
    built from an instance of this class.

    Attributes:
        scale: Range of the random crop's area relative to the image area.
        clahe_p: Probability of applying CLAHE.
        clahe_clip: Range of the CLAHE clip limit (drawn uniformly).
        clahe_tiles: CLAHE tiles per axis.
        jitter: ColorJitter (brightness, contrast, saturation, hue).
    """

    scale: Tuple[float, float] = (0.8, 1.1)
    clahe_p: float = 0.5
    clahe_clip: Tuple[float, float] = (1.0, 4.0)
    clahe_tiles: int = 8
    jitter: Tuple[float, float, float, float] = (0.1, 0.2, 0.2, 0.1)


@dataclass(frozen=True)
class TrainConfig:
    """A resolved training recipe.

    Attributes:
        name: Recipe name.
        description: One line for ``cxr-search train --help`` and the run's config file.
        model: Model preset name (``cxr_search/model_configs``).
        model_overrides: Overrides of the preset (same keys as the model config).
        init: Initialisation.
        data: Data expectations and loading.
        optim: Optimiser and schedule.
        loss: Loss weights.
        augment: Augmentation.
        precision: ``fp32``, ``fp16`` (AMP with a gradient scaler; CUDA), ``bf16`` or ``auto``
            (fp16 on CUDA, fp32 on CPU).
        seed: Seed of initialisation, data order and augmentation.
        grad_checkpointing: Trade compute for memory in both towers.
        channels_last: Run the image tower in the channels-last memory format (NHWC). The same
            computation in float64; in float32 CPU BatchNorm backward kernels round differently (stem
            gradients measured up to 7e-3 relative apart, depending on the thread count). On CPU (oneDNN) convolutions run about 1.3x (64 px) to
            2.3x (128 px) faster for the tiny towers, and on CUDA with AMP it is the format tensor
            cores prefer.
        checkpoint_every: Save a resumable checkpoint every N optimiser steps (0 = epoch ends only).
        eval_every: Validate every N optimiser steps (0 = by epochs only).
        eval_every_epochs: Validate at the end of every N-th epoch (0 = not at epoch ends). The
            last step is always validated.
        log_every: Write a metrics line every N optimiser steps.
        keep_last: Step checkpoints kept on disk (older ones are deleted).
        max_minutes: Stop cleanly (with a resumable checkpoint) after this wall time; the schedule is
            unchanged, so a later ``--resume`` continues it.
        device: ``auto`` (the GPU of this process's LOCAL_RANK when there is one), ``cpu``, ``cuda``.
    """

    name: str = "custom"
    description: str = ""
    model: str = "tiny"
    model_overrides: Dict[str, Any] = field(default_factory=dict)
    init: InitConfig = field(default_factory=InitConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    precision: str = "auto"
    seed: int = 1234
    grad_checkpointing: bool = False
    channels_last: bool = False
    checkpoint_every: int = 1000
    eval_every: int = 0
    eval_every_epochs: int = 1
    log_every: int = 10
    keep_last: int = 2
    max_minutes: Optional[float] = None
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if min(self.checkpoint_every, self.eval_every, self.eval_every_epochs) < 0 or min(self.log_every, self.keep_last) < 1:
            raise ConfigError(
                "checkpoint_every, eval_every and eval_every_epochs must be >= 0, log_every and keep_last >= 1"
            )

    def to_dict(self) -> Dict[str, Any]:
        """Plain JSON-able dict (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TrainConfig":
        """Build from a dict (a recipe file or a saved run config).

        Raises:
            ConfigError: An unknown key or an invalid value.
        """
        return build_dataclass(cls, data, "", _NESTED)


_NESTED: Dict[Tuple[type, str], type] = {
    (TrainConfig, "init"): InitConfig,
    (TrainConfig, "data"): DataConfig,
    (TrainConfig, "optim"): OptimConfig,
    (TrainConfig, "loss"): LossConfig,
    (TrainConfig, "augment"): AugmentConfig,
}


def list_recipes() -> List[str]:
    """Names of the registered recipes."""
    return list_json_registry("train", "recipes")


def get_recipe(name_or_config: Union[str, TrainConfig, Mapping[str, Any]], **overrides: Any) -> TrainConfig:
    """Resolve a recipe name (or config / dict) and apply nested overrides.

    Args:
        name_or_config: A recipe name (see :func:`list_recipes`), a config or a dict.
        **overrides: Top-level fields; a mapping value merges into its section
            (``optim={"lr": 1e-4}``); ``model_overrides`` is free-form (checked when the model is built).

    Raises:
        ConfigError: Unknown recipe or key, invalid value.
    """
    if isinstance(name_or_config, str):
        base = TrainConfig.from_dict(load_json_registry("train", "recipes", name_or_config, "recipe")).to_dict()
    elif isinstance(name_or_config, TrainConfig):
        base = name_or_config.to_dict()
    else:
        base = TrainConfig.from_dict(name_or_config).to_dict()
    return TrainConfig.from_dict(merge_overrides(base, overrides, free=("model_overrides",)))
