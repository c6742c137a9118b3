"""Helpers for tests that run the trainer, so that each run is paid for once.

- `Launch`, `start_train`, `run_trains`: `python -m launch.train` runs
  (`conftest.train_command`) started side by side. A tiny run spends
  most of its time in one Python thread (importing TensorFlow, building and
  tracing the model), so runs side by side share two cores well.
- `ONE_DEVICE`: the one-device run that the mirrored and the multi-worker
  parity tests both compare with, trained once per session.
- `tiny_config`, `resolve_error`, `train_error`: a config or data error
  seen in-process, as the line `launch.train` prints for it (`error: ...`,
  then exit 2), without starting TensorFlow again. Subprocess tests keep the
  exit code contract itself (tests/test_launch.py).
- `record_logs`: what an in-process `trainer.train` logs.
- `deadline`: a hang fails the test instead of stalling the suite.
- `assert_kill_9_resumes_bitwise`, `checkpoint_tensors`, `png`: the kill -9
  and resume scenario every task's resume promise is tested by.
"""

from __future__ import annotations

import contextlib
import io
import signal
import subprocess
import tempfile

import pytest

from conftest import REPO, train_command, train_env


class Launch:
    """A command started in the background from the repository root; its
    output goes to files (no pipe fills up while another run is awaited).

    A context manager: leaving the block early kills the process.
    """

    def __init__(self, cmd, env=None, timeout=600):
        self.args, self.timeout = list(cmd), timeout
        self._out, self._err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(
            self.args, cwd=REPO, env=env if env is not None else train_env(),
            stdout=self._out, stderr=self._err, text=True,
        )

    def result(self) -> subprocess.CompletedProcess:
        """Waits for the command; its exit code, stdout and stderr."""
        try:
            code = self.proc.wait(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        texts = []
        for f in (self._out, self._err):
            f.seek(0)
            texts.append(f.read())
            f.close()
        return subprocess.CompletedProcess(self.args, code, *texts)

    def kill(self):
        """Stops the command if it still runs (a test failed before its result)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
            self._out.close()
            self._err.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.kill()


def start_train(workdir, *overrides, config="configs/tiny.py") -> Launch:
    """`conftest.run_train`, started in the background."""
    return Launch(train_command(workdir, *overrides, config=config))


def run_trains(*runs) -> list[subprocess.CompletedProcess]:
    """Each `(workdir, *overrides)` of `runs` trained side by side; their
    results in order, as `conftest.run_train` returns them."""
    launches = []
    try:
        for workdir, *overrides in runs:
            launches.append(start_train(workdir, *overrides))
        return [launch.result() for launch in launches]
    finally:
        for launch in launches:
            launch.kill()


class SharedRun:
    """A successful tiny run on the session's `images`, trained once on first
    use and read (never written) by every test that compares with it."""

    def __init__(self, name, *overrides):
        self.name, self.overrides = name, overrides
        self._workdir = self._launch = self._result = None

    def start(self, tmp_path_factory, images) -> None:
        """Starts the run in the background, if nothing has yet."""
        if self._launch is None:
            self._workdir = tmp_path_factory.mktemp(self.name)
            self._launch = start_train(
                self._workdir, f"--config.data.source=folder:{images}", *self.overrides
            )

    def workdir(self, tmp_path_factory, images) -> str:
        """The finished run's workdir (trains it first if need be)."""
        self.start(tmp_path_factory, images)
        if self._result is None:
            self._result = self._launch.result()
        assert self._result.returncode == 0, self._result.stderr[-3000:]
        return str(self._workdir)


# configs/tiny.py (2 epochs x 3 steps, a stage switch at epoch 2) without
# dropout and with re-estimated BatchNorm statistics, so the random backbone
# gets real gradients and a run is a pure function of its data stream: the
# same SGD steps on any number of replicas or workers.
# At configs/tiny.py's rate of 0.01 the random-init model is chaotic: float
# summation order alone (one device vs two replicas) grows past 1e-5.
PARITY = (
    "--config.model.dropout=0.0", "--config.freeze.batchnorm=reestimate",
    "--config.optimizer.learning_rate=0.001",
)
# Without the export (a third of a tiny run's time): compared by its
# checkpoints and history only.
ONE_DEVICE = SharedRun("one_device", *PARITY, "--config.export.enabled=False")


# ---------------------------------------------------------------- in-process


def tiny_config(overrides: dict | None = None):
    """configs/tiny.py with `{"section.key": value}` overrides, as the flags
    `--config.section.key=value` set them."""
    from configs import tiny

    return overridden(tiny.get_config(), overrides)


def overridden(config, overrides: dict | None):
    """`config` with `{"section.key": value}` overrides set in place, as the
    flags `--config.section.key=value` set them (an unknown key fails)."""
    for key, value in (overrides or {}).items():
        *parents, leaf = key.split(".")
        node = config
        for name in parents:
            node = node[name]
        assert leaf in node, key
        node[leaf] = value
    return config


def printed(error: BaseException) -> str:
    """The line `launch.*` prints for an input error (`launch.cli.fail`)."""
    from launch import cli

    assert isinstance(error, cli.INPUT_ERRORS), error
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        assert cli.fail(error) == cli.EXIT_BAD_INPUT
    (line,) = stderr.getvalue().splitlines()
    return line


def resolve_error(config) -> str:
    """`spec.resolve(config)` must raise a ValueError: the line
    `launch.train` prints for it (every config value is checked there)."""
    from keras_ft import spec

    with pytest.raises(ValueError) as raised:
        spec.resolve(config)
    return printed(raised.value)


def train_error(config, workdir) -> str:
    """`trainer.train(config, workdir)` must raise a ValueError (bad config,
    data or workdir): the line `launch.train` prints for it before exit 2."""
    from keras_ft import trainer

    with pytest.raises(ValueError) as raised:
        trainer.train(config, str(workdir))
    return printed(raised.value)


def record_logs(monkeypatch) -> list[str]:
    """The lines keras_ft logs through absl from now on (info and warning),
    recorded at the call: absl's verbosity in a test process depends on
    what ran before."""
    from absl import logging

    lines = []

    def record(msg, *args, **kwargs):
        lines.append(msg % args if args else str(msg))

    monkeypatch.setattr(logging, "info", record)
    monkeypatch.setattr(logging, "warning", record)
    return lines


class Hang(BaseException):
    """Raised by `deadline`: no `except Exception` (nor OSError, as
    TimeoutError is) in the code under test can take it for an error of its own."""


@contextlib.contextmanager
def deadline(seconds=20):
    """Fails the test (instead of hanging the suite) after `seconds`: SIGALRM
    interrupts the main thread (a blocked worker thread it cannot)."""
    def expire(*_):
        raise Hang(f"still running after {seconds} s: a hang")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


# ------------------------------------------- kill -9, resume, bitwise equal


def checkpoint_tensors(workdir, step: int) -> dict:
    """{name: array} of every variable in `workdir`'s checkpoint at `step`."""
    import os

    import tensorflow as tf

    reader = tf.train.load_checkpoint(os.path.join(workdir, "checkpoints", f"ckpt-{step:09d}", "ckpt"))
    return {n: reader.get_tensor(n) for n in reader.get_variable_to_shape_map()
            if n != "_CHECKPOINTABLE_OBJECT_GRAPH"}


def assert_kill_9_resumes_bitwise(config: str, run: list, tmp_path, *, kill_at: int = 7,
                                  steps: int = 12, resumed: str = "starting at step 3 of epoch 2",
                                  random_layers: bool = True):
    """The scenario every task's resume promise is tested by: `run` (flags of
    `launch.train` on `config`) trained to the end in `tmp_path/reference`,
    side by side with the same run SIGKILLed after step `kill_at`
    (tests/faults.py) in `tmp_path/killed` and then rerun; the rerun must
    say `resumed` and end with every variable of the final checkpoint (step
    `steps`) bitwise equal to the reference's, the random layers' RNG state
    included when the model has any (`random_layers`). Returns the
    reference workdir (with its export)."""
    import sys

    import numpy as np

    reference, killed = tmp_path / "reference", tmp_path / "killed"
    fault = subprocess.Popen(
        [sys.executable, "tests/faults.py", "kill", str(kill_at), f"--config={config}",
         f"--workdir={killed}", *run, "--config.export.enabled=False"],
        cwd=REPO, env=train_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    done = subprocess.run(train_command(reference, *run, config=config), cwd=REPO, env=train_env(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    _, err = fault.communicate(timeout=600)
    assert fault.returncode == -9, err[-3000:]
    again = subprocess.run(train_command(killed, *run, "--config.export.enabled=False", config=config),
                           cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert resumed in again.stderr
    got, want = checkpoint_tensors(killed, steps), checkpoint_tensors(reference, steps)
    assert sorted(got) == sorted(want)
    assert any("rng" in n for n in want) == random_layers
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    return reference


def png(image) -> bytes:
    """uint8 `[H, W, 3]` encoded as PNG bytes."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()
