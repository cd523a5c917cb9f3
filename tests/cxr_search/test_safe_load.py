"""The three torch-pickle readers (released files, pretrained image towers, training state) refuse bad
files with one short error naming the file, and never run code from them."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from cxr_search.errors import CheckpointError, UnsafeCheckpointError
from cxr_search.model import create_model
from cxr_search.safe_load import torch_load_weights_only, unpickler_reason
from train.state import load_state

BAD_FILES = {
    "text": b"root:x:0:0:root:/root:/bin/bash\n",  # torch's legacy unpickler: IndexError
    "random": bytes(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8)),
    "list-pickle": pickle.dumps([1, 2, 3], protocol=4),  # refused opcode (and a protocol warning)
}


class _Evil:
    marker = ""

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def _short(message: str) -> None:
    assert "\n" not in message and len(message) < 400
    assert "will likely succeed" not in message  # torch's weights_only=False advice never reaches a user


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_bad_files_give_one_line_errors(tmp_path: Path, kind: str, recwarn) -> None:
    path = tmp_path / "x.pt"
    path.write_bytes(BAD_FILES[kind])
    with pytest.raises(CheckpointError) as err:
        torch_load_weights_only(path, what="torch checkpoint", hint="do this")
    assert str(path) in str(err.value) and str(err.value).endswith("do this")
    _short(str(err.value))
    assert not [w for w in recwarn if "pickle protocol" in str(w.message)]


def test_code_in_a_pickle_is_refused_not_run(tmp_path: Path) -> None:
    _Evil.marker = str(tmp_path / "pwned")
    torch.save({"x": _Evil()}, tmp_path / "evil.pt")
    with pytest.raises(UnsafeCheckpointError, match="nothing from the file was executed") as err:
        torch_load_weights_only(tmp_path / "evil.pt", what="torch checkpoint", hint="h")
    _short(str(err.value))
    assert "system" in str(err.value)  # the refused global is named
    assert not (tmp_path / "pwned").exists()


def test_good_file_and_missing_file(tmp_path: Path) -> None:
    torch.save({"w": torch.arange(3)}, tmp_path / "ok.pt")
    assert torch.equal(torch_load_weights_only(tmp_path / "ok.pt", what="t", hint="h")["w"], torch.arange(3))
    with pytest.raises(CheckpointError, match="no such file; h"):
        torch_load_weights_only(tmp_path / "nope.pt", what="t", hint="h")


def test_unpickler_reason_keeps_one_line() -> None:
    # The two layouts torch 2.x uses: the reason on its own line, or after "WeightsUnpickler error:".
    advice = "Weights only load failed. Re-running `torch.load` with `weights_only` set to `False` will likely succeed"
    docs = "Check the documentation of torch.load to learn more"
    own_line = f"{advice}\n\n\nTrying to load unsupported GLOBAL posix.system whose module posix is blocked.\n\n{docs}"
    assert unpickler_reason(pickle.UnpicklingError(own_line)).startswith("Trying to load unsupported GLOBAL posix")
    issue = "Please file an issue with the following so that we can make it compatible: WeightsUnpickler error: "
    for tail in ("\n\nUnsupported operand 149", "Unsupported operand 149"):
        assert unpickler_reason(pickle.UnpicklingError(f"{advice}\n{issue}{tail}\n\n{docs}")) == "Unsupported operand 149"
    assert unpickler_reason(pickle.UnpicklingError("")) == "UnpicklingError"


def test_damaged_training_state_says_how_to_resume_from_an_older_step(tmp_path: Path) -> None:
    step = tmp_path / "checkpoints" / "step-00000010"
    step.mkdir(parents=True)
    (step / "state.pt").write_bytes(b"\x80\x02truncated")
    with pytest.raises(CheckpointError, match="latest.json") as err:
        load_state(step)
    _short(str(err.value))
    assert "state.pt" in str(err.value)


def test_bad_pretrained_image_tower_file(tmp_path: Path) -> None:
    bad = tmp_path / "resnet.pth"
    bad.write_bytes(BAD_FILES["text"])
    with pytest.raises(CheckpointError, match="resnet.pth") as err:
        create_model("tiny", image={"pretrained_path": str(bad)})
    _short(str(err.value))
