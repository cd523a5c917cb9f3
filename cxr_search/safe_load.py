"""``torch.load`` with the weights-only unpickler, whose every failure is one short, actionable error.

Three places read torch pickles: released CXR-CLIP files, pretrained image-tower files and a training
run's ``state.pt``. On a file that is not what it should be, torch fails in many ways (``IndexError``
on a text file, ``UnpicklingError`` with a page of text that suggests ``weights_only=False``, which
would execute code from the file). This module turns all of them into one line naming the file.
A leaf module (imports no other part of cxr_search but the errors), so the towers can use it.
"""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path
from typing import Any, Sequence, Union

import torch

from cxr_search.errors import CheckpointError, UnsafeCheckpointError

__all__ = ["torch_load_weights_only", "unpickler_reason"]


#: Lines of torch's weights-only error that are its boilerplate, not the reason.
_BOILERPLATE = ("Weights only load failed", "Please file an issue", "Check the documentation")


def unpickler_reason(exc: BaseException) -> str:
    """The one line of torch's weights-only error that says what was refused.

    torch's message is a page long and advises ``weights_only=False``, which must never reach a user.
    """
    for line in str(exc).splitlines():
        line = line.strip()
        if "WeightsUnpickler error:" in line:  # the reason follows it, on this line or the next
            line = line.split("WeightsUnpickler error:", 1)[1].strip()
        if line and not line.startswith(_BOILERPLATE):
            return line
    return type(exc).__name__


def torch_load_weights_only(path: Union[str, Path], *, what: str, hint: str, safe_globals: Sequence[Any] = (),
                            map_location: Union[str, torch.device] = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` with failures as one-line errors.

    Args:
        path: The file.
        what: What the file should be, for the message ("torch checkpoint", "training state").
        hint: What to do about it, appended to every message.
        safe_globals: Extra classes the unpickler may build (``torch.serialization.safe_globals``).
        map_location: Where tensors go.

    Returns:
        The unpickled object.

    Raises:
        UnsafeCheckpointError: The weights-only unpickler refused the file (nothing from it was executed).
        CheckpointError: Missing, truncated, or not a torch file at all.
    """
    try:
        with torch.serialization.safe_globals(list(safe_globals)), warnings.catch_warnings():
            # A pickle of another protocol draws a UserWarning before the refusal; the error says it all.
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(str(path), map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file; {hint}") from None
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpointError(
            f"{path}: refused by the weights-only unpickler ({unpickler_reason(exc)}); nothing from the file was "
            f"executed (never load it with weights_only=False); {hint}"
        ) from exc
    except Exception as exc:  # noqa: BLE001 - on a non-torch file the unpickler fails in many ways (IndexError ...)
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CheckpointError(f"{path}: not a readable {what} ({type(exc).__name__}: {reason}); {hint}") from exc
