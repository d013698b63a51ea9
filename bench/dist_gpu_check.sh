#!/usr/bin/env bash
# One-GPU check of the torchrun path (issue 5): the small preset trained through FSDP2 with bf16
# parameters (fp32 reduction) and torch.compile, 20 steps, sharded checkpoint at the end. The vocabulary is
# set to the preset's 32,768 (the stdlib tokenizer has 8,192) so the model is the benchmark's `small`, with
# its one MTP module. A single rank under torchrun still runs the FSDP2/DCP code path. Prepares data/stdlib
# if missing (carry it to save the ~15 s).
# Usage (repo root, GPU machine): bash bench/dist_gpu_check.sh, or from the prepared GPU script:
#   EXTRA='bash bench/dist_gpu_check.sh' bash bench/gpu_check.sh
# DIST_BASELINE=1 also trains the same without torchrun (plain single-process path) for the ratio.
# Expected cost on an H100/H200: about 2-4 minutes (compile, 20 steps, one 15 GB save).
set -uo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONPATH=src PYTHONUNBUFFERED=1
PY=${PY:-python3}
RUNS=$(mktemp -d)
SETS=(--preset small --set model.vocab_size=32768 --set train.precision=bf16 --set train.compile=true
      --set train.global_batch_size=8 --set train.steps=20 --set train.log_every=10 --set train.eval_every=0 --set train.eval_batches=2
      --set log.progress=false --set log.tensorboard=false)

echo "== torchrun, 1 rank: FSDP2 + bf16 + compile (small, B=8, T=2048)"
timeout "${DIST_TIMEOUT:-420}" $PY -m torch.distributed.run --standalone --nproc-per-node 1 \
  -m seektrain train "${SETS[@]}" --set parallel.dp_mode=fsdp --run-dir "$RUNS/fsdp" 2>&1 \
  | grep -v '^W1' | tail -n 8 | tee "$OUT/dist_fsdp.txt"
grep '"step": 20,' "$RUNS/fsdp/metrics.jsonl" | tee "$OUT/dist.jsonl"
ls "$RUNS/fsdp/checkpoints/step_00000020/dcp" | tee -a "$OUT/dist_fsdp.txt"

if [ -n "${DIST_BASELINE:-}" ]; then
  echo "== one process, no torchrun: bf16 autocast + compile (same settings)"
  timeout "${DIST_TIMEOUT:-420}" $PY -m seektrain train "${SETS[@]}" --run-dir "$RUNS/single" 2>&1 \
    | tail -n 4 | tee "$OUT/dist_single.txt"
  grep '"step": 20,' "$RUNS/single/metrics.jsonl" | tee -a "$OUT/dist.jsonl"
fi
