#!/usr/bin/env python3
"""A stand-in for bench/train_twin.py that needs no torch: each "step" is a fixed amount of
pure-Python work, which a harness that pinned, throttled or crowded its children would slow down.
Takes the twin's flags and prints its JSON on the last line."""
import json
import statistics
import sys
import time

args = dict(zip(sys.argv[1::2], sys.argv[2::2]))
steps = int(args.get("--steps", "5"))


def step():
    t = time.perf_counter()
    acc = 0
    for i in range(300_000):
        acc += i * i % 7
    return (time.perf_counter() - t) * 1e3


step()  # warm-up, as the twin does
times = [step() for _ in range(steps)]
ms = statistics.median(times)
print(json.dumps({
    "impl": "busy (cpu)", "model": args.get("--model", "mae"), "img": int(args.get("--img", 64)),
    "patch": int(args.get("--patch", 8)), "dim": int(args.get("--dim", 192)), "depth": int(args.get("--depth", 12)),
    "heads": int(args.get("--heads", 3)), "batch": int(args.get("--batch", 32)), "threads": int(args.get("--threads", 1)),
    "steps": steps, "step_ms_median": ms, "steps_per_s": 1e3 / ms, "forward_ms": ms, "backward_ms": 0.0,
    "optimizer_ms": 0.0, "peak_rss_mib": 0.0,
}))
