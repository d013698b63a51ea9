"""Forward+backward throughput of our `small` model vs transformers' DeepseekV3ForCausalLM (same dims).

Not a test: run by hand on a GPU, `python tests/model/speed_vs_transformers.py [--compile] [--profile]`.
bf16 autocast over fp32 weights, B=8, T=2048, no optimizer (the model's share of a step).
"""

import dataclasses
import sys
import time

import torch

from seektrain.model.config import ModelConfig
from seektrain.model.hf import hf_config
from seektrain.model.transformer import Transformer


def timeit(step, warmup=3, iters=6):
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / iters


def main():
    B, T = 8, 2048
    torch.manual_seed(0)
    tokens = torch.randint(0, 32768, (B, T + 1), device="cuda")
    x, y = tokens[:, :-1], tokens[:, 1:]
    results = {}
    for mtp in (0, 1):
        cfg = dataclasses.replace(ModelConfig.from_preset("small"), num_mtp_layers=mtp)
        with torch.device("cuda"):
            model = Transformer(cfg)
        if "--compile" in sys.argv:
            for i, block in enumerate(model.layers):
                model.layers[i] = torch.compile(block)

        def step(model=model):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = model(x, y)
            out.loss.backward()

        results[f"ours mtp={mtp}"] = timeit(step)
        if "--profile" in sys.argv and mtp == 1:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                step()
                torch.cuda.synchronize()
            table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30)
            print(table)
        n_active = cfg.num_active_params()
        del model
        torch.cuda.empty_cache()

    import transformers

    cfg = dataclasses.replace(ModelConfig.from_preset("small"), num_mtp_layers=0)
    d = hf_config(cfg, torch.float32)
    d = {k: v for k, v in d.items() if k not in ("architectures", "model_type")}
    hf_cfg = transformers.DeepseekV3Config(**d)
    hf_cfg._attn_implementation = "sdpa"
    hf_cfg._experts_implementation = "grouped_mm"
    with torch.device("cuda"):
        hf = transformers.DeepseekV3ForCausalLM(hf_cfg)

    def hf_step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = hf(input_ids=x, labels=tokens[:, 1:])  # HF shifts labels itself; the cost is the same
        out.loss.backward()

    results["transformers"] = timeit(hf_step)
    attn = 6 * cfg.num_hidden_layers * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * T
    flops = 6 * n_active + attn  # design.md's FLOPs/token
    for name, s in results.items():
        tps = B * T / s
        print(f"{name:16s} {s * 1e3:8.1f} ms/step {tps:10.0f} tok/s {tps * flops / 1e12:6.1f} TFLOP/s")
    mem = torch.cuda.max_memory_allocated() / 2**30
    print(torch.cuda.get_device_name(), torch.__version__, f"max mem {mem:.1f} GiB")


if __name__ == "__main__":
    main()
