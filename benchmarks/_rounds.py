"""Interleaved timing rounds over worker processes, one per variant.

Each worker is `python SCRIPT --worker ...`; it builds its model, prints
`ready SECONDS`, then answers each `train N` line on stdin with the mean
seconds of N steps. The driver asks every worker in turn, round after
round, so machine noise falls on all variants alike.
"""

import subprocess
import sys


def interleaved(commands: dict[str, list[str]], rounds: int, steps: int,
                batch_size: int) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Seconds per step of each variant, one entry per round; and the
    seconds each worker reported with `ready` (its warm-up)."""
    procs = {
        name: subprocess.Popen([sys.executable, *cmd], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
        for name, cmd in commands.items()
    }
    try:
        warmup = {}
        for name, p in procs.items():
            line = p.stdout.readline().split()
            if not line or line[0] != "ready":
                raise SystemExit(f"worker {name} failed to start (see its error above)")
            warmup[name] = float(line[1])
        seconds = {name: [] for name in procs}
        for r in range(rounds):
            for name, p in procs.items():
                p.stdin.write(f"train {steps}\n")
                p.stdin.flush()
                seconds[name].append(float(p.stdout.readline()))
            print(f"round {r + 1}/{rounds}: " + ", ".join(
                f"{n} {batch_size / s[-1]:.1f} img/s" for n, s in seconds.items()), flush=True)
        return seconds, warmup
    finally:
        for p in procs.values():
            if p.stdin:
                p.stdin.close()
            p.wait()


def serve(step, steps_source=sys.stdin) -> None:
    """The worker's side: times `step()` as the driver asks."""
    import time

    for line in steps_source:
        _, n = line.split()
        start = time.perf_counter()
        for _ in range(int(n)):
            step()
        print((time.perf_counter() - start) / int(n), flush=True)
