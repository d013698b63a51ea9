for i in 1 2 3; do for v in old new; do
  if [ $v = old ]; then P=/tmp/old6/src; else P=/work/main/src; fi
  rm -rf /tmp/s/ab/o_$v
  s=$(date +%s.%N); PYTHONPATH=$P /work/main/.venv/bin/python -m seektrain prepare --input stdlib --tokenizer /tmp/s/ab/base/tokenizer.json --out /tmp/s/ab/o_$v --workers 2 --no-progress > /dev/null; e=$(date +%s.%N)
  echo "$v $(echo "$e - $s" | bc)"
done; done
cmp /tmp/s/ab/o_old/train/00000.bin /tmp/s/ab/o_new/train/00000.bin && echo identical-shards
