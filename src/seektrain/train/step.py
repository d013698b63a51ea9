"""One optimizer step, in three parts the trainer sequences: forward/backward over the micro-batches
(ending with the gradient norm the guard judges), clip, then the optimizer step.

In one process with bf16 or fp32, the host reads the device once per step: the loss sums and the
gradient norm, together, after the last backward (fp16's scaler and torchrun's count all-reduce add
theirs). Everything else stays queued on the device (expert counts feed the bias update there; batches
are copied from pinned memory), so the CPU prepares the next step while the optimizer runs.

Precision: `fp32`; `bf16` autocast over fp32 master weights; `fp16` autocast with dynamic loss
scaling (GradScaler: the scale backs off and the step is skipped on overflow, grows after a run of
good steps). The loss itself is always computed in fp32 by the model.

Data parallel (`world_size` > 1, the model wrapped by DDP or FSDP2): target counts are all-reduced
before the first forward, so every rank divides by the GLOBAL count; the gradient reduction averages
over ranks, so each rank backpropagates `world_size` × its share and the average is the gradient of the
global-batch loss (exact for a power-of-two world size). Gradients are synchronized by the last
micro-batch's backward only; the logged sums and expert loads are all-reduced, so every rank sees the
same statistics and takes the same guard decisions.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist

from seektrain.distributed.parallelize import blocks, gradient_sync
from seektrain.train.loss import micro_batch_loss, target_counts

AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class StepStats:
    loss: float  # main cross-entropy, mean over the global batch's targets
    mtp_loss: float  # MTP cross-entropy, mean over its targets (all depths)
    balance_loss: float  # sequence-wise balance loss, mean over micro-batches (of all ranks)
    grad_norm: float  # global gradient norm before clipping (unscaled under fp16; inf/nan if bad)
    tokens: int  # main targets in the step (all ranks)
    expert_counts: torch.Tensor  # (n_moe_layers, E) int64 on the device, summed over micro-batches and ranks
    mtp_expert_counts: torch.Tensor  # (MTP MoE layers, E) int64 on the device, likewise


class Stepper:
    """Owns the gradient path of a step for one model/optimizer/precision."""

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        precision: str,
        device: torch.device,
        grad_clip: float,
        world_size: int = 1,
        cuda_graphs: bool = False,
    ):
        self.model = model  # the module to call: the model itself, or its DDP/FSDP2 form
        self.cuda_graphs = cuda_graphs  # blocks replayed as CUDA graphs (see _start_graph_run)
        # parameters whose gradients the graphs write (the blocks'; not the embedding, head or norms)
        self._graphed = {p for b in blocks(model) for p in b.parameters()} if cuda_graphs else set()
        self.optimizer = optimizer
        self.device = device
        self.grad_clip = grad_clip
        self.world_size = world_size
        self.autocast_dtype = AUTOCAST_DTYPES[precision]
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        self._norm: tuple[torch.Tensor, float] | None = None  # last gradient norm: device tensor, its value

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def forward_backward(
        self, batches: list[tuple[torch.Tensor, torch.Tensor]], mtp_weight: float, mtp_depth: int
    ) -> StepStats:
        """Accumulate the gradient of the global-batch loss over micro-batches (x, y) each (mb, T), then
        take its global norm (after unscaling under fp16). Every call ends in `apply()` or `discard()`."""
        self.optimizer.zero_grad(set_to_none=True)
        n_main, n_mtp = self._all_reduce_counts(*target_counts([y for _, y in batches], mtp_depth))
        n_micro, ranks = len(batches) * self.world_size, self.world_size
        main = mtp = balance = torch.zeros((), device=self.device)
        counts = None
        for i, (x, y) in enumerate(batches):
            if self.cuda_graphs:
                self._start_graph_run(i)
            x, y = to_device(x, self.device), to_device(y, self.device)
            with gradient_sync(self.model, enabled=i == len(batches) - 1):
                with self.autocast():
                    out = self.model(x, y)
                loss = micro_batch_loss(out, n_main, n_mtp, mtp_weight, n_micro) * ranks
                self.scaler.scale(loss).backward()
            main = main + out.main_loss_sum.detach()
            mtp = mtp + out.mtp_loss_sum.detach()
            balance = balance + out.balance_loss.detach()
            step_counts = torch.cat([out.expert_counts, out.mtp_expert_counts])  # main rows, then MTP rows
            counts = step_counts if counts is None else counts + step_counts
        sums = torch.stack([main, mtp, balance])  # (3,) fp32
        if ranks > 1:
            dist.all_reduce(sums)
            dist.all_reduce(counts)
        self.scaler.unscale_(self.optimizer)  # fp16: the norm (and the clip) see the true gradients
        norm = global_norm([p.grad for p in self._params_with_grad()])
        main, mtp, balance, grad_norm = torch.cat([sums, norm.view(1)]).tolist()  # the step's one read
        self._norm = (norm, grad_norm)
        n_main_rows = out.expert_counts.shape[0]
        return StepStats(
            loss=main / max(n_main, 1),
            mtp_loss=mtp / n_mtp if n_mtp else 0.0,
            balance_loss=balance / n_micro,
            grad_norm=grad_norm,
            tokens=n_main,
            expert_counts=counts[:n_main_rows],
            mtp_expert_counts=counts[n_main_rows:],
        )

    def _start_graph_run(self, micro_batch: int) -> None:
        """Before each micro-batch with CUDA-graphed blocks. The last run's graph outputs are consumed (its
        sums were added into new tensors) except the gradients: autograd installs the first backward's
        gradient outputs as `.grad` without a copy, and replaying the graphs would overwrite them in place
        (pytorch/pytorch#169545: wrong sums, silently). So the blocks' gradients are copied out once, after
        the first micro-batch; later ones accumulate into those copies in place."""
        if micro_batch == 1:
            for p in self._params_with_grad():
                if p in self._graphed:
                    p.grad = p.grad.clone()
        torch.compiler.cudagraph_mark_step_begin()

    def _params_with_grad(self) -> list[torch.Tensor]:
        return [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]

    def _all_reduce_counts(self, n_main: int, n_mtp: int) -> tuple[int, int]:
        """Target counts over all ranks' micro-batches (the loss denominators)."""
        if self.world_size == 1:
            return n_main, n_mtp
        both = torch.tensor([n_main, n_mtp], dtype=torch.int64, device=self.device)
        dist.all_reduce(both)
        return int(both[0]), int(both[1])

    def clip(self) -> None:
        """Scale the last forward_backward's gradients by max_norm / (norm + 1e-6) when that is below 1,
        the factor computed from the norm still on the device. An optimizer that takes the factor into its
        update (`OnePassAdamW.scale_gradients`) gets it; otherwise scaling is a read and a write of every
        gradient (2.75 ms of a 90 ms `small` step on an H200), so it is skipped when not needed."""
        norm, value = self._norm
        if self.grad_clip <= 0 or value + 1e-6 <= self.grad_clip:
            return
        if hasattr(self.optimizer, "scale_gradients"):
            # the same factor as clip_grads_with_norm_
            self.optimizer.scale_gradients((self.grad_clip / (norm + 1e-6)).clamp(max=1.0))
        else:
            torch.nn.utils.clip_grads_with_norm_(self._params_with_grad(), self.grad_clip, norm)

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


def global_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """L2 norm over all gradients, as fp32, exact to fp32 rounding.

    An fp32 `vector_norm` of millions of elements is off by ~1e-5..1e-4 relative on CPU (measured on
    `tiny`): enough for one process and FSDP (which adds per-shard norms) to clip differently. So the
    per-tensor sums of squares (cascade-summed, ~1e-9) are added in fp64 (~2 ms per step on `tiny`).
    On CUDA, `fused_norm`'s multi-tensor kernels read each gradient once instead of writing and
    re-reading a squared copy. Under FSDP2 (DTensor shards) the
    per-rank partial sum is reduced."""
    if grads and grads[0].is_cuda and not hasattr(grads[0], "full_tensor"):
        return fused_norm(grads)
    squares = torch.stack([g.pow(2).sum().double() for g in grads])  # (n_params,)
    norm = squares.sum().sqrt()
    if hasattr(norm, "full_tensor"):  # FSDP2: partial over this rank's shards -> the global norm
        norm = norm.full_tensor()
    return norm.float()


def fused_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """`global_norm` for plain tensors through multi-tensor kernels accumulating in fp64 (the CUDA path)."""
    norms = torch._foreach_norm(grads, 2, dtype=torch.float64)
    return torch.linalg.vector_norm(torch.stack(norms)).float()


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device` without waiting for the work queued there: a copy to a GPU from pinned
    memory is asynchronous, from pageable memory (or a strided view, staged through it) it would wait."""
    if device.type == "cuda" and t.device.type == "cpu":
        t = t.contiguous().pin_memory()
    return t.to(device, non_blocking=True)
