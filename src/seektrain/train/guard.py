"""Guarding the loop: skip non-finite steps, and call for a rollback on loss spikes or persistent NaNs.

The guard only decides; the trainer skips the optimizer step or rolls back. Its history is part of
the checkpoint so that a resumed run makes the same decisions as an uninterrupted one.
"""

from __future__ import annotations

import math
import statistics
from collections import deque

OK, SKIP, ROLLBACK = "ok", "skip", "rollback"


class Guard:
    """Decides per step: `ok`, `skip` (non-finite loss or gradient norm) or `rollback`.

    Rollback after `max_bad_steps` consecutive non-finite steps, or when the loss exceeds the mean of
    the last `window` accepted losses by more than `zscore` standard deviations (0 disables spikes).
    """

    def __init__(self, max_bad_steps: int, zscore: float, window: int):
        self.max_bad_steps = max_bad_steps
        self.zscore = zscore
        self.history: deque[float] = deque(maxlen=window)
        self.consecutive_bad = 0
        self.last_reason = ""

    def check(self, loss: float, grad_norm: float) -> str:
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            self.consecutive_bad += 1
            if self.consecutive_bad >= self.max_bad_steps:
                self.last_reason = f"{self.consecutive_bad} consecutive non-finite steps"
                return ROLLBACK
            self.last_reason = f"non-finite loss={loss} grad_norm={grad_norm}"
            return SKIP
        self.consecutive_bad = 0
        if self.zscore and len(self.history) == self.history.maxlen:
            mean = statistics.fmean(self.history)
            std = max(statistics.pstdev(self.history, mean), 1e-3 * abs(mean))  # floor: flat losses
            z = (loss - mean) / std
            if z > self.zscore:
                self.last_reason = (
                    f"loss spike {loss:.4g} (z={z:.1f} over the last {len(self.history)} steps)"
                )
                return ROLLBACK
        self.history.append(loss)
        return OK

    def reset_bad(self) -> None:
        self.consecutive_bad = 0

    def state_dict(self) -> dict:
        return {"history": list(self.history), "consecutive_bad": self.consecutive_bad}

    def load_state_dict(self, state: dict) -> None:
        self.history.clear()
        self.history.extend(state["history"])
        self.consecutive_bad = state["consecutive_bad"]
