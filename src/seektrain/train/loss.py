"""The step loss: token sums over the whole global batch divided by its token counts.

With k micro-batches the optimizer must see the gradient of one big batch, so each micro-batch
contributes main_loss_sum / N_main + λ·mtp_loss_sum / N_mtp, where the N are counted over ALL
micro-batches of the step before any forward runs (a mean of per-micro-batch means would weight
short or padded micro-batches wrongly). The balance loss is already a per-micro-batch mean, so it is
averaged over the k micro-batches.
"""

from __future__ import annotations

import torch

from seektrain.model.cross_entropy import IGNORE_INDEX


def target_counts(targets: list[torch.Tensor], mtp_depth: int) -> tuple[int, int]:
    """(N_main, N_mtp) over a step's micro-batches. MTP depth k predicts targets shifted left by k,
    so its targets are `targets[:, k:]` (the model's `shift_left`); N_mtp sums over depths."""
    n_main = sum(int((y != IGNORE_INDEX).sum()) for y in targets)
    n_mtp = sum(int((y[:, k:] != IGNORE_INDEX).sum()) for y in targets for k in range(1, mtp_depth + 1))
    return n_main, n_mtp


def micro_batch_loss(out, n_main: int, n_mtp: int, mtp_weight: float, accum_steps: int) -> torch.Tensor:
    """This micro-batch's share of the step loss (backpropagated per micro-batch)."""
    loss = out.main_loss_sum / max(n_main, 1)
    if n_mtp:
        loss = loss + mtp_weight * out.mtp_loss_sum / n_mtp
    return loss + out.balance_loss / accum_steps
