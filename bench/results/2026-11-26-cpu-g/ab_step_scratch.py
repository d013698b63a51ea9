"""In-process A/B: the tiny step with a039657's MoE + attention (old) against the working tree's (new).

A scratch harness, kept as the record of how the seventh CPU pass was measured. Set up the old side first:
    mkdir -p /tmp/s && git show a039657:src/seektrain/model/moe.py > /tmp/s/moe_old.py
    git show a039657:src/seektrain/model/attention.py > /tmp/s/attention_old.py
Run: PYTHONPATH=src python ab_step_scratch.py B T ROUNDS {bf16,fp32} [compile]
"""

import dataclasses
import importlib
import statistics
import sys
import time

import torch

import seektrain.model.attention as attn_new
import seektrain.model.moe as moe_new
from seektrain.distributed.parallelize import apply_compile
from seektrain.model.config import ModelConfig
from seektrain.model.transformer import Transformer
from seektrain.train.host_memory import keep_freed_host_memory

sys.path.insert(0, "/tmp/s")
moe_old = importlib.import_module("moe_old")
attention_old = importlib.import_module("attention_old")


class OldMoE(moe_new.MoE):
    forward = moe_old.MoE.forward


class OldExperts(moe_new.GroupedExperts):
    forward = moe_old.GroupedExperts.forward


def make(cfg, old, compile_):
    torch.manual_seed(0)
    m = Transformer(cfg)
    if old:
        for mod in m.modules():
            if isinstance(mod, moe_new.MoE):
                mod.__class__ = OldMoE
                mod.experts.__class__ = OldExperts
    if compile_:
        apply_compile(m)
    return m, torch.optim.AdamW(m.parameters(), lr=1e-4, fused=True)


def main():
    keep_freed_host_memory()
    torch.set_num_threads(1)
    B, T, rounds, prec = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    compile_ = len(sys.argv) > 5 and sys.argv[5] == "compile"
    dt = {"bf16": torch.bfloat16, "fp32": None}[prec]
    cfg = dataclasses.replace(ModelConfig.from_preset("tiny"), num_mtp_layers=0)
    new_block = attn_new._causal_block
    x = torch.randint(0, cfg.vocab_size, (B, T + 1), generator=torch.Generator().manual_seed(1))
    models = {"old": make(cfg, True, compile_), "new": make(cfg, False, compile_)}

    def step(name):
        attn_new._causal_block = attention_old._causal_block if name == "old" else new_block
        m, opt = models[name]
        with torch.autocast("cpu", dtype=dt, enabled=dt is not None):
            loss = m(x[:, :-1], x[:, 1:]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    losses = {n: [step(n) for _ in range(10)] for n in models}
    print("losses after 10 steps", {n: round(v[-1], 5) for n, v in losses.items()})
    res = {n: [] for n in models}
    for r in range(rounds):
        for n in ("old", "new") if r % 2 == 0 else ("new", "old"):
            t = time.perf_counter()
            for _ in range(3):
                step(n)
            res[n].append((time.perf_counter() - t) / 3 * 1e3)
    for n, v in res.items():
        print(n, f"median {statistics.median(v):.1f} ms  min {min(v):.1f}")
    print(f"old/new {statistics.median(res['old']) / statistics.median(res['new']):.3f}")


if __name__ == "__main__":
    main()
