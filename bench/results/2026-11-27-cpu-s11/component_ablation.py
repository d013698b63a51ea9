"""Where the eager bf16 `tiny` step's time goes, for seektrain and for transformers' DeepseekV3 (grouped_mm
experts, SDPA): each model is timed whole and with one part replaced by a stub of negligible cost — the
loss head (logits + cross-entropy), attention (all but o_proj), the routed experts (the shared ones stay) —
and with all three stubbed (the skeleton: embedding, norms, dense MLP, shared experts, clip + AdamW). The
drop in step time is the part's cost inside a real step. Cases alternate round by round in one process.

A scratch harness, kept as the record of the tenth CPU pass. Run:
    PYTHONPATH=src:bench python bench/results/2026-11-27-cpu-s11/component_ablation.py [ROUNDS]
"""

import argparse
import dataclasses
import statistics
import sys
import time
import types

import torch
from bench_step import make_step
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

from seektrain.model.attention import MLA
from seektrain.model.config import ModelConfig
from seektrain.model.hf import hf_config
from seektrain.model.moe import MoE
from seektrain.model.transformer import Transformer
from seektrain.train.host_memory import keep_freed_host_memory

PARTS = ("head", "attention", "experts")
VARIANTS = {
    "full": (),
    "no head": ("head",),
    "no attention": ("attention",),
    "no experts": ("experts",),
    "skeleton": PARTS,
}


class StubLoss(torch.nn.Module):
    """Stands in for seektrain's LinearCrossEntropy: one pass over h, the head weight kept in the graph."""

    def forward(self, hs, weight, targets):
        return torch.stack([hs[0].float().square().sum() + 0 * weight.sum()]), torch.stack(
            [(targets[0] != -100).sum()]
        )


def stub_attention(self, *args, **kwargs):
    x = args[0] if args else kwargs["hidden_states"]  # transformers passes it by name
    out = self.o_proj(x[..., : self.o_proj.in_features])
    return out if isinstance(self, MLA) else (out, None)


def seektrain_model(cfg: ModelConfig, stubs: tuple[str, ...]) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(cfg)
    if "head" in stubs:
        model.cross_entropy = StubLoss()
    for module in model.modules():
        if "attention" in stubs and isinstance(module, MLA):
            module.forward = types.MethodType(stub_attention, module)
        if "experts" in stubs and isinstance(module, MoE):
            module.forward = types.MethodType(shared_experts_only, module)
    return model


def shared_experts_only(self: MoE, h: torch.Tensor):
    counts = torch.zeros(self.cfg.n_routed_experts, dtype=torch.long)
    return self.shared_experts(h), counts, h.new_zeros(())


def transformers_step(cfg: ModelConfig, stubs: tuple[str, ...], x: torch.Tensor):
    hf = DeepseekV3Config(**hf_config(cfg, torch.float32))
    hf._attn_implementation, hf._experts_implementation = "sdpa", "grouped_mm"
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(hf)
    for i, layer in enumerate(model.model.layers):
        if "attention" in stubs:
            layer.self_attn.forward = types.MethodType(stub_attention, layer.self_attn)
        if "experts" in stubs and i >= cfg.first_k_dense_replace:
            layer.mlp.forward = types.MethodType(lambda self, h: self.shared_experts(h), layer.mlp)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step() -> None:  # bench_step.make_step's step, with the head optionally stubbed
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if "head" in stubs:
                h = model.model(input_ids=x).last_hidden_state
                loss = h.float().square().sum() + 0 * model.lm_head.weight.sum()
            else:
                loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def main() -> None:
    torch.set_num_threads(1)
    keep_freed_host_memory()
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 8
    cfg = dataclasses.replace(ModelConfig.from_preset("tiny"), num_mtp_layers=0, max_position_embeddings=4096)
    torch.manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (4, 257))
    x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    args = argparse.Namespace(precision="bf16", no_optimizer=False)
    steps = {}
    for name, stubs in VARIANTS.items():
        steps["seektrain", name] = make_step(seektrain_model(cfg, stubs), x, y, args, False)
        steps["transformers", name] = transformers_step(cfg, stubs, x)
    for step in steps.values():
        for _ in range(8):
            step()
    times: dict[tuple[str, str], list[float]] = {key: [] for key in steps}
    for _ in range(rounds):
        for key, step in steps.items():
            start = time.perf_counter()
            for _ in range(3):
                step()
            times[key].append((time.perf_counter() - start) / 3 * 1e3)
    ms = {key: statistics.median(measured) for key, measured in times.items()}
    print("variant | seektrain ms | transformers ms | seektrain part | transformers part | ratio")
    for name in VARIANTS:
        ours, peer = ms["seektrain", name], ms["transformers", name]
        part_ours, part_peer = ms["seektrain", "full"] - ours, ms["transformers", "full"] - peer
        ratio = f"{part_peer / part_ours:.2f}x" if name != "full" else f"{peer / ours:.2f}x (whole step)"
        if name == "skeleton":
            ratio = f"{peer / ours:.2f}x (skeleton)"
        print(f"{name} | {ours:.1f} | {peer:.1f} | {part_ours:.1f} | {part_peer:.1f} | {ratio}")


if __name__ == "__main__":
    main()
