"""In-process A/B: the eager bf16 `tiny` step with 559beb4's loss head, MoE forward and RMSNorm (old) against
the working tree's (new). Both models start from the same weights; the cases alternate round by round.

A scratch harness, kept as the record of how the ninth CPU pass was measured. Set up the old side first:
    mkdir -p /tmp/s/old
    git show 559beb4:src/seektrain/model/cross_entropy.py > /tmp/s/old/ce_old.py
    git show 559beb4:src/seektrain/model/moe.py > /tmp/s/old/moe_old.py
    git show 559beb4:src/seektrain/model/layers.py > /tmp/s/old/layers_old.py
Run: PYTHONPATH=src:bench python bench/results/2026-11-27-cpu/ab_step.py B T ROUNDS
"""

import argparse
import dataclasses
import statistics
import sys
import time
import types

import torch
from bench_step import make_step

from seektrain.model import layers, moe
from seektrain.model.config import ModelConfig
from seektrain.model.transformer import Transformer
from seektrain.train.host_memory import keep_freed_host_memory

sys.path.insert(0, "/tmp/s/old")
import ce_old  # noqa: E402
import layers_old  # noqa: E402
import moe_old  # noqa: E402


def build(cfg: ModelConfig, old: bool) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(cfg)
    if old:
        model.cross_entropy = ce_old.LinearCrossEntropy()
        for module in model.modules():
            if isinstance(module, moe.MoE):
                module.forward = types.MethodType(moe_old.MoE.forward, module)
            if isinstance(module, layers.RMSNorm):
                module.forward = types.MethodType(layers_old.RMSNorm.forward, module)
    return model


def main() -> None:
    torch.set_num_threads(1)
    keep_freed_host_memory()
    B, T = (int(sys.argv[1]), int(sys.argv[2])) if len(sys.argv) > 2 else (4, 256)
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 10
    cfg = dataclasses.replace(ModelConfig.from_preset("tiny"), num_mtp_layers=0, max_position_embeddings=4096)
    torch.manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (B, T + 1))
    x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    args = argparse.Namespace(precision="bf16", no_optimizer=False)
    models = {"old": build(cfg, True), "new": build(cfg, False)}
    steps = {name: make_step(model, x, y, args, False) for name, model in models.items()}
    for step in steps.values():
        for _ in range(10):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.thread_time()
            for _ in range(3):
                step()
            times[name].append((time.thread_time() - start) / 3)
    for name, measured in times.items():
        median, best = statistics.median(measured) * 1e3, min(measured) * 1e3
        print(name, "median ms", round(median, 1), "min", round(best, 1))
    print("old/new", round(statistics.median(times["old"]) / statistics.median(times["new"]), 3))
    with torch.no_grad():
        for name, model in models.items():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                print(name, "loss after training", model(x, y).loss.item())


if __name__ == "__main__":
    main()
