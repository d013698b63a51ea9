"""What a run reports: `metrics.jsonl` lines, TensorBoard scalars, MFU and memory.

Every line of metrics.jsonl carries `step`. On resume the file is cut back to the checkpoint's step
(atomically) and TensorBoard purges later events, so a step is never logged twice.
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
from pathlib import Path
from typing import Any

import torch

from seektrain.paths import atomic_write_bytes

METRICS_FILE = "metrics.jsonl"

# Dense bf16 tensor-core peaks (FLOP/s), matched against torch.cuda.get_device_name().
PEAK_FLOPS = [
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("GH200", 989e12),
    ("A100", 312e12),
]


class MetricsLog:
    """Appends JSON lines to RUN_DIR/metrics.jsonl and mirrors numbers to TensorBoard (RUN_DIR/tb)."""

    def __init__(self, run_dir: Path, keep_through_step: int, tensorboard: bool):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / METRICS_FILE
        self.tensorboard = tensorboard
        self._open(keep_through_step)

    def _open(self, keep_through_step: int) -> None:
        truncate_metrics(self.path, keep_through_step)
        # unbuffered: a line that cannot be written (a full disk) fails in write(), and close() has no
        # buffered rest to fail on again
        self._file = open(self.path, "ab", buffering=0)  # noqa: SIM115 (open for the run, closed by close())
        self._tb = None
        tb = self.run_dir / "tb"
        if self.tensorboard or tb.is_dir():
            from torch.utils.tensorboard import SummaryWriter

            # the purge marker hides an earlier run's later events; written also where this run logs
            # none, or they would outlive the run they belonged to, and show once logging resumes
            self._tb = SummaryWriter(str(tb), purge_step=keep_through_step + 1)
            if not self.tensorboard:
                self._tb.close()
                self._tb = None

    def rewind(self, keep_through_step: int) -> None:
        """Forget everything logged after `keep_through_step` (a rollback)."""
        self.close()
        self._open(keep_through_step)

    def write(self, record: dict[str, Any], tb_prefix: str | None = None) -> None:
        line = memoryview((strict_dumps(record) + "\n").encode())
        try:
            while line:  # an unbuffered write may take only part of it
                line = line[self._file.write(line) :]
        except OSError as e:
            raise OSError(e.errno, e.strerror, str(self.path)) from e
        if self._tb is not None and tb_prefix is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(f"{tb_prefix}/{key}", value, record["step"])

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def strict_dumps(record: dict[str, Any], indent: int | None = None) -> str:
    """`record` as strict JSON, NaN and ±inf as null: Python's json writes them as bare `NaN`/`Infinity`,
    which jq, JavaScript and most JSON readers reject. TensorBoard still gets the value itself."""
    finite = {
        key: None if isinstance(value, float) and not math.isfinite(value) else value
        for key, value in record.items()
    }
    return json.dumps(finite, allow_nan=False, indent=indent)


def truncate_metrics(path: Path, keep_through_step: int) -> None:
    """Keep only lines with step ≤ keep_through_step (atomic rewrite; torn last lines dropped)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill -9
        if record.get("step", math.inf) <= keep_through_step:  # rewritten strict (older runs wrote NaN)
            kept.append(strict_dumps(record) + "\n")
    atomic_write_bytes(path, "".join(kept).encode())


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def flops_per_token(model_cfg, seq_len: int) -> float:
    """6·N_active + 6·L·H·(d_qk + d_v)·T: weights' forward+backward plus attention counted in full."""
    attn = (
        6
        * model_cfg.num_hidden_layers
        * model_cfg.num_attention_heads
        * (model_cfg.qk_nope_head_dim + model_cfg.qk_rope_head_dim + model_cfg.v_head_dim)
        * seq_len
    )
    return 6 * model_cfg.num_active_params() + attn


def peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak when known (None on CPU and unknown GPUs: no MFU is reported)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_FLOPS if key in name), None)


def memory_gib(device: torch.device) -> float:
    """Peak accelerator memory allocated, or the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**30 if sys.platform == "darwin" else 2**20)
