"""DeepSeekMoE: shared experts + sigmoid-routed experts with group-limited top-k and aux-loss-free bias.

Routing (in fp32, as transformers and the V3 reference do):
  s = sigmoid(h W_gate^T)                                   affinities (N, E)
  choice = s + b                                            b = e_score_correction_bias, a buffer the
                                                            trainer nudges toward balance; it changes
                                                            WHICH experts win, never their weights
  keep the topk_group groups whose top-2 `choice` sum is largest, mask the rest with -inf
  idx = top-k(choice);  w = s[idx] / sum(s[idx]) * routed_scaling_factor
Routed experts are stacked `[E, …]` weights; tokens are sorted by expert (stable) and multiplied by
one grouped GEMM per projection (`F.grouped_mm` where the build has a kernel, else one matmul per
EXPERT from a single host sync). No token is dropped. Results are combined back per token with
index_add_ on CPU (cheapest, and serial there) and with gathers through the inverse permutation on GPU
(no atomics: deterministic forward and backward). On CPU in bf16/fp16 each expert's rows are padded to a
multiple of 32 with zero rows, so oneDNN does not build a new GEMM kernel for every new row count.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from seektrain.model.config import ModelConfig
from seektrain.model.layers import MLP

_TORCH_VERSION = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])


def route(
    logits: torch.Tensor, bias: torch.Tensor, cfg: ModelConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group-limited top-k on sigmoid affinities. logits (N, E) fp32 -> weights (N, k) fp32,
    expert ids (N, k) int64, affinities (N, E) fp32."""
    scores = logits.sigmoid()
    choice = scores + bias.float()
    if cfg.n_group > 1:
        N, E = choice.shape
        grouped = choice.view(N, cfg.n_group, E // cfg.n_group)
        group_scores = grouped.topk(2, dim=-1).values.sum(-1)  # (N, G)
        group_idx = group_scores.topk(cfg.topk_group, dim=-1, sorted=False).indices  # (N, topk_group)
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_idx, True)  # (N, G)
        choice = grouped.masked_fill(~keep[..., None], float("-inf")).view(N, E)
    idx = choice.topk(cfg.num_experts_per_tok, dim=-1, sorted=False).indices  # (N, k)
    weights = scores.gather(1, idx)
    if cfg.norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return weights * cfg.routed_scaling_factor, idx, scores


