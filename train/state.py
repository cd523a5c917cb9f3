"""Resumable training checkpoints, written atomically and read without unpickling code.

Layout of a run directory::

    OUT/config.json                  resolved recipe + model config + inputs (written at start)
    OUT/metrics.jsonl                one JSON object per logged step / validation
    OUT/checkpoints/step-00001200/   model/ (our model format: load_model reads it) + state.pt
    OUT/checkpoints/latest.json      {"name": "step-00001200", "step": 1200}  (replaced atomically)
    OUT/best-loss/, OUT/best-recall/ best models by validation loss and by validation Recall@10
    OUT/model/                       the final model

``state.pt`` holds the optimiser, scheduler and gradient-scaler state, the position in the data
(epoch, step) and the RNG states, as tensors and plain Python values only: it is read with
``torch.load(weights_only=True)``, so a tampered file cannot run code.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import numpy as np
import torch

from cxr_search.checkpoints import save_model
from cxr_search.errors import CheckpointError
from cxr_search.fileio import write_json_atomic
from cxr_search.model import CXRClip
from cxr_search.safe_load import torch_load_weights_only

logger = logging.getLogger(__name__)

__all__ = ["capture_rng", "latest_checkpoint", "load_state", "restore_rng", "save_checkpoint"]

STATE_FILE = "state.pt"
LATEST_FILE = "latest.json"


def capture_rng() -> Dict[str, Any]:
    """RNG states of Python, numpy and torch (CPU and CUDA) as tensors and plain values."""
    np_state = np.random.get_state()
    state: Dict[str, Any] = {
        "python": list(random.getstate()[1]),
        "python_gauss": random.getstate()[2],
        "numpy": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
        "numpy_pos": int(np_state[2]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng`."""
    random.setstate((3, tuple(int(x) for x in state["python"]), state["python_gauss"]))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), int(state["numpy_pos"]), 0, 0.0))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    run_dir: Union[str, Path], model: CXRClip, state: Dict[str, Any], *, step: int, keep_last: int = 2
) -> Path:
    """Write ``checkpoints/step-<step>/`` (model + ``state.pt``) atomically, then point ``latest.json`` at it.

    Older step checkpoints beyond ``keep_last`` are deleted after the new one is in place, so a kill
    at any moment leaves at least one complete checkpoint that ``latest.json`` names.

    Returns:
        The checkpoint directory.
    """
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:08d}"
    final = root / name
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
    try:
        save_model(model, tmp / "model")
        torch.save(state, tmp / STATE_FILE)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_json_atomic(root / LATEST_FILE, {"name": name, "step": int(step)})
    steps = sorted(p for p in root.glob("step-*") if p.is_dir() and p.name != name)
    for old in steps[: max(0, len(steps) - (keep_last - 1))]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Union[str, Path]) -> Optional[Path]:
    """The checkpoint ``latest.json`` names, or None when the run has none.

    Raises:
        CheckpointError: ``latest.json`` names a directory that is missing or incomplete.
    """
    root = Path(run_dir) / "checkpoints"
    pointer = root / LATEST_FILE
    if not pointer.is_file():
        return None
    try:
        name = json.loads(pointer.read_text(encoding="utf-8"))["name"]
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{pointer}: unreadable ({exc}); delete it to resume from an older step") from exc
    path = root / str(name)
    if not (path / STATE_FILE).is_file() or not (path / "model").is_dir():
        raise CheckpointError(f"{path}: checkpoint named by {pointer} is incomplete")
    return path


def load_state(checkpoint: Union[str, Path], map_location: Union[str, torch.device] = "cpu") -> Dict[str, Any]:
    """Read ``state.pt`` with the safe unpickler.

    Raises:
        CheckpointError: The file is missing, corrupt, or holds anything but tensors and plain values.
    """
    path = Path(checkpoint) / STATE_FILE
    return torch_load_weights_only(
        path, what="training state", map_location=map_location,
        hint=f"the checkpoint is damaged; to resume from an older one, set \"name\" in "
        f"{Path(checkpoint).parent / LATEST_FILE} to its step-* folder",
    )


def list_step_checkpoints(run_dir: Union[str, Path]) -> List[Path]:
    """Step checkpoint directories of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    return sorted(p for p in root.glob("step-*") if p.is_dir())
