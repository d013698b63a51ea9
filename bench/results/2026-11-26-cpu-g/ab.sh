cd /tmp/fc
for r in 1 2; do
  for p in fp32 auto; do
    /usr/bin/time -f "%e s wall" .venv/bin/seektrain train --set train.precision=$p --run-dir /tmp/ab_${p}_$r --resume never > /tmp/ab_${p}_$r.log 2>&1
  done
done
echo done > /tmp/ab_done
