"""Time real training steps (forward, backward, clip, optimizer, expert-bias update) of a preset on
whatever device is present.

The step is the trainer's own (`Stepper`), so what the benchmark speeds up, training speeds up. Tokens
are random ids (the speed of a step does not depend on the text). MFU uses design.md's FLOPs/token over
the detected GPU's dense bf16 peak; on CPU no MFU is reported. With compile, the number of graph breaks is
reported too (each one costs fusions and a trip back to Python).
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch._dynamo.utils import counters

from seektrain.config import OptimConfig, TrainConfig
from seektrain.distributed.parallelize import apply_activation_checkpointing, apply_compile
from seektrain.errors import UserError
from seektrain.host_limits import fit_torch_threads
from seektrain.model.config import ModelConfig
from seektrain.model.transformer import Transformer
from seektrain.paths import atomic_write
from seektrain.train.balance import update_expert_bias
from seektrain.train.host_memory import check_training_state_fits, keep_freed_host_memory
from seektrain.train.metrics import flops_per_token, memory_gib, peak_flops
from seektrain.train.optim import build_optimizer
from seektrain.train.precision import resolve_precision
from seektrain.train.step import Stepper


@dataclass
class BenchConfig:
    preset: str = "small"
    batch: int = 8
    seq: int = 2048
    steps: int = 10
    warmup: int = 3
    precision: str = "auto"  # bf16 where the device computes it natively, else fp32
    compile: bool = False
    cuda_graphs: bool = False  # with compile: replay each block as CUDA graphs
    activation_checkpointing: str = "none"  # none, full or selective
    dense: bool = False  # every layer a dense SwiGLU MLP (MoE off), for the dense peer comparison
    state_dtype: str = "fp32"  # AdamW's moments: fp32 or bf16 (optim.state_dtype)
    layers: int | None = None  # override the preset's layer count (e.g. a dense model of similar size)
    mtp: int = 0  # MTP depth; 0 like the transformers peer, which does not train MTP (and FLOPs omit it)
    profile: int = 0  # > 0: after timing, profile one step and return a table of its top `profile` kernels
    trace: str | None = None  # with profile: also write that step's Chrome trace here
    seed: int = 0


def bench_model_config(cfg: BenchConfig) -> ModelConfig:
    """The preset's dimensions at the benchmark's context length, with the layer/MTP/dense overrides."""
    model_cfg = ModelConfig.from_preset(cfg.preset)
    n_layers = cfg.layers or model_cfg.num_hidden_layers
    return dataclasses.replace(
        model_cfg,
        num_hidden_layers=n_layers,
        first_k_dense_replace=n_layers if cfg.dense else min(model_cfg.first_k_dense_replace, n_layers),
        num_mtp_layers=cfg.mtp,
        max_position_embeddings=max(cfg.seq, model_cfg.max_position_embeddings),
    )


def run_bench(cfg: BenchConfig, device: torch.device | None = None) -> dict:
    """Build the model, warm up, time `cfg.steps` steps; return one flat dict of figures."""
    if cfg.cuda_graphs and not cfg.compile:
        raise ValueError("cuda_graphs replays the compiled blocks: set compile too")
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        keep_freed_host_memory()  # as the trainer does
        fit_torch_threads()
    precision = resolve_precision(cfg.precision, device)
    model_cfg = bench_model_config(cfg)
    optim_cfg = OptimConfig(state_dtype=cfg.state_dtype)
    if device.type == "cpu":
        check_training_state_fits(
            model_cfg.num_params(include_mtp=True),
            state_bytes=optim_cfg.state_bytes_per_param(),
            what=f"--preset {cfg.preset}",
            hint="lower --layers or use a smaller --preset",
        )
    torch.manual_seed(cfg.seed)
    with torch.device(device):
        model = Transformer(model_cfg)
    if cfg.activation_checkpointing != "none":
        apply_activation_checkpointing(model, cfg.activation_checkpointing)
    if cfg.compile:
        counters["graph_break"].clear()
        counters["inductor"].clear()
        apply_compile(model, cuda_graphs=cfg.cuda_graphs)
    optimizer = build_optimizer(model, optim_cfg)
    stepper = Stepper(model, optimizer, precision, device, grad_clip=1.0, cuda_graphs=cfg.cuda_graphs)
    gen = torch.Generator().manual_seed(cfg.seed)
    tokens = torch.randint(0, model_cfg.vocab_size, (cfg.batch, cfg.seq + 1), generator=gen)
    batch = [(tokens[:, :-1], tokens[:, 1:])]  # on the CPU, where the trainer's loader delivers them
    speed = TrainConfig().bias_update_speed

    def step() -> float:
        stats = stepper.forward_backward(batch, model_cfg.mtp_loss_weight, model_cfg.num_mtp_layers)
        stepper.clip()
        if stepper.apply(1e-4):  # as the trainer: no bias update for a step the fp16 scaler skipped
            update_expert_bias(model.moe_layers(), stats.expert_counts, speed)
            update_expert_bias(model.mtp_moe_layers(), stats.mtp_expert_counts, speed)
        return stats.loss

    if device.type == "cuda":
        # The peak covers the warm-up too (as the peer's does): CUDA graphs are recorded there, and their
        # memory pool is reused by every replay without being allocated again.
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(cfg.warmup):
        step()
    _sync(device)
    marks = [time.perf_counter()]
    for _ in range(cfg.steps):
        loss = step()
        _sync(device)  # the optimizer's kernels are queued after the loss is read: each step whole
        marks.append(time.perf_counter())
    times = sorted(b - a for a, b in zip(marks, marks[1:], strict=False))
    step_s = statistics.median(times)  # what other processes took of the machine moves it least

    table = profile_table(step, device, cfg.profile, cfg.trace) if cfg.profile else None

    tokens_per_s = cfg.batch * cfg.seq / step_s
    tflops = tokens_per_s * flops_per_token(model_cfg, cfg.seq) / 1e12
    peak = peak_flops(device)
    return {
        "preset": cfg.preset + ("-dense" if cfg.dense else ""),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": None if device.type == "cuda" else torch.get_num_threads(),  # intra-op, on CPU
        "precision": precision,
        "compile": cfg.compile,
        "cuda_graphs": cfg.cuda_graphs,
        "activation_checkpointing": cfg.activation_checkpointing,
        "optimizer_states": cfg.state_dtype,
        "batch": cfg.batch,
        "seq": cfg.seq,
        "total_params_M": round(model_cfg.num_params() / 1e6, 1),
        "active_params_M": round(model_cfg.num_active_params() / 1e6, 1),
        "step_ms": round(step_s * 1e3, 1),
        "spread": round((times[-1] - times[0]) / step_s, 3),  # (slowest - fastest) / median
        "tokens_per_s": round(tokens_per_s),
        "tflops": round(tflops, 2),
        "mfu": round(tflops * 1e12 / peak, 4) if peak else None,
        "peak_mem_gib": round(memory_gib(device), 2),  # on CPU the process's peak RSS, as in the trainer
        "loss": round(loss, 4),
        "graph_breaks": sum(counters["graph_break"].values()) if cfg.compile else None,
        # graphs inductor declined to record (reasons in its log); the code then runs without them
        "cudagraph_skips": counters["inductor"]["cudagraph_skips"] if cfg.cuda_graphs else None,
        **({"profile": table} if table else {}),
    }


def profile_table(
    step: Callable[[], object], device: torch.device, rows: int, trace: str | None = None
) -> str:
    """torch.profiler table of one step, by self time on the device (CPU time on CPU). On a GPU it starts
    with how long the device was busy during the step: the rest is time it waited for the host. `trace`:
    also write the step's timeline (Chrome trace JSON, for Perfetto or chrome://tracing)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        start = time.perf_counter()
        step()
        _sync(device)
        wall_ms = (time.perf_counter() - start) * 1e3
    if trace:
        write_trace(prof, trace)
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort_by, row_limit=rows, max_name_column_width=90)
    if device.type != "cuda":
        return table
    busy_ms = busy_time(device_intervals(prof.events())) / 1e3
    busy = f"device busy {busy_ms:.1f} ms ({busy_ms / wall_ms:.0%})"
    return f"one profiled step: {wall_ms:.1f} ms, {busy}\n{table}"


