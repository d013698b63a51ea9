"""In-process A/B of the eager bf16 step: 'old' swaps in modules from /tmp/s/old (ce_old.py, ...)."""
import sys, dataclasses, statistics, time, argparse, torch
sys.path.insert(0, "/work/main/bench"); sys.path.insert(0, "/tmp/s/old")
from bench_step import make_step
from seektrain.model.config import ModelConfig
from seektrain.model.transformer import Transformer
from seektrain.train.host_memory import keep_freed_host_memory
import ce_old
torch.set_num_threads(1); keep_freed_host_memory()
B, T = (int(sys.argv[1]), int(sys.argv[2])) if len(sys.argv) > 2 else (4, 256)
rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 10
cfg = dataclasses.replace(ModelConfig.from_preset("tiny"), num_mtp_layers=0, max_position_embeddings=4096)
torch.manual_seed(0)
tok = torch.randint(0, cfg.vocab_size, (B, T + 1)); x, y = tok[:, :-1].contiguous(), tok[:, 1:].contiguous()
def build(old):
    torch.manual_seed(0); m = Transformer(cfg)
    if old:
        m.cross_entropy = ce_old.LinearCrossEntropy()
        try:
            import old_patch; old_patch.apply(m)
        except ImportError:
            pass
    return m
args = argparse.Namespace(precision="bf16", no_optimizer=False)
models = {"old": build(True), "new": build(False)}
steps = {k: make_step(m, x, y, args, False) for k, m in models.items()}
for k, s in steps.items():
    for _ in range(10): s()
times = {k: [] for k in steps}
for r in range(rounds):
    for k, s in steps.items():
        t0 = time.thread_time()
        for _ in range(3): s()
        times[k].append((time.thread_time() - t0) / 3)
for k in steps: print(k, "median ms", round(statistics.median(times[k]) * 1e3, 1), "min", round(min(times[k]) * 1e3, 1))
print("old/new", round(statistics.median(times["old"]) / statistics.median(times["new"]), 3))
with torch.no_grad():
    for k, m in models.items():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            print(k, "loss after training", m(x, y).loss.item())
