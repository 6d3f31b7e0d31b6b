"""CPU seconds of a command and every process it starts (Ray's GCS, raylet, workers, agents).

``python -m deepslicing.bench.cpu -- COMMAND ARGS...`` runs the command, polls its process tree
every ``POLL_S`` seconds with ``psutil`` (user + system time of each process, keyed by pid and
start time so a reused pid is not merged), and prints one JSON line to stderr when it ends:
``cpu_s`` (the sum over every process seen), ``wall_s``, ``processes`` and ``exit`` (the
command's exit code, which this module also exits with).

``time`` counts only children that were waited for; Ray's workers are often killed rather than
reaped, so their time would be missed. Polling misses at most the last ``POLL_S`` of a process
that ends between polls, and processes that live less than ``POLL_S``. Used for the unit costs
in ``docs/benchmarks.md`` (CPU per training iteration and per Tune trial, as the difference of
two budgets, so start-up cancels out).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

POLL_S = 0.2


def measure(command: list[str]) -> dict[str, float | int]:
    import ray  # noqa: F401  (Ray ships psutil; importing Ray puts it on the path)

    # isort: split
    import psutil

    start = time.monotonic()
    process = subprocess.Popen(command)
    root = psutil.Process(process.pid)
    seen: dict[tuple[int, float], float] = {}
    while process.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
        except psutil.Error:
            tree = []
        for p in tree:
            try:
                times = p.cpu_times()
                seen[(p.pid, p.create_time())] = times.user + times.system
            except psutil.Error:
                continue
        time.sleep(POLL_S)
    return {
        "cpu_s": round(sum(seen.values()), 2),
        "wall_s": round(time.monotonic() - start, 1),
        "processes": len(seen),
        "exit": process.returncode,
    }


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--"]:
        args = args[1:]
    if not args:
        print("usage: python -m deepslicing.bench.cpu -- COMMAND [ARGS...]", file=sys.stderr)
        return 2
    result = measure(args)
    print(json.dumps(result), file=sys.stderr, flush=True)
    return int(result["exit"])


if __name__ == "__main__":
    sys.exit(main())
