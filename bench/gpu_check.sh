#!/usr/bin/env bash
# One prepared run on a lent GPU: correctness first, then seektrain's training step beside the transformers
# peer on the same card. Installs nothing; runs from source on the machine's torch/transformers.
# Needs the peer script copied to .gpu/peer_transformers.py (git-ignored, carried).
# Usage: bash bench/gpu_check.sh   (writes logs to $OUT if set, else ./gpu_out)
set -uo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONPATH=src PYTHONUNBUFFERED=1
PY=${PY:-python3}
B=${B:-8}; T=${T:-2048}; STEPS=${STEPS:-10}; PRESET=${PRESET:-small}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"

echo "== correctness"; $PY bench/gpu_check.py | tee "$OUT/check.jsonl"

bench() { timeout "${1}" $PY -m seektrain bench --json --batch "$B" --seq "$T" --steps "$STEPS" "${@:2}" | tee -a "$OUT/bench.jsonl"; }
echo "== seektrain small (MoE)"
bench 150 --preset "$PRESET" --compile
echo "== transformers peer"
timeout 150 $PY .gpu/peer_transformers.py ${PEER_ARGS:-} | tee "$OUT/peer.txt"
bench 90 --preset "$PRESET"
echo "== seektrain dense (MoE off, 24 layers ~ the 375M Llama peer)"
bench 150 --preset "$PRESET" --dense --layers "${DENSE_LAYERS:-24}" --compile
[ -n "${EXTRA:-}" ] && eval "$EXTRA"


echo "== summary"
$PY - "$OUT" <<'PYEOF'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
print(open(out / "gpu.txt").read().strip())
for line in open(out / "check.jsonl"):
    print(line.strip())
print("case | compile | AC | tok/s | TFLOP/s | MFU(989) | peak GiB")
for line in open(out / "bench.jsonl"):
    r = json.loads(line)
    print(f"seektrain {r['preset']} | {r['compile']} | {r['activation_checkpointing']} | {r['tokens_per_s']} | {r['tflops']} | {r['mfu']} | {r['peak_mem_gib']}")
peer = [l for l in open(out / "peer.txt") if l.startswith("hf_") and "|" in l]
print("".join(peer).strip())
PYEOF
