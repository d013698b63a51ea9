#!/usr/bin/env bash
# One prepared run on a lent GPU: correctness first, then seektrain's training step beside the transformers
# peer on the same card. Installs nothing; runs from source on the machine's torch/transformers.
# Needs the peer script copied to .gpu/peer_transformers.py (git-ignored, carried).
# Usage: bash bench/gpu_check.sh   (writes logs to $OUT if set, else ./gpu_out); ~8 minutes on an H200.
#   SECTIONS="check small peer dense tests"  run only these sections, in the script's order (default: check
#                                         small bf16 peer dense tests; the device's time may call for two
#                                         calls on the same warm machine)
#   sections beyond the default, named in SECTIONS or switched on by their variable:
#   baseline  (BASELINE_SRC=.gpu/base/src) the same graphed step with an older source tree
#                                         (e.g. `git archive <rev> src | tar -x -C .gpu/base`) for an A/B
#   optimizer (OPTIMIZER=1)                bench/bench_optimizer.py (the update alone; ~3 min, compiles)
#   full      (FULL=1)                     small compiled without CUDA graphs, and eager (~3 min)
#   checkpointing (CHECKPOINTING=1)        activation checkpointing's trade-off (none / full / selective,
#                                         bench/bench_checkpointing.py, ~3 min: each mode compiles)
#   EXTRA='bash bench/dist_gpu_check.sh'  also runs the one-GPU FSDP2 check (issue 5) after the benchmarks
set -uo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONPATH=src PYTHONUNBUFFERED=1
PY=${PY:-python3}
B=${B:-8}; T=${T:-2048}; STEPS=${STEPS:-10}; PRESET=${PRESET:-small}
SECTIONS=" ${SECTIONS:-check small bf16 peer dense tests} "
[ -n "${BASELINE_SRC:-}" ] && SECTIONS+="baseline "
[ -n "${OPTIMIZER:-}" ] && SECTIONS+="optimizer "
[ -n "${FULL:-}" ] && SECTIONS+="full "
[ -n "${CHECKPOINTING:-}" ] && SECTIONS+="checkpointing "
on() { [[ "$SECTIONS" == *" $1 "* ]]; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"

# In order of what matters most, so that a run cut short by the device's time limit keeps the essentials.
on check && echo "== correctness" && timeout 120 $PY bench/gpu_check.py | tee "$OUT/check.jsonl"

bench() { timeout "${1}" $PY -m seektrain bench --json --batch "$B" --seq "$T" --steps "$STEPS" "${@:2}" | tee -a "$OUT/bench.jsonl"; }
# (both profiles go to one file: a call brings back at most 8 files from $OUT)
if on small; then
  echo "== seektrain small (MoE), compiled, CUDA graphs, with a profile of one step"
  echo "== small" >> "$OUT/profiles.txt"
  bench 180 --preset "$PRESET" --cuda-graphs --profile 40 2> >(tail -n 55 >> "$OUT/profiles.txt")
fi
if on bf16; then
  echo "== seektrain small (MoE), compiled, CUDA graphs, AdamW moments in bf16 (optim.state_dtype)"
  bench 150 --preset "$PRESET" --cuda-graphs --optimizer-states bf16
fi
if ! on peer; then :
elif [ -f .gpu/peer_transformers.py ]; then
  echo "== transformers peer"
  timeout 150 $PY .gpu/peer_transformers.py ${PEER_ARGS:-} | tee "$OUT/peer.txt"
else
  echo "skipped: copy the team's shared/bench/peer_transformers.py to .gpu/ first"
fi
if on dense; then
  echo "== seektrain dense (MoE off, 24 layers ~ the 375M Llama peer), compiled, CUDA graphs, with a profile"
  echo "== dense" >> "$OUT/profiles.txt"
  bench 150 --preset "$PRESET" --dense --layers "${DENSE_LAYERS:-24}" --cuda-graphs --profile 30 \
    2> >(tail -n 45 >> "$OUT/profiles.txt")
fi
if on tests; then
  echo "== GPU tests"
  timeout 150 $PY -m pytest -q -p no:cacheprovider -p no:warnings --tb=short tests/model/test_gpu.py 2>&1 \
    | tail -n 40 | tee "$OUT/pytest_gpu.txt"
fi
if on baseline; then
  echo "== baseline source tree (${BASELINE_SRC:-.gpu/base/src}): small, compiled, CUDA graphs"
  PYTHONPATH="${BASELINE_SRC:-.gpu/base/src}" timeout 150 $PY -m seektrain bench --json --batch "$B" --seq "$T" --steps "$STEPS" \
    --preset "$PRESET" --cuda-graphs | tee "$OUT/bench_baseline.jsonl"
fi
if on optimizer; then  # compiling its two one-pass cases took over 2 minutes on a fresh H200
  echo "== optimizer: torch fused + clip pass against the one-pass AdamW (clip folded; fp32, bf16 moments)"
  timeout 240 $PY bench/bench_optimizer.py | tee "$OUT/optimizer.txt"
fi
if on full; then
  echo "== seektrain small: compiled without CUDA graphs, and eager"
  bench 180 --preset "$PRESET" --compile
  bench 180 --preset "$PRESET" --no-compile
fi
if on checkpointing; then
  echo "== activation checkpointing: none / full / selective"
  timeout 300 $PY bench/bench_checkpointing.py | tee "$OUT/checkpointing.txt"
fi
[ -n "${EXTRA:-}" ] && eval "$EXTRA"

echo "== summary"
$PY - "$OUT" <<'PYEOF'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
print(open(out / "gpu.txt").read().strip())
for name in ("check.jsonl", "optimizer.txt", "checkpointing.txt"):
    for line in open(out / name) if (out / name).exists() else []:
        print(line.strip())
print("case | compile | CUDA graphs | graph breaks | tok/s | TFLOP/s | MFU(989) | peak GiB")
for name in ("bench.jsonl", "bench_baseline.jsonl"):
    path = out / name
    for line in open(path) if path.exists() else []:
        r = json.loads(line)
        tag = " (baseline src)" if name != "bench.jsonl" else ""
        tag += " (bf16 moments)" if r.get("optimizer_states") == "bf16" else ""
        print(f"seektrain {r['preset']}{tag} | {r['compile']} | {r.get('cuda_graphs')} (skips {r.get('cudagraph_skips')}) | {r.get('graph_breaks')}"
              f" | {r['tokens_per_s']}"
              f" | {r['tflops']} | {r['mfu']} | {r['peak_mem_gib']}")
peer = [l for l in open(out / "peer.txt") if l.startswith("hf_") and "|" in l] if (out / "peer.txt").exists() else []
print("".join(peer).strip())
dist = out / "dist.jsonl"
if dist.exists():
    print("FSDP2 (torchrun, 1 rank) metrics:", dist.read_text().strip())
PYEOF
