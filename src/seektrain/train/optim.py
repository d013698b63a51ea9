"""Optimizers: AdamW (torch's fused kernel; with bf16 moments our one-pass update, the clip folded in), and
LAMB; weight decay on matrices only.

Parameters with two or more dimensions (linear weights, embeddings, stacked expert weights) decay;
norms and biases do not. The MoE correction bias is a buffer, so no optimizer ever sees it.
"""

from __future__ import annotations

import torch

from seektrain.config import OptimConfig
from seektrain.model.init import local_part
from seektrain.train.step import to_device


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay)
    betas = (cfg.beta1, cfg.beta2)
    if cfg.name == "lamb":
        return Lamb(groups, lr=cfg.lr, betas=betas, eps=cfg.eps)
    device = next(model.parameters()).device
    if cfg.state_dtype == "bf16":
        return OnePassAdamW(
            groups,
            lr=cfg.lr,
            betas=betas,
            eps=cfg.eps,
            moment_dtype=torch.bfloat16,
            compiled=device.type == "cuda",
        )
    # torch's fused kernel: one pass per parameter on CUDA and CPU (`tiny` on one CPU thread: 4.6 ms a step
    # against 16.3 for the per-tensor loop); transformers' Trainer defaults to it as well. On an H200 it
    # also beat OnePassAdamW with fp32 moments and the clip folded in (bench/RESULTS.md): the one-pass
    # update saves the clip's pass on the device but costs more host time than the GPU work it saves.
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, eps=cfg.eps, fused=fused)


