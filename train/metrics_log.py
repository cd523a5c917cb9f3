"""Training metrics as JSON lines (``metrics.jsonl``), mirrored to TensorBoard when it is installed."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Dict, Optional

logger = logging.getLogger(__name__)

__all__ = ["MetricsLog", "read_metrics"]


class MetricsLog:
    """Appends one JSON object per call to ``run_dir/metrics.jsonl`` (flushed at once: a kill loses nothing).

    Args:
        run_dir: The run directory.
        enabled: False on non-zero ranks (nothing is written).
    """

    def __init__(self, run_dir: Path, *, enabled: bool = True) -> None:
        self.enabled = enabled
        self._fh = None
        self._tb: Optional[Any] = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self._fh = (run_dir / "metrics.jsonl").open("a", encoding="utf-8")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        except ImportError:  # tensorboard is optional
            self._tb = None

    def write(self, record: Dict[str, Any]) -> None:
        """Append a record (numbers rounded for readability; non-finite values become null)."""
        if not self.enabled or self._fh is None:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else
                     (round(v, 6) if isinstance(v, float) else v)) for k, v in record.items()}
        self._fh.write(json.dumps(clean) + "\n")
        self._fh.flush()
        if self._tb is not None and "step" in record:
            kind = record.get("kind", "train")
            for k, v in record.items():
                if k not in ("step", "kind") and isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(f"{kind}/{k}", v, int(record["step"]))

    def close(self) -> None:
        """Close the files."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_metrics(run_dir: Path, kind: Optional[str] = None) -> list:
    """Records of ``metrics.jsonl`` (optionally only one ``kind``: "train" or "val")."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    out = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r for r in out if kind is None or r.get("kind") == kind]
