"""Reading the released CXR-CLIP checkpoint files safely and mapping them onto :class:`CXRClip`.

The released ``*.tar`` files are ``torch.save`` pickles of ``{"model", "config", "optimizer",
"scheduler", "epoch", "train_loss"}`` whose ``config`` holds omegaconf containers. We never execute
pickled code: the file is scanned for the globals it references, anything outside an explicit
allow-list is refused by name, and the load itself runs torch's ``weights_only`` unpickler with
stand-in classes for the omegaconf containers (so omegaconf need not be installed and its
``__setstate__`` never runs). The stand-ins are then flattened to plain dicts and lists.
"""

from __future__ import annotations

import collections
import logging
import re
import typing
from pathlib import Path
from typing import Any, Dict, List, Mapping, Tuple

import torch

from cxr_search.errors import CheckpointError, UnsafeCheckpointError
from cxr_search.safe_load import torch_load_weights_only

logger = logging.getLogger(__name__)

RELEASED_LICENCE = "CC BY-NC 4.0 (CXR-CLIP released weights, Kakao Brain): non-commercial use only"


class _OmegaStandIn:
    """Absorbs the pickled state of an omegaconf object without running omegaconf code."""

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (dict state, slot state)
            state = {**(state[0] or {}), **(state[1] or {})}
        if isinstance(state, dict):
            self.__dict__.update(state)


class _ListConfig(_OmegaStandIn):
    pass


class _DictConfig(_OmegaStandIn):
    pass


class _Node(_OmegaStandIn):
    pass


class _Metadata(_OmegaStandIn):
    pass


_OMEGACONF_STANDINS: List[Tuple[Any, str]] = [
    (_ListConfig, "omegaconf.listconfig.ListConfig"),
    (_DictConfig, "omegaconf.dictconfig.DictConfig"),
    (_Metadata, "omegaconf.base.Metadata"),
    (_Metadata, "omegaconf.base.ContainerMetadata"),
    *[(_Node, f"omegaconf.nodes.{n}") for n in ("AnyNode", "StringNode", "IntegerNode", "FloatNode", "BooleanNode", "BytesNode")],
]
# Harmless builtins that omegaconf metadata references (object_type, ref_type, resolver cache).
_PLAIN_GLOBALS: List[Tuple[Any, str]] = [
    (dict, "builtins.dict"),
    (list, "builtins.list"),
    (tuple, "builtins.tuple"),
    (int, "builtins.int"),
    (float, "builtins.float"),
    (str, "builtins.str"),
    (bool, "builtins.bool"),
    (collections.defaultdict, "collections.defaultdict"),
    (typing.Any, "typing.Any"),
]
ALLOWED_EXTRA_GLOBALS = {name for _, name in _OMEGACONF_STANDINS + _PLAIN_GLOBALS}


def _to_plain(obj: Any) -> Any:
    """Replace omegaconf stand-ins by plain dicts, lists and values, recursively."""
    if isinstance(obj, _ListConfig):
        content = obj.__dict__.get("_content")
        return [_to_plain(x) for x in content] if isinstance(content, list) else content
    if isinstance(obj, _DictConfig):
        content = obj.__dict__.get("_content")
        return {k: _to_plain(v) for k, v in content.items()} if isinstance(content, dict) else content
    if isinstance(obj, _Node):
        return _to_plain(obj.__dict__.get("_val"))
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_plain(x) for x in obj)
    return obj


def read_released_file(path: Path) -> Dict[str, Any]:
    """Unpickle a released checkpoint without executing code from it.

    Returns:
        The top-level dict with ``config`` converted to plain Python containers.

    Raises:
        UnsafeCheckpointError: The pickle references a global outside the allow-list (named).
        CheckpointError: The file is not a torch checkpoint or lacks ``model``.
    """
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception as exc:  # noqa: BLE001 - legacy (non-zip) files cannot be pre-scanned; the load below still refuses
        logger.debug("cannot pre-scan %s for globals (%s); relying on the weights-only unpickler", path, exc)
        unsafe = []
    refused = sorted(set(unsafe) - ALLOWED_EXTRA_GLOBALS)
    if refused:
        raise UnsafeCheckpointError(
            f"{path}: refused: the pickle references global(s) outside the allow-list: {', '.join(refused)}. "
            "Nothing from the file was executed. Released CXR-CLIP files reference only torch tensors and "
            "omegaconf containers; this file is something else or has been tampered with."
        )
    raw = torch_load_weights_only(
        path, what="torch checkpoint", safe_globals=_OMEGACONF_STANDINS + _PLAIN_GLOBALS,
        hint="give a released CXR-CLIP file (e.g. r50_mcc.tar) or a model folder written by `cxr-search model convert`",
    )
    if not isinstance(raw, dict) or "model" not in raw:
        keys = sorted(raw)[:10] if isinstance(raw, dict) else type(raw).__name__
        raise CheckpointError(f"{path}: expected a dict with a 'model' state dict (a released CXR-CLIP file), got {keys}")
    out = dict(raw)
    out["config"] = _to_plain(raw.get("config") or {})
    return out