def _has_grouped_mm_kernel(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether this build/device/dtype has a native grouped GEMM (else the per-expert fallback runs)."""
    fn_available = hasattr(F, "grouped_mm") or hasattr(torch, "_grouped_mm")
    if not fn_available or x.dtype != w.dtype or not _aligned(x, w):
        return False
    if x.device.type == "cuda":
        major_minor = torch.cuda.get_device_capability(x.device)
        return x.dtype == torch.bfloat16 and major_minor >= ((8, 0) if hasattr(F, "grouped_mm") else (9, 0))
    if x.device.type == "cpu":
        # CPU kernels exist from torch 2.9; before 2.11 they also need 16-byte aligned operands.
        # Under torch.compile: the traced (fake) kernel accepts bf16 only, and alignment cannot be checked.
        if torch.compiler.is_compiling():
            return _TORCH_VERSION >= (2, 11) and x.dtype == torch.bfloat16
        if _TORCH_VERSION >= (2, 11):
            return True
        return _TORCH_VERSION >= (2, 9) and x.data_ptr() % 16 == 0 and w.data_ptr() % 16 == 0
    return False


def _aligned(x: torch.Tensor, w: torch.Tensor) -> bool:
    """The grouped kernels (CPU and CUDA) take operands whose strides are multiples of 16 bytes, the
    backward's too (x^T, and the output's gradient, rows of w's last size): not so for a hidden or expert
    size that is not a multiple of 8 (bf16) or 4 (fp32), e.g. 257."""
    strides = [*x.stride(), *w.stride(), w.shape[-1]]
    return all(stride * x.element_size() % 16 == 0 for stride in strides if stride != 1)


# On CPU, low-precision GEMMs run through oneDNN, which builds (JIT-compiles) a kernel for every new shape
# and caches 1024 of them: ~0.6 ms and ~650 KB per new row count. Each expert's row count changes every
# step, so its GEMMs would keep building kernels; rounded up to a multiple of this, they reuse a few.
# Padding adds at most E·(CPU_GROUP_ROWS - 1) + CPU_GROUP_ROWS rows, so it runs only where the pairs
# number at least PAD_MIN_GROUPS_PER_EXPERT·E·CPU_GROUP_ROWS (≤ 1/4 more rows; never in decoding).
CPU_GROUP_ROWS = 32
PAD_MIN_GROUPS_PER_EXPERT = 4


def _pads_groups(dtype: torch.dtype, pairs: int, n_experts: int) -> bool:
    """Whether the CPU path pads the expert groups of these `pairs` rows, multiplied in `dtype` (see
    CPU_GROUP_ROWS)."""
    return (
        dtype != torch.float32
        and CPU_GROUP_ROWS > 1
        and pairs >= PAD_MIN_GROUPS_PER_EXPERT * n_experts * CPU_GROUP_ROWS
    )


def pad_groups(
    token: torch.Tensor,
    scale: torch.Tensor,
    expert: torch.Tensor,
    counts: torch.Tensor,
    multiple: int,
    pad_token: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Spread the sorted pairs so that every expert's group of rows is a multiple of `multiple` long.
    token (S,) and scale (S, 1) per sorted pair, expert (S,) its expert id, counts (E,) -> the same for
    the padded rows, whose number depends on S and E only (the last group takes the slack; no host sync),
    and `position` (S,), the padded row of each sorted pair. Padding rows point at `pad_token` (a zero
    row of the caller's) with scale 0, so that they add exact zeros to the output and to every gradient."""
    S, E = token.shape[0], counts.shape[0]
    padded = (counts + multiple - 1) // multiple * multiple
    total = (S + E * (multiple - 1) + multiple - 1) // multiple * multiple  # >= padded.sum(), a multiple
    padded[-1] += total - padded.sum()
    shift = (padded.cumsum(0) - padded) - (counts.cumsum(0) - counts)  # (E,) each group's move
    position = torch.arange(S, device=token.device) + shift[expert.long()]
    padded_token = token.new_full((total,), pad_token).index_copy_(0, position, token)
    padded_scale = scale.new_zeros(total, 1).index_copy(0, position, scale)
    return padded_token, padded_scale, padded, position


def _index_add_is_deterministic(device: torch.device) -> bool:
    """index_add_ (and index_select's backward) accumulate serially on CPU; on GPU they use atomics."""
    return device.type == "cpu"


def gemm_dtype(x: torch.Tensor, w: torch.Tensor) -> torch.dtype:
    """The dtype `grouped_mm` multiplies x by w in: autocast's where it is on, else the weights'."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else w.dtype


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Rows of x (S, K), sorted by expert, times their expert's w[e] (E, K, N) -> (S, N).
    `offsets` (E,) int32 are the cumulative row counts, `counts` (E,) the per-expert counts."""
    dtype = gemm_dtype(x, w)  # the grouped kernels are not autocast-aware
    x, w = x.to(dtype), w.to(dtype)
    if _has_grouped_mm_kernel(x, w):
        fn = F.grouped_mm if hasattr(F, "grouped_mm") else torch._grouped_mm
        return fn(x, w, offs=offsets)
    return per_expert_mm(x, w, counts)


# Fallback: one GEMM per expert (never per token); reading the counts (once forward, once backward) is its
# only host sync. A custom op, so that torch.compile keeps it whole instead of breaking the graph at that
# read (CPU fp32 compiled).
@torch.library.custom_op("seektrain::per_expert_mm", mutates_args=())
def per_expert_mm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Rows of x (S, K), sorted by expert, times their expert's w[e] (E, K, N) -> (S, N)."""
    out = x.new_empty(x.shape[0], w.shape[-1])
    for e, (piece, rows) in enumerate(zip(x.split(split := counts.tolist()), out.split(split), strict=True)):
        torch.mm(piece, w[e], out=rows)  # written in place: no concatenation copy
    return out


@torch.library.custom_op("seektrain::per_expert_mm_backward", mutates_args=())
def per_expert_mm_backward(
    x: torch.Tensor, w: torch.Tensor, grad: torch.Tensor, counts: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of `per_expert_mm` from one read of the counts: grad_e w[e]^T rows (S, K) and x_e^T grad_e
    per expert (E, K, N)."""
    split = counts.tolist()
    dx, dw = x.new_empty(x.shape), x.new_empty(counts.shape[0], x.shape[1], grad.shape[1])
    for e, (a, g, rows) in enumerate(zip(x.split(split), grad.split(split), dx.split(split), strict=True)):
        torch.mm(g, w[e].t(), out=rows)
        torch.mm(a.t(), g, out=dw[e])
    return dx, dw


@per_expert_mm.register_fake
def _(x, w, counts):
    return x.new_empty(x.shape[0], w.shape[-1])


@per_expert_mm_backward.register_fake
def _(x, w, grad, counts):
    return x.new_empty(x.shape), x.new_empty(counts.shape[0], x.shape[1], grad.shape[1])


def _per_expert_mm_backward(ctx, grad):
    x, w, counts = ctx.saved_tensors
    dx, dw = per_expert_mm_backward(x, w, grad, counts)
    return dx, dw, None


def _per_expert_mm_save(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


per_expert_mm.register_autograd(_per_expert_mm_backward, setup_context=_per_expert_mm_save)


def spread_rows(x: torch.Tensor, token: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Row i = x[token[i]] in `dtype`, or zeros where token[i] == len(x) (padding rows). The cast runs
    on x's N rows, before the gather multiplies them by k."""
    rows = x.new_empty(x.shape[0] + 1, x.shape[1], dtype=dtype)
    rows[:-1] = x
    rows[-1] = 0
    return rows.index_select(0, token)


def collect_rows(y: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Row n = Σ_j y[pos[n, j]], summed in fp32 (or y's wider dtype): each token's k rows of y, gathered,
    never scattered. One (N, D) gather per j, added in order: a third of the time of gathering all N·k
    rows and reducing over k (`tiny`, bf16: 0.19 against 0.55 ms); the sums agree to fp32 rounding."""
    total = torch.promote_types(y.dtype, torch.float32)
    columns = pos.t()  # (k, N)
    out = y.index_select(0, columns[0]).to(total)
    for column in columns[1:]:
        out += y.index_select(0, column)
    return out


class SpreadRows(torch.autograd.Function):
    """`spread_rows` with `collect_rows` as its backward, which sums each token's k gradient rows in fp32.
    Autograd's own would cast the (S, D) gradient to x's dtype, zero-fill an (N, D) buffer and scatter-add
    into it; and the forward would cast the k-fold gathered rows rather than x itself."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, token: torch.Tensor, pos: torch.Tensor, dtype: torch.dtype):
        ctx.save_for_backward(pos)
        ctx.x_dtype = x.dtype
        return spread_rows(x, token, dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        (pos,) = ctx.saved_tensors
        return collect_rows(grad, pos).to(ctx.x_dtype), None, None, None


class CollectRows(torch.autograd.Function):
    """`collect_rows` (fp32 out) with `spread_rows` as its backward, in y's dtype: the adjoint pair of
    SpreadRows, for the combine. Padding rows, which no token collects, get a zero gradient."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, token: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(token)
        ctx.dtype = y.dtype
        return collect_rows(y, pos)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (token,) = ctx.saved_tensors
        return spread_rows(grad, token, ctx.dtype), None, None


class PairRows(torch.autograd.Function):
    """out[i] = x[index[i] // k] for a permutation `index` of range(len(x) · k) whose inverse is given:
    every row of x feeds exactly k outputs. The backward is a gather too, grad[inverse] summed over each
    row's k copies, where autograd's own would zero-fill an (S, D) buffer and scatter-add into it (atomics
    on GPU). k = 1 is a plain row permutation."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor, k: int) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        ctx.k = k
        return x[index // k] if k > 1 else x[index]

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        (inverse,) = ctx.saved_tensors
        rows = grad[inverse]
        if ctx.k > 1:
            rows = rows.view(-1, ctx.k, grad.shape[-1]).sum(1)
        return rows, None, None, None


class GroupedExperts(nn.Module):
    """E SwiGLU experts stored stacked, in transformers' in-memory layout:
    gate_up_proj (E, 2I, D) = [gate; up] and down_proj (E, D, I)."""

    def __init__(self, n_experts: int, dim: int, inter: int) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, 2 * inter, dim))
        self.down_proj = nn.Parameter(torch.empty(n_experts, dim, inter))

    def forward(
        self, x: torch.Tensor, counts: torch.Tensor, scale: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x (S, D) sorted by expert, counts (E,) rows per expert -> (S, D). `scale` (S, 1), if given,
        multiplies each row's output: applied to the (S, I) SwiGLU activations before the linear down
        projection, which is the same product on I instead of D values per row (D/I = 4 for `tiny`,
        2 for `small`, 3.5 for V3), forward and backward. In bf16 that adds one rounding (of w·act) to
        the output's; in fp16 the output is scaled instead, as w·act could underflow there."""
        offsets = counts.cumsum(0).to(torch.int32)
        gate, up = grouped_mm(x, self.gate_up_proj.transpose(-2, -1), offsets, counts).chunk(2, dim=-1)
        act = F.silu(gate) * up
        down = self.down_proj.transpose(-2, -1)
        if scale is None:
            return grouped_mm(act, down, offsets, counts)
        if act.dtype == torch.float16:  # w·act may fall below fp16's normal range: scale the output in fp32
            return grouped_mm(act, down, offsets, counts) * scale
        return grouped_mm(act * scale, down, offsets, counts)  # fp32 product, rounded to bf16 by the cast


class MoE(nn.Module):
    """Shared experts + routed experts. Returns the output, the per-expert token counts of this call and
    the α-weighted sequence-wise balance loss (0 when α == 0)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        E = cfg.n_routed_experts
        self.gate = nn.Linear(cfg.hidden_size, E, bias=False)  # router; applied in fp32
        self.register_buffer("e_score_correction_bias", torch.zeros(E, dtype=torch.float32), persistent=True)
        self.experts = GroupedExperts(E, cfg.hidden_size, cfg.moe_intermediate_size)
        shared_inter = cfg.moe_intermediate_size * cfg.n_shared_experts
        self.shared_experts = MLP(cfg.hidden_size, shared_inter) if cfg.n_shared_experts else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, T, D = x.shape
        k, E = self.cfg.num_experts_per_tok, self.cfg.n_routed_experts
        flat = x.reshape(B * T, D)
        with torch.autocast(x.device.type, enabled=False):  # the router stays fp32 under autocast too
            logits = F.linear(flat.float(), self.gate.weight.float())  # (N, E)
            weights, idx, scores = route(
                logits, self.e_score_correction_bias, self.cfg
            )  # (N, k), (N, k), (N, E)

        # Sort the N*k (token, expert) pairs by expert; stable, so ties keep token order (deterministic).
        # int32 keys: a GPU radix sort makes half the passes of int64's.
        expert_sorted, order = idx.reshape(-1).to(torch.int32).sort(stable=True)  # (S,) with S = N*k
        experts = torch.arange(E, device=x.device, dtype=torch.int32)
        ends = torch.searchsorted(expert_sorted, experts, right=True)  # (E,) int64
        counts = torch.diff(ends, prepend=ends.new_zeros(1))  # (E,) int64, no host sync
        w_sorted = weights.reshape(-1)[order, None]  # (S, 1) fp32 combine weights
        if _index_add_is_deterministic(x.device):
            # Gather each pair's token row, scatter-add the weighted results back: the cheapest form,
            # and deterministic where index_add_ (also the gather's backward) accumulates serially.
            token = order // k  # (S,) token row of each sorted pair
            dtype = gemm_dtype(x, self.experts.down_proj)
            if _pads_groups(dtype, token.shape[0], E):
                # Padding rows read a zero row (0 out of every expert, where a real token's row might
                # overflow one). The rows move in the GEMMs' dtype, both ways; sums over k run in fp32.
                padded = pad_groups(token, w_sorted, expert_sorted, counts, CPU_GROUP_ROWS, pad_token=B * T)
                token, w_sorted, group_counts, position = padded
                pos = torch.empty_like(position).scatter_(0, order, position).view(B * T, k)  # token's rows
                x_sorted = SpreadRows.apply(flat, token, pos, dtype)
                y_sorted = self.experts(x_sorted, group_counts, scale=w_sorted)  # (S, D) = w·y
                routed = CollectRows.apply(y_sorted, token, pos)  # (N, D) fp32: Σ_k w_k y_k
            else:
                x_sorted = flat.index_select(0, token)
                y_sorted = self.experts(x_sorted, counts, scale=w_sorted)  # (S, D) = w·y
                routed = flat.new_zeros(B * T, D, dtype=torch.float32).index_add_(0, token, y_sorted.float())
        else:
            # Gathers both ways (see `PairRows`): deterministic on GPU, no atomic scatter-add, no zero fill.
            inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=x.device))
            x_sorted = PairRows.apply(flat, order, inverse, k)  # (S, D): row i = token order[i] // k
            y_sorted = self.experts(x_sorted, counts, scale=w_sorted)  # (S, D) = w·y
            y_pairs = PairRows.apply(y_sorted, inverse, order, 1).view(B * T, k, D)  # back to pair order
            routed = y_pairs.sum(1, dtype=torch.float32)  # (N, D) fp32: Σ_k w_k y_k
        routed = routed.to(x.dtype).view(B, T, D)

        out = routed + self.shared_experts(x) if self.shared_experts is not None else routed
        balance = self._balance_loss(scores.view(B, T, E), idx.view(B, T, k))
        return out, counts.detach(), balance

    def _balance_loss(self, scores: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Sequence-wise balance loss of DeepSeek-V3 (eq. 17-20): α Σ_i f_i P_i per sequence, batch mean.
        f_i = E/(k T) · #tokens routed to i, P_i = mean over tokens of the normalized affinity s_i/Σ_j s_j."""
        alpha = self.cfg.seq_aux_loss_alpha
        if alpha == 0:
            return scores.new_zeros(())
        B, T, E = scores.shape
        k = idx.shape[-1]
        with torch.no_grad():
            hits = torch.zeros(B, E, device=scores.device).scatter_add_(
                1, idx.reshape(B, T * k), torch.ones(B, T * k, device=scores.device)
            )
            f = hits * (E / (k * T))  # (B, E)
        p = (scores / scores.sum(-1, keepdim=True)).mean(1)  # (B, E)
        return alpha * (f * p).sum(-1).mean()