def write_trace(prof: torch.profiler.profile, trace: str) -> None:
    """Write the profiled step's Chrome trace to `trace` (to a symlink's target, which the link keeps
    pointing at) through `atomic_write`. The profiler only logs a file it cannot write, so the
    temporary file is created empty first (a folder gone meanwhile fails right there) and an empty one
    tells; the profiler's own temporary (NAME.tmp, renamed to NAME) is removed too."""

    def export(tmp: str) -> None:
        open(tmp, "x").close()
        try:
            prof.export_chrome_trace(tmp)
        finally:
            Path(f"{tmp}.tmp").unlink(missing_ok=True)
        if Path(tmp).stat().st_size == 0:
            raise UserError(f"cannot write the trace {trace}: the profiler wrote nothing")

    try:
        atomic_write(Path(os.path.realpath(trace)), export)
    except OSError as e:
        raise UserError(f"cannot write the trace {trace}: {e.strerror}") from e


def device_intervals(events) -> list[tuple[float, float]]:
    """(start, end) of the profiler events that ran on the GPU: kernels and copies, not the annotation
    ranges (e.g. inductor's `## Call CompiledFxGraph ##`) that span the gaps between them."""
    return [
        (e.time_range.start, e.time_range.end)
        for e in events
        if e.device_type.name == "CUDA" and not getattr(e, "is_user_annotation", False)
    ]


def busy_time(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals: device time with at least one kernel running."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