def released_preset(config: Mapping[str, Any], state: Mapping[str, Any], path: Path) -> str:
    """Choose the preset from the embedded training config (keys as a fallback).

    Raises:
        CheckpointError: Neither the config nor the keys identify a known backbone.
    """
    enc = (config.get("model") or {}).get("image_encoder") or {}
    if enc.get("name") == "resnet":
        return "cxr-clip-r50"
    if enc.get("model_type") == "swin" or enc.get("name") == "swin":
        return "cxr-clip-swint"
    if any(k.startswith("image_encoder.resnet.") for k in state):
        logger.warning("%s: no image_encoder config; ResNet-50 inferred from the state-dict keys", path)
        return "cxr-clip-r50"
    if any(k.startswith("image_encoder.image_encoder.") for k in state):
        logger.warning("%s: no image_encoder config; Swin-Tiny inferred from the state-dict keys", path)
        return "cxr-clip-swint"
    raise CheckpointError(
        f"{path}: cannot tell the image backbone: config.model.image_encoder is {dict(enc)} and no "
        "image_encoder.resnet.* or image_encoder.image_encoder.* keys exist"
    )


# Released prefix -> our module path.
_PREFIXES = [
    ("image_encoder.resnet.", "image_tower.trunk."),
    ("image_encoder.image_encoder.", "image_tower.trunk."),
    ("text_encoder.text_encoder.", "text_tower.transformer."),
    ("image_projection.projection.", "image_projection."),
    ("text_projection.projection.", "text_projection."),
]
# transformers >= 5 renamed Swin block submodules (``docs/compatibility.md`` section 2). Applied only when
# the old name does not exist in the installed model and the new one does.
_SWIN_RENAMES = [
    (re.compile(r"(blocks\.\d+\.attention\.)self\.query\."), r"\1q_proj."),
    (re.compile(r"(blocks\.\d+\.attention\.)self\.key\."), r"\1k_proj."),
    (re.compile(r"(blocks\.\d+\.attention\.)self\.value\."), r"\1v_proj."),
    (re.compile(r"(blocks\.\d+\.attention\.)output\.dense\."), r"\1o_proj."),
    (
        re.compile(r"(blocks\.\d+\.attention\.)self\.(relative_position_(?:bias_table|index))$"),
        r"\1relative_position_bias.\2",
    ),
    (re.compile(r"(blocks\.\d+\.)intermediate\.dense\."), r"\1mlp.fc1."),
    (re.compile(r"(blocks\.\d+\.)output\.dense\."), r"\1mlp.fc2."),
]
# Buffers that newer transformers recompute instead of storing: dropped when the model has no
# persistent slot for them.
_DROPPABLE = (re.compile(r"embeddings\.position_ids$"), re.compile(r"relative_position_index$"))


def _rename_swin(key: str) -> str:
    for pattern, repl in _SWIN_RENAMES:
        key = pattern.sub(repl, key)
    return key


def remap_released_state_dict(state: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Map released key names onto a model's state-dict names, checking completeness and shapes.

    Args:
        state: The released ``model`` state dict.
        target: The destination model's ``state_dict()``.

    Returns:
        A state dict that loads with ``strict=True``.

    Raises:
        CheckpointError: Missing, unexpected or wrongly shaped tensors (the message names them).
    """
    mapped: Dict[str, torch.Tensor] = {}
    unexpected: List[str] = []
    dropped: List[str] = []
    for key, tensor in state.items():
        new = None
        if key == "logit_scale":
            new = key
        for old_prefix, new_prefix in _PREFIXES:
            if key.startswith(old_prefix):
                new = new_prefix + key[len(old_prefix) :]
                if old_prefix == "image_encoder.image_encoder." and new not in target:
                    new = _rename_swin(new)
                break
        if new is None:
            unexpected.append(key)
        elif new in target:
            mapped[new] = tensor
        elif any(p.search(new) for p in _DROPPABLE):
            dropped.append(key)
        else:
            unexpected.append(key)
    missing = sorted(set(target) - set(mapped))
    shapes = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(target[k].shape)}"
        for k, v in mapped.items()
        if tuple(v.shape) != tuple(target[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing tensor(s): {', '.join(missing[:20])}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensor(s): {', '.join(sorted(unexpected)[:20])}")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatch(es): {'; '.join(shapes[:20])}")
        raise CheckpointError("state dict does not match the architecture: " + " | ".join(parts))
    if dropped:
        logger.debug("dropped %d recomputed buffers: %s", len(dropped), dropped[:5])
    return mapped
