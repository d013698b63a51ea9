"""One optimizer step, in three parts the trainer sequences: forward/backward over the micro-batches,
unscale + clip (which yields the gradient norm the guard judges), then the optimizer step.

Precision: `fp32`; `bf16` autocast over fp32 master weights; `fp16` autocast with dynamic loss
scaling (GradScaler: the scale backs off and the step is skipped on overflow, grows after a run of
good steps). The loss itself is always computed in fp32 by the model.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

from seektrain.train.loss import micro_batch_loss, target_counts

AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class StepStats:
    loss: float  # main cross-entropy, mean over the global batch's targets
    mtp_loss: float  # MTP cross-entropy, mean over its targets (all depths)
    balance_loss: float  # sequence-wise balance loss, mean over micro-batches
    tokens: int  # main targets in the step
    expert_counts: torch.Tensor  # (n_moe_layers, E) int64, summed over micro-batches


class Stepper:
    """Owns the gradient path of a step for one model/optimizer/precision."""

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        precision: str,
        device: torch.device,
        grad_clip: float,
    ):
        self.model = model
        self.optimizer = optimizer
        self.device = device
        self.grad_clip = grad_clip
        self.autocast_dtype = AUTOCAST_DTYPES[precision]
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def forward_backward(
        self, batches: list[tuple[torch.Tensor, torch.Tensor]], mtp_weight: float, mtp_depth: int
    ) -> StepStats:
        """Accumulate the gradient of the global-batch loss over micro-batches (x, y) each (mb, T)."""
        self.optimizer.zero_grad(set_to_none=True)
        n_main, n_mtp = target_counts([y for _, y in batches], mtp_depth)
        main = mtp = balance = torch.zeros((), device=self.device)
        counts = None
        for x, y in batches:
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
            with self.autocast():
                out = self.model(x, y)
            loss = micro_batch_loss(out, n_main, n_mtp, mtp_weight, len(batches))
            self.scaler.scale(loss).backward()
            main = main + out.main_loss_sum.detach()
            mtp = mtp + out.mtp_loss_sum.detach()
            balance = balance + out.balance_loss.detach()
            counts = out.expert_counts if counts is None else counts + out.expert_counts
        return StepStats(
            loss=main.item() / max(n_main, 1),
            mtp_loss=mtp.item() / n_mtp if n_mtp else 0.0,
            balance_loss=balance.item() / len(batches),
            tokens=n_main,
            expert_counts=counts.cpu(),
        )

    def clip(self) -> float:
        """Unscale (fp16) and clip to the global norm; return the norm before clipping (inf/nan if bad)."""
        self.scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        max_norm = self.grad_clip if self.grad_clip > 0 else math.inf
        return torch.nn.utils.clip_grad_norm_(params, max_norm).item()

    def apply(self, lr: float) -> bool:
        """Optimizer step at learning rate `lr`; False when the scaler skipped it (fp16 overflow)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        scale = self.scaler.get_scale() if self.scaler.is_enabled() else None
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return scale is None or self.scaler.get_scale() >= scale

    def discard(self) -> None:
        """Drop this step's gradients (a non-finite step the guard skipped)."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler.is_enabled():
            self.scaler.update(self.scaler.get_scale())  # forget the unscale_ bookkeeping of this step
