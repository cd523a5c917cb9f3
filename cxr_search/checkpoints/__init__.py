"""Checkpoints: released CXR-CLIP files and this project's own safetensors format.

This package defines :func:`load_model` (a released file, one of our folders, or a preset name),
:func:`save_model`, :func:`model_fingerprint` (the weights + preprocessing hash an index is tied to) and
:func:`file_sha256`. Its module ``released`` reads the released ``*.tar`` pickles safely and remaps their
keys onto :class:`~cxr_search.model.CXRClip` (rules: ``docs/compatibility.md`` sections 1-2).

Our format is a directory::

    config.json         {"format": "cxr-search/1", "model": ModelConfig, "tokenizer": {...},
                         "provenance": {source, source_sha256, licence, code_version, ...}}
    model.safetensors   the state dict (no pickle anywhere)
    vocab.txt, tokenizer_config.json   the tokenizer, when the model has one
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

import torch

from cxr_search.checkpoints.released import (
    RELEASED_LICENCE,
    read_released_file,
    released_preset,
    remap_released_state_dict,
)
from cxr_search.config import ModelConfig, get_model_config, list_models
from cxr_search.errors import CheckpointError, TokenizerError
from cxr_search.inference import resolve_device
from cxr_search.model import CXRClip, create_model
from cxr_search.tokenizer import TextTokenizer

logger = logging.getLogger(__name__)

FORMAT = "cxr-search/1"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"

__all__ = ["load_model", "save_model", "file_sha256", "model_fingerprint", "FORMAT"]


def file_sha256(path: Union[str, Path], chunk: int = 1 << 22) -> str:
    """SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def model_fingerprint(model: CXRClip) -> str:
    """SHA-256 over the weights (names, dtypes, shapes, values) and the preprocessing.

    Identical for a released file and its converted copy, so an index built with one accepts the
    other; any change of weights or preprocessing changes it.
    """
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(tensor.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    h.update(json.dumps(model.config.to_dict()["preprocess"], sort_keys=True).encode())
    return h.hexdigest()


def _code_version() -> str:
    from cxr_search import __version__

    return __version__


# ------------------------------------------------------------------------------------ loading
def load_model(
    source: Union[str, Path],
    *,
    tokenizer: Union[None, str, Path, TextTokenizer] = None,
    device: Optional[Union[str, torch.device]] = None,
    require_tokenizer: bool = True,
) -> CXRClip:
    """Load a model from a released CXR-CLIP file, our directory format, or a preset name.

    Args:
        source: A released ``*.tar`` file, a directory written by :func:`save_model`, or a preset
            name (a randomly initialised model, e.g. ``"tiny"``).
        tokenizer: Tokenizer directory (or object). Required for released files, whose vocabulary
            is not inside the checkpoint; overrides the bundled one for our format.
        device: Where to put the model (``None``: CPU; ``"auto"``: GPU when present).
        require_tokenizer: When False, a released file loads without a tokenizer (images only).

    Returns:
        The model in eval mode with ``tokenizer`` and ``provenance`` set.

    Raises:
        CheckpointError: Unreadable, unsafe or mismatching checkpoint.
        TokenizerError: A released file without a tokenizer.
    """
    path = Path(source)
    if path.is_dir():
        model = _load_native(path, tokenizer)
    elif path.is_file():
        if path.suffix == ".safetensors":
            raise CheckpointError(f"{path}: point --model at the directory that holds {CONFIG_FILE} and {WEIGHTS_FILE}")
        model = _load_released(path, tokenizer, require_tokenizer)
    elif str(source) in list_models():
        model = create_model(str(source), tokenizer=tokenizer)
        model.provenance = {"source": f"preset:{source}", "licence": "n/a (random initialisation)"}
    else:
        raise CheckpointError(
            f"{source}: no such file or directory, and not a preset ({', '.join(list_models())})"
        )
    # Always from the weights just loaded: a stored value may describe the weights a checkpoint
    # was resumed from, and the index trusts the fingerprint to mean "these weights".
    model.provenance["fingerprint"] = model_fingerprint(model)
    if device is not None:
        model.to(resolve_device(device))
    return model.eval()


def _load_released(path: Path, tokenizer: Any, require_tokenizer: bool) -> CXRClip:
    raw = read_released_file(path)
    state = raw["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: 'model' is not a state dict of tensors")
    state = {k[len("module.") :] if k.startswith("module.") else k: v for k, v in state.items()}
    preset = released_preset(raw["config"], state, path)
    if tokenizer is None and require_tokenizer:
        raise TokenizerError(
            f"{path}: released CXR-CLIP checkpoints do not contain the tokenizer; pass --tokenizer DIR "
            "(tokenizer=DIR) pointing at a local Bio_ClinicalBERT directory (vocab.txt + config.json)"
        )
    max_len = get_model_config(preset).tokenizer.max_length
    tok = tokenizer if isinstance(tokenizer, TextTokenizer) or tokenizer is None else TextTokenizer.from_dir(tokenizer, max_length=max_len)
    model = CXRClip(get_model_config(preset), tok)
    try:
        mapped = remap_released_state_dict(state, model.state_dict())
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    model.load_state_dict(mapped, strict=True)
    model.provenance = {
        "source": path.name,
        "source_sha256": file_sha256(path),
        "licence": RELEASED_LICENCE,
        "released_epoch": raw.get("epoch"),
        "code_version": _code_version(),
    }
    logger.info("loaded released %s checkpoint %s", preset, path)
    return model


def _load_native(root: Path, tokenizer: Any) -> CXRClip:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    cfg_path, weights = root / CONFIG_FILE, root / WEIGHTS_FILE
    if not cfg_path.is_file() or not weights.is_file():
        raise CheckpointError(f"{root}: not a cxr-search model directory (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
    try:
        meta = json.loads(cfg_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{cfg_path}: invalid JSON: {exc}") from exc
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{cfg_path}: unknown format {meta.get('format')!r}; expected {FORMAT!r}")
    config = ModelConfig.from_dict(meta["model"])
    tok = _native_tokenizer(root, tokenizer, config, meta.get("tokenizer") or {})
    model = CXRClip(config, tok)
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{weights}: cannot read safetensors file: {exc}") from exc
    target = model.state_dict()
    missing = sorted(set(target) - set(state))
    unexpected = sorted(set(state) - set(target))
    if missing or unexpected:
        raise CheckpointError(f"{weights}: missing {missing[:20]}, unexpected {unexpected[:20]}")
    model.load_state_dict(state, strict=True)
    saved = dict(meta.get("provenance") or {})
    # "source" is where these weights are loaded from now (an index records it to reload the model); what
    # the folder was made from (a released file, a recipe) stays as "origin".
    if "source" in saved:
        saved.setdefault("origin", saved["source"])
    model.provenance = {**saved, "source": str(root.resolve())}
    return model


def _native_tokenizer(root: Path, tokenizer: Any, config: ModelConfig,
                      recorded: Mapping[str, Any]) -> Optional[TextTokenizer]:
    """The tokenizer of a model folder: the one given, else the folder's own, checked against config.json.

    A folder whose config.json records a tokenizer must still hold it, unchanged: a missing or edited
    ``vocab.txt`` would silently tokenise differently from training and give other embeddings.

    Raises:
        CheckpointError: The recorded tokenizer files are missing or differ from what was saved.
    """

    def differs(tok: TextTokenizer) -> bool:
        return bool(recorded.get("sha256")) and tok.sha256() != recorded["sha256"]

    if tokenizer is not None:
        tok = tokenizer if isinstance(tokenizer, TextTokenizer) else TextTokenizer.from_dir(
            tokenizer, max_length=config.tokenizer.max_length)
        if differs(tok):
            logger.warning("%s: the tokenizer given differs from the one saved with the model; embeddings of texts "
                           "will differ from the model's own", root)
        return tok
    if (root / "vocab.txt").is_file():
        # The saved tokenizer's own length: a model built with a tokenizer of another max_length than its
        # config's must truncate as it did when it was saved.
        tok = TextTokenizer.from_dir(root, max_length=int(recorded.get("max_length") or config.tokenizer.max_length))
        if differs(tok):
            raise CheckpointError(
                f"{root}: vocab.txt or tokenizer_config.json differ from the ones saved with the model (sha256 "
                f"{tok.sha256()[:12]}..., recorded {str(recorded['sha256'])[:12]}...); restore them from the "
                "original model folder"
            )
        return tok
    if recorded:
        raise CheckpointError(
            f"{root}: {CONFIG_FILE} records a tokenizer but vocab.txt is missing; restore the folder's vocab.txt "
            "and tokenizer_config.json from the original model folder (or pass --tokenizer DIR)"
        )
    if config.tokenizer.kind == "basic":
        return TextTokenizer.basic(max_length=config.tokenizer.max_length)
    return None


# ------------------------------------------------------------------------------------- saving
def save_model(model: CXRClip, out_dir: Union[str, Path], *, provenance: Optional[Dict[str, Any]] = None) -> Path:
    """Write ``model`` in our directory format, atomically (temp dir + rename).

    Args:
        model: The model (its tokenizer is saved beside the weights when present).
        out_dir: Destination directory; replaced if it exists.
        provenance: Extra provenance fields merged over ``model.provenance``.

    Returns:
        The output directory.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT})
        prov = {**model.provenance, **(provenance or {})}
        prov.setdefault("code_version", _code_version())
        prov["saved"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        prov["weights_sha256"] = file_sha256(tmp / WEIGHTS_FILE)
        prov["fingerprint"] = model_fingerprint(model)  # of the weights written, never a carried-over value
        meta: Dict[str, Any] = {"format": FORMAT, "model": model.config.to_dict(), "provenance": prov}
        if model.tokenizer is not None:
            model.tokenizer.save(tmp)
            meta["tokenizer"] = {
                "files": ["vocab.txt", "tokenizer_config.json"],
                "sha256": model.tokenizer.sha256(),
                "lowercase": model.tokenizer.lowercase,
                "max_length": model.tokenizer.max_length,
            }
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        if out.exists():
            backup = out.with_name(f".{out.name}.old")
            shutil.rmtree(backup, ignore_errors=True)
            os.replace(out, backup)
            os.replace(tmp, out)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
