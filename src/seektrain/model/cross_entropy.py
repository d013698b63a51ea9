"""The training loss head: logits = h W^T and their token cross-entropy, worked on a slice of rows at a time.

The (N, V) logits exist whole only once, in the buffer of their gradient in the compute dtype, never as
fp32 copies (`small` at B=8, T=2048: 1 GiB in bf16, 2 GiB per fp32 copy, and eager F.cross_entropy makes
several). With a gradient to come, one GEMM writes them into that buffer; each slice of rows is then
upcast to fp32 for the log-sum-exp and overwritten at once by its rows of the logits' gradient
softmax - onehot, stored in the compute dtype; the backward is the head's two GEMMs on that buffer.
Without one (evaluation) each slice is multiplied on its own, into one scratch slice. The main model's
rows and every MTP depth's rows go through one call, so the head weight is cast to the compute dtype
once. On CPU this is also the fastest form: no fresh (N, V) fp32 buffer is paid for in page faults, and
inside a `tiny` bf16 step the head takes 37 ms against transformers' 49 for its head and cross-entropy
(bench/RESULTS.md, tenth CPU pass), 28.5 of them the three GEMMs.

Two cases take the plain formulation (F.linear, then F.cross_entropy in fp32) instead: under torch.compile,
where inductor fuses it, and under fp16 autocast, where the gradient must be multiplied by the loss scale
before it is rounded to fp16 (stored unscaled, small probabilities would flush to zero).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100


def _slice_elements(device: str, dtype: torch.dtype) -> int:
    """Rows per slice = these many logits // V. On CPU in bf16/fp16, a cache-sized slice (256 rows of
    `tiny`'s 8192; 128-512 rows measured fastest, the whole 1024 rows 20% slower); in fp32 MKL's GEMMs
    gain from more rows (head + loss forward and backward of `tiny`'s 1024 rows, one thread: 168 ms
    whole, 174 ms in 512-row and 182 ms in 256-row slices). Elsewhere 256 MB, so a GPU runs few, large
    kernels."""
    if device == "cpu":
        return 1 << 23 if dtype == torch.float32 else 1 << 21
    return 1 << 26


class LinearCrossEntropy(nn.Module):
    """Sums of fp32 token cross-entropies of h W^T over targets != -100, and their counts (int64), for
    several (h, targets) groups that share the head W (the main model and each MTP depth).

    A module without parameters (the head's weight is passed in) so that `apply_compile` can compile it
    like a block."""

    def forward(
        self, hs: list[torch.Tensor], weight: torch.Tensor, targets: list[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """hs[i] (..., D), weight (V, D), targets[i] (...) int64 -> (sums (G,) fp32, counts (G,) int64)."""
        rows = [x.flatten(0, -2) for x in hs]
        flat = [t.flatten() for t in targets]
        # (N, D) and (N,); one group (no MTP) needs no copy
        h, target = (rows[0], flat[0]) if len(rows) == 1 else (torch.cat(rows), torch.cat(flat))
        counts = torch.stack([(t != IGNORE_INDEX).sum() for t in flat])
        device = h.device.type
        autocast = torch.is_autocast_enabled(device)
        dtype = torch.get_autocast_dtype(device) if autocast else torch.promote_types(h.dtype, weight.dtype)
        if torch.compiler.is_compiling() or dtype == torch.float16:
            logits = F.linear(h, weight).float()
            nll = F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX, reduction="none")
        else:
            with_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
            nll = _LinearCrossEntropy.apply(h, weight, target, dtype, with_grad)
        sums = torch.stack([part.sum() for part in nll.split([t.numel() for t in flat])])
        return sums, counts


class _LinearCrossEntropy(torch.autograd.Function):
    """Per row: logsumexp(h_i W^T) - h_i·W_{t_i} (0 where t_i is ignored), computed slice by slice; with
    `with_grad` the forward also leaves d(nll_i)/d(logits_i) in one (N, V) buffer of the compute dtype
    (softmax - onehot; ignored rows hold their softmax there, and the backward gives them weight 0)."""

    @staticmethod
    def forward(ctx, h, weight, targets, dtype: torch.dtype, with_grad: bool) -> torch.Tensor:
        x, w = h.to(dtype), weight.to(dtype)
        n, vocab = x.shape[0], w.shape[0]
        valid = (targets != IGNORE_INDEX)[:, None]  # (N, 1)
        picked = targets.masked_fill(~valid[:, 0], 0)[:, None]  # (N, 1)
        rows = max(1, min(n, _slice_elements(x.device.type, dtype) // vocab))
        nll = torch.empty(n, dtype=torch.float32, device=x.device)
        # Each slice's logits are written where its gradient will go (or to one scratch slice), then
        # worked on in place (fp32) or upcast into one reused fp32 slice: no fresh buffer per slice.
        dlogits = torch.empty(n, vocab, dtype=dtype, device=x.device) if with_grad else None
        scratch = None if with_grad else torch.empty(rows, vocab, dtype=dtype, device=x.device)
        work = None
        if dtype != torch.float32:
            work = torch.empty(rows, vocab, dtype=torch.float32, device=x.device)
        with torch.autocast(x.device.type, enabled=False):  # dtypes are explicit here
            if with_grad:  # one GEMM: run between the slices' passes, which push W out of the cache, the
                torch.mm(x, w.t(), out=dlogits)  # slices' GEMMs took 1.5x as long (`tiny`, bf16, CPU)
            for a in range(0, n, rows):
                b = min(a + rows, n)
                logits = dlogits[a:b] if with_grad else torch.mm(x[a:b], w.t(), out=scratch[: b - a])
                z = logits if work is None else work[: b - a].copy_(logits)  # fp32
                keep = valid[a:b]
                z_target = z.gather(1, picked[a:b])  # before z is overwritten
                top = z.amax(-1, keepdim=True)
                # softmax in place (torch's fused kernel: one pass fewer than exp, sum and scale); its
                # largest entry is exp(top - logsumexp), at least 1/V, so logsumexp = top - log(p_max)
                torch._softmax(z, -1, False, out=z)
                lse = top - z.amax(-1, keepdim=True).log()
                nll[a:b] = torch.where(keep, lse - z_target, 0.0)[:, 0]
                if with_grad:
                    z.scatter_add_(1, picked[a:b], -keep.float())  # softmax - onehot
                    if z is not logits:
                        logits.copy_(z)
        ctx.save_for_backward(x, w, dlogits, valid)
        ctx.dtypes = h.dtype, weight.dtype
        return nll

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        """grad (N,): each row's incoming gradient, applied in fp32 (rows of dh after their GEMM, rows of
        x before dW's, which sums over rows), so each result is rounded once."""
        x, w, dlogits, valid = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        g = grad.float()[:, None] * valid  # (N, 1), 0 on ignored rows
        dh = dw = None
        if ctx.needs_input_grad[0]:
            dh = torch.mm(dlogits, w).float().mul_(g).to(h_dtype)
        if ctx.needs_input_grad[1]:
            dw = torch.mm(dlogits.t(), (x.float() * g).to(x.dtype)).to(w_dtype)
        return dh, dw, None, None, None
