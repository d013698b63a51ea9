"""Where a profiled step left the GPU idle: reads a Chrome trace written by `seektrain bench --profile N
--trace FILE` (plain or .gz) and prints the device's busy time (union of kernel and copy intervals), the
idle gaps between them with the kernels on either side, and how long the host waited in CUDA calls.

Run:  python bench/trace_gaps.py TRACE [--top 10] [--min-us 20]
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("trace")
    p.add_argument("--top", type=int, default=10, help="largest gaps to list")
    p.add_argument("--min-us", type=float, default=20.0, help="gaps shorter than this are not counted")
    args = p.parse_args()
    opener = gzip.open if args.trace.endswith(".gz") else open
    with opener(args.trace, "rt") as f:
        events = json.load(f)["traceEvents"]
    device = sorted(
        (e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")), key=lambda e: e["ts"]
    )
    if not device:
        raise SystemExit(f"{args.trace} holds no kernels or device copies: a trace of a GPU step is needed")
    start, reach, busy, gaps, previous = device[0]["ts"], device[0]["ts"], 0.0, [], None
    for e in device:
        end = e["ts"] + e["dur"]
        if e["ts"] - reach >= args.min_us:
            gaps.append((e["ts"] - reach, reach - start, previous["name"][:50], e["name"][:50]))
        if end > reach:
            busy += end - max(e["ts"], reach)
            reach, previous = end, e
    span = reach - start
    share = busy / span if span else 1.0  # zero-length events only: nothing idle either
    print(
        f"device: {len(device)} kernels/copies over {span / 1e3:.1f} ms, busy {busy / 1e3:.1f} ms "
        f"({share:.0%}); {len(gaps)} gaps ≥ {args.min_us:g} µs, {sum(g[0] for g in gaps) / 1e3:.1f} ms"
    )
    for gap, at, before, after in sorted(gaps, reverse=True)[: args.top]:
        print(f"  {gap:8.0f} µs at {at / 1e3:6.1f} ms  {before} -> {after}")
    waits = collections.Counter()
    for e in events:
        if e.get("cat") == "cuda_runtime" and "dur" in e:
            waits[e["name"]] += e["dur"]
    print("host time in CUDA calls:", ", ".join(f"{n} {d / 1e3:.1f} ms" for n, d in waits.most_common(4)))


if __name__ == "__main__":
    main()
