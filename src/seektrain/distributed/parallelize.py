"""Applied to the model from outside: activation checkpointing, torch.compile, DDP or FSDP2.

The model stays single-device and unaware of any of them. Order (as torchtitan): checkpointing wraps
each block's forward, compile compiles each block, then FSDP2 `fully_shard`s each block and the root
(or DDP wraps the whole). None of them renames a parameter (FSDP2 swaps parameters for DTensors in
place; DDP's `module.` prefix is stripped by `unwrap`), so checkpoints load with or without them.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts


def blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks: main layers and each MTP module's block."""
    return [*model.layers, *(m.block for m in model.mtp)]


# Ops whose outputs selective checkpointing keeps: the GEMMs and attention (costly to recompute). Everything
# else in a block (norms, RoPE, SwiGLU, routing, permutations, residuals) is recomputed in the backward.
_SAVED_OPS = tuple(
    op.default
    for name in (
        "mm",
        "addmm",
        "bmm",
        "_grouped_mm",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
    )
    if (op := getattr(torch.ops.aten, name, None)) is not None
)


def _keep_gemm_outputs(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def apply_activation_checkpointing(model: torch.nn.Module, mode: str = "full") -> None:
    """Recompute block activations in the backward pass: `full` keeps only each block's input, `selective`
    also keeps the outputs of its GEMMs and attention and recomputes only the cheap elementwise work.
    The block's returned expert counts come from the first forward only (recomputation outputs are
    discarded), so loads are counted once."""
    if mode not in ("full", "selective"):
        raise ValueError(f"activation checkpointing mode {mode!r}: expected full or selective")
    options = {}
    if mode == "selective":
        options["context_fn"] = functools.partial(create_selective_checkpoint_contexts, _keep_gemm_outputs)
    for block in blocks(model):
        forward = block.forward

        def checkpointed(*args, _forward=forward, **kwargs):
            return checkpoint(_forward, *args, use_reentrant=False, **options, **kwargs)

        block.forward = checkpointed


def apply_compile(model: torch.nn.Module, backend: str = "inductor", cuda_graphs: bool = False) -> None:
    """torch.compile each block and the loss head in place (module.compile keeps parameter names).
    `backend="aot_eager"` traces the same graphs without generating kernels (what tests need).

    `cuda_graphs`: each block's forward and backward are recorded once as CUDA graphs and replayed
    (inductor's `reduce-overhead` mode), so the host no longer launches their kernels one by one: the
    step stops waiting on Python. Inputs from outside the graphs are copied into static buffers, which is
    why the loss head (head GEMM + cross-entropy over all the final hidden states) stays a plain compiled
    function. On CPU inductor skips the recording and runs the compiled code."""
    mode = "reduce-overhead" if cuda_graphs else None
    for block in blocks(model):
        block.compile(backend=backend, mode=mode)
    model.cross_entropy.compile(backend=backend)


def apply_ddp(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Replicate the model; gradients are averaged across ranks in buckets during the backward.
    Buffers are not broadcast: the MoE correction biases are kept identical by the trainer (the same
    all-reduced loads update them on every rank)."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    # torch 2.13 renamed broadcast_buffers (deprecated there, the only name before)
    buffer_sync = (
        "forward_sync_buffers"
        if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
        else "broadcast_buffers"
    )
    return DistributedDataParallel(model, device_ids=ids, **{buffer_sync: False})


def apply_fsdp(model: torch.nn.Module, mesh, precision: str) -> torch.nn.Module:
    """FSDP2: shard each block's parameters (and the root's remainder: embedding, norm, head) over the
    mesh; a 2-D mesh (replicate, shard) gives hybrid sharding. With bf16 the parameters are gathered in
    bf16 and gradients reduced in fp32 onto fp32 shards (the optimizer's master weights)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy()
    if precision == "bf16":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in blocks(model):  # MTP: only its block (its norms are also called outside its forward)
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def materialize(model: torch.nn.Module, device, mesh=None, precision: str = "fp32") -> torch.nn.Module:
    """Allocate and initialize a model built on the meta device. With a mesh, FSDP2 shards it first, so
    each rank allocates and initializes only its shards, with the weights one process would give them
    (`model/init.py`)."""
    if mesh is not None:
        apply_fsdp(model, mesh, precision)
    model.to_empty(device=device)
    model.init_weights()
    return model


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model itself under a DDP wrapper (FSDP2 adds none)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


@contextlib.contextmanager
def gradient_sync(model: torch.nn.Module, enabled: bool):
    """Skip the gradient all-reduce / reduce-scatter inside the block (all accumulation micro-steps but
    the last): gradients accumulate locally and are synchronized once, by the last backward."""
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel

    if enabled:
        yield
    elif isinstance(model, DistributedDataParallel):
        with model.no_sync():
            yield
    elif isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield
