#!/usr/bin/env bash
# One-GPU check of the trainer with CUDA graphs: `seektrain train` on `small` (32,768 vocabulary, one MTP
# module, B=8, T=2048 on the stdlib corpus) with bf16, compile and train.cuda_graphs, 20 steps with an
# evaluation every 10 (inference graphs beside the training ones) and the final checkpoint.
# Usage (repo root, GPU machine): bash bench/train_gpu_check.sh, or from the prepared GPU script:
#   EXTRA='bash bench/train_gpu_check.sh' bash bench/gpu_check.sh
# Prepares data/stdlib if missing (carry it to save the ~15 s). About 1-2 minutes on an H100/H200.
set -uo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONPATH=src PYTHONUNBUFFERED=1
PY=${PY:-python3}
RUN=$(mktemp -d)/graphs
echo "== seektrain train, one process: bf16 + compile + CUDA graphs (small, B=8, T=2048)"
timeout "${TRAIN_TIMEOUT:-240}" $PY -m seektrain train --preset small --set model.vocab_size=32768 \
  --set train.precision=bf16 --set train.compile=true --set train.cuda_graphs=true \
  --set train.global_batch_size=8 --set train.steps=20 --set train.log_every=10 --set train.eval_every=10 \
  --set train.eval_batches=2 --set log.progress=false --set log.tensorboard=false --run-dir "$RUN" 2>&1 \
  | tail -n 12 | tee "$OUT/train_graphs.txt"
grep -E '"step": (10|20),' "$RUN/metrics.jsonl" | tee "$OUT/train_graphs.jsonl"
