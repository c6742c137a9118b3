"""Runs a command as N local workers of one multi-worker job:
`python -m launch.multiworker`.

    python -m launch.multiworker --num_workers=2 -- \\
        python -m launch.train --config=configs/quickstart.py --workdir=/tmp/mw

Each worker is the command in its own process, with `TF_CONFIG` naming all N
workers on 127.0.0.1 (free ports) and its own index; worker 0 is the chief.
`distribute.strategy=auto` (the default) then picks
`MultiWorkerMirroredStrategy`. Every output line is prefixed `[worker i]`.

This is multi-process training on one host, and the way to test a cluster
job before running it on several: on a cluster, each host runs the train
command itself with its own `TF_CONFIG` (see the README and
`k8s/multiworker-job.yaml`).

SIGTERM or Ctrl-C is passed on to every worker (they agree on a step, save a
checkpoint and exit 42). If a worker fails, the others cannot go on (every
step needs all of them): they are stopped after `--grace_seconds`.

Exit code: 0 if every worker succeeded; else 42 if every failure was a
preemption; else the exit code of the first worker that failed.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from absl import app, flags

from launch import cli

_NUM_WORKERS = flags.DEFINE_integer("num_workers", 2, "How many worker processes.")
_GRACE = flags.DEFINE_float(
    "grace_seconds", 60.0,
    "After a worker fails, how long the others may take to stop before they are killed.",
)
EXIT_PREEMPTED = 42


def free_ports(n: int) -> list[int]:
    """`n` distinct TCP ports free on 127.0.0.1 now."""
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def tf_config(hosts: list[str], index: int) -> str:
    """The `TF_CONFIG` of worker `index` of a cluster of `hosts`."""
    return json.dumps({"cluster": {"worker": hosts}, "task": {"type": "worker", "index": index}})


def _relay(stream, prefix: str) -> None:
    for line in stream:
        sys.stdout.write(prefix + line)
        sys.stdout.flush()


def run(command: list[str], num_workers: int, grace_seconds: float) -> int:
    """Runs `command` as `num_workers` local workers; returns the exit code."""
    hosts = [f"127.0.0.1:{p}" for p in free_ports(num_workers)]
    print(f"Starting {num_workers} workers on {', '.join(hosts)}: {' '.join(command)}",
          flush=True)
    workers, relays = [], []
    for i in range(num_workers):
        env = dict(os.environ, TF_CONFIG=tf_config(hosts, i))
        proc = subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            errors="replace",
        )
        relay = threading.Thread(target=_relay, args=(proc.stdout, f"[worker {i}] "))
        relay.start()
        workers.append(proc)
        relays.append(relay)

    def forward(signum, frame):
        del frame
        print(f"{signal.Signals(signum).name}: passing SIGTERM to every worker.", flush=True)
        for proc in workers:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        first_failure, deadline = None, None
        while any(proc.poll() is None for proc in workers):
            for i, proc in enumerate(workers):
                if first_failure is None and proc.poll() not in (None, 0):
                    first_failure = i
                    deadline = time.monotonic() + grace_seconds
                    print(f"Worker {i} exited with {proc.returncode}; the others stop "
                          f"within {grace_seconds:g}s.", flush=True)
            if deadline is not None and time.monotonic() > deadline:
                for proc in workers:
                    if proc.poll() is None:
                        proc.kill()
            time.sleep(0.2)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for relay in relays:
            relay.join()
    codes = [proc.returncode for proc in workers]
    print(f"Workers exited with {codes}.", flush=True)
    failed = [c for c in codes if c != 0]
    if not failed:
        return 0
    if all(c == EXIT_PREEMPTED for c in failed):
        return EXIT_PREEMPTED
    return workers[first_failure].returncode if first_failure is not None else failed[0]


def main(argv):
    command = argv[1:]
    if not command:
        raise app.UsageError(
            "No command: python -m launch.multiworker --num_workers=N -- <command ...>"
        )
    if _NUM_WORKERS.value < 1:
        return cli.fail(f"--num_workers must be >= 1, got {_NUM_WORKERS.value}.")
    return run(command, _NUM_WORKERS.value, _GRACE.value)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
