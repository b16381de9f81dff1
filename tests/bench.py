"""Benchmarks (not collected by pytest): `python tests/bench.py [--only SUBSTRING] [--threads N]`.

Prints the machine, then one Markdown table row per measured operation: the median of several
timed runs after a warm-up, with its unit. README > Performance quotes this output.
"""
import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

ROWS = []


def report(name, value, unit):
    ROWS.append((name, value, unit))
    print(f"| {name} | {value:.4g} | {unit} |", flush=True)


def timeit(fn, runs=5, warmup=1):
    """Median wall-clock seconds of `runs` calls of fn() after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def machine():
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"Python {platform.python_version()}")


BENCHES = []


def bench(fn):
    BENCHES.append(fn)
    return fn


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="", help="run the benchmarks whose function name contains this")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"Machine: {machine()}\n")
    print("| operation | median | unit |\n| --- | ---: | --- |", flush=True)
    for fn in BENCHES:
        if args.only in fn.__name__:
            fn(report)


if __name__ == "__main__":
    main()
