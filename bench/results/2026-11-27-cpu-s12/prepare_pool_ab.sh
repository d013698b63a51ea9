# prepare on the old worker pool (6bf16ff) against the new one, alternating; run from the repo root.
# OLD_SRC: `git archive 6bf16ff src | tar -x -C "$OLD"`'s src; TOKENIZER: a tokenizer.json both use;
# WORK: a scratch folder.
: "${OLD_SRC:?set OLD_SRC}" "${TOKENIZER:?set TOKENIZER}" "${WORK:=/tmp/prepare_ab}"
for i in 1 2 3; do for v in old new; do
  if [ $v = old ]; then P=$OLD_SRC; else P=src; fi
  rm -rf "$WORK/o_$v"
  s=$(date +%s.%N)
  PYTHONPATH=$P .venv/bin/python -m seektrain prepare --input stdlib --tokenizer "$TOKENIZER" \
    --out "$WORK/o_$v" --workers 2 --no-progress > /dev/null
  e=$(date +%s.%N)
  echo "$v $(echo "$e - $s" | bc)"
done; done
cmp "$WORK/o_old/train/00000.bin" "$WORK/o_new/train/00000.bin" && echo identical-shards