class OnePassAdamW(torch.optim.Optimizer):
    """AdamW (torch's formula, decoupled weight decay) as one elementwise pass over each parameter, with
    the gradient clip folded in and the moments stored in fp32 or bf16; `optim.state_dtype = "bf16"`.

    - bf16 moments, as DeepSeek-V3 trains (§3.3.3): 4 bytes per parameter instead of 8, and 20 instead of
      28 bytes of traffic per parameter and step. Each update is computed in fp32 from the stored moments,
      which are then rounded once. Rounding keeps about 3 significant digits of each moment, so β2 much
      closer to 1 than DeepSeek's 0.95 (0.999: each step changes v by 0.1%, under half a bf16 step) would
      let v stall; hence bf16 is an option.
    - Clip: `scale_gradients(factor)` (a device tensor) multiplies the next step's gradients by `factor`
      inside the update, instead of a separate read and write of every gradient (2.75 ms of a 90 ms
      `small` step on an H200). torch's fused kernel takes such a factor too (`grad_scale`), but writes
      the scaled gradients back: the pass it saves, it spends again (0.6% measured).
    - `compiled` (on a GPU): one kernel per parameter through torch.compile, all of a group's launched
      by one call. With fp32 moments this still lost to torch's fused AdamW + the clip pass on an H200
      (more host time than the device time it saves), so it serves bf16 moments only.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        moment_dtype: torch.dtype = torch.float32,
        compiled: bool = False,
    ):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.moment_dtype = moment_dtype
        # Compiled: one call per group and step, its kernels launched from inductor's wrapper. A call per
        # parameter cost ~200 µs of host time each (guards, dispatch): 243 calls kept the GPU waiting
        # ~50 ms per step of the 24-layer dense model (bench/RESULTS.md, fourth GPU pass). Each list length
        # is a graph of its own; not fullgraph, so that past dynamo's recompile limit (parameters whose
        # gradient comes and goes, many optimizers in one process) the update runs eager instead of failing.
        self._update = torch.compile(_adamw_update_all, dynamic=True) if compiled else _adamw_update_all
        self._grad_factor: torch.Tensor | None = None  # the clip factor of the next step
        self._ones: dict[torch.device, torch.Tensor] = {}  # the factor when nothing is clipped
        self.register_load_state_dict_post_hook(OnePassAdamW._restore_state_types)

    def scale_gradients(self, factor: torch.Tensor | None) -> None:
        """Multiply the gradients of the next `step` by `factor` (a 0-dim fp32 tensor; None: by 1)."""
        self._grad_factor = factor

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._grad_factor = None  # a step dropped after clip() must not scale the next one
        super().zero_grad(set_to_none)

    @torch.no_grad()
    def step(self, closure=None):
        loss = _run_closure(closure)
        factor, self._grad_factor = self._grad_factor, None
        # one update call per group, step count and device: its scalars and its lists p, g, m, v
        calls: dict[tuple, tuple[torch.Tensor, list[list[torch.Tensor]]]] = {}
        for group, p, state, step in _params_with_state(self, self.moment_dtype):
            beta1, beta2 = group["betas"]
            device = local_part(p).device
            key = (id(group), step, device)
            if key not in calls:
                values = [group["lr"], group["weight_decay"], beta1, beta2, group["eps"]]
                values += [1 - beta1**step, 1 - beta2**step]
                calls[key] = to_device(torch.tensor([float(v) for v in values]), device), [[], [], [], []]
            tensors = [local_part(x) for x in (p, p.grad, state["exp_avg"], state["exp_avg_sq"])]
            if all(x.is_contiguous() for x in tensors):  # flat: every tensor through the same kernel
                tensors = [x.view(-1) for x in tensors]
            for bucket, x in zip(calls[key][1], tensors, strict=True):
                bucket.append(x)
        for (_, _, device), (scalars, lists) in calls.items():
            self._update(*lists, scalars, self._factor_on(device, factor))
        return loss

    def _factor_on(self, device: torch.device, factor: torch.Tensor | None) -> torch.Tensor:
        if factor is None:
            if device not in self._ones:
                self._ones[device] = torch.ones((), device=device)
            return self._ones[device]
        return factor if factor.device == device else factor.to(device)

    @staticmethod
    def _restore_state_types(optimizer: OnePassAdamW) -> None:
        """`Optimizer.load_state_dict` casts floating-point state to its parameter's dtype (fp32): moments
        go back to their dtype. A step count saved by torch's fused AdamW lives on the device: it comes to
        the host, where reading it costs no synchronization."""
        for state in optimizer.state.values():
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key] = state[key].to(optimizer.moment_dtype)
            if "step" in state:
                state["step"] = state["step"].to("cpu", torch.float32)


def _adamw_update_all(
    ps: list[torch.Tensor],
    gs: list[torch.Tensor],
    ms: list[torch.Tensor],
    vs: list[torch.Tensor],
    scalars: torch.Tensor,
    grad_factor: torch.Tensor,
) -> None:
    """`_adamw_update` over lists of parameters, gradients and moments sharing the scalars."""
    for p, g, m, v in zip(ps, gs, ms, vs, strict=True):
        _adamw_update(p, g, m, v, scalars, grad_factor)


def _adamw_update(
    p: torch.Tensor,
    g: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor,
    scalars: torch.Tensor,
    grad_factor: torch.Tensor,
) -> None:
    """p ← p·(1 − lr·wd) − lr/(1 − β1^t) · m / (sqrt(v)/sqrt(1 − β2^t) + eps), m and v updated first from
    the gradient times `grad_factor`; all in fp32, m and v stored back in their own dtype.
    scalars = (lr, wd, β1, β2, eps, 1 − β1^t, 1 − β2^t)."""
    lr, wd, beta1, beta2, eps, bias1, bias2 = scalars.unbind()
    g = g.float() * grad_factor
    # fp32 copies of the moments (copy=True: fp32 moments too, as the steps below work in place on them;
    # eager, on the CPU, would otherwise allocate a dozen parameter-sized temporaries).
    m32 = m.to(torch.float32, copy=True).mul_(beta1).add_(g * (1 - beta1))
    v32 = v.to(torch.float32, copy=True).mul_(beta2).add_(g.square().mul_(1 - beta2))
    m.copy_(m32)
    v.copy_(v32)
    denom = v32.sqrt_().div_(bias2.sqrt()).add_(eps)
    p.mul_(1 - lr * wd).sub_(m32.div_(denom).mul_(lr / bias1))


class Lamb(torch.optim.Optimizer):
    """LAMB (You et al., 2019): Adam's direction, rescaled per tensor by a trust ratio.

    For each tensor p with gradient g, at step t:
        m = β1·m + (1−β1)·g,   v = β2·v + (1−β2)·g²
        u = (m / (1−β1^t)) / (sqrt(v / (1−β2^t)) + eps) + wd·p
        r = ‖p‖ / ‖u‖   (1 when either norm is 0)
        p = p − lr·r·u
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
    ):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = _run_closure(closure)
        for group, p, state, t in _params_with_state(self):
            beta1, beta2 = group["betas"]
            m, v, g = state["exp_avg"], state["exp_avg_sq"], p.grad
            m.mul_(beta1).add_(g, alpha=1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            update = (m / (1 - beta1**t)) / ((v / (1 - beta2**t)).sqrt() + group["eps"])
            if group["weight_decay"]:
                update.add_(p, alpha=group["weight_decay"])
            p_norm, u_norm = p.norm(), update.norm()
            ratio = torch.where((p_norm > 0) & (u_norm > 0), p_norm / u_norm, torch.ones_like(p_norm))
            p.add_(update * ratio, alpha=-group["lr"])
        return loss


def _run_closure(closure):
    """The loss of an optimizer's closure (re-evaluated with gradients on), or None."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def _params_with_state(optimizer: torch.optim.Optimizer, moment_dtype: torch.dtype | None = None):
    """(group, parameter, state, step) for every parameter with a gradient: Adam-style state (step and
    two moments, of `moment_dtype` or the parameter's) created on first sight, the step count advanced."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is None:
                continue
            state = optimizer.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(
                    p, dtype=moment_dtype, memory_format=torch.preserve_format
                )
                state["exp_avg_sq"] = torch.zeros_like(
                    p, dtype=moment_dtype, memory_format=torch.preserve_format
                )
            state["step"] += 1
            yield group, p, state, state["step"].item()
