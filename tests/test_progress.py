"""Progress: Keras' progress bar on a terminal, concise log lines in a pipe."""

import os
import pty
import select
import subprocess
import time

import pytest

from conftest import REPO, train_command, train_env
from keras_ft import progress
from runs import start_train


def _read_all(fd, proc, timeout=600) -> str:
    """What a process writes to the pseudo-terminal `fd` until it exits."""
    chunks, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            try:
                data = os.read(fd, 65536)
            except OSError:  # the other side closed
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    return b"".join(chunks).decode("utf-8", "replace")


@pytest.mark.slow
def test_a_bar_on_a_terminal_and_log_lines_in_a_pipe(tmp_path, images):
    flags = (f"--config.data.source=folder:{images}", "--config.export.enabled=False")
    piped = start_train(tmp_path / "piped", *flags)  # side by side
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(train_command(tmp_path / "tty", *flags), cwd=REPO,
                                env=train_env(), stdout=slave, stderr=subprocess.PIPE)
        os.close(slave)
        terminal = _read_all(master, proc)
        assert proc.wait(timeout=600) == 0, proc.stderr.read()[-3000:]
    finally:
        os.close(master)
    result = piped.result()
    assert result.returncode == 0, result.stderr[-3000:]
    # Keras' Progbar: "3/3 ━━━━ ... - accuracy: ... - loss: ... - images/s: ..."
    assert "Epoch 1/2" in terminal and "Epoch 2/2" in terminal, terminal[-2000:]
    assert "━" in terminal and "3/3" in terminal
    for name in ("accuracy:", "loss:", "images/s:", "val_accuracy:"):
        assert name in terminal, name
    # In a pipe: no bar; the epoch lines are in the log (stderr).
    assert "━" not in result.stdout + result.stderr and "images/s:" not in result.stdout
    assert "epoch 2/2 done in" in result.stderr
    # And the log holds keras_ft's lines, not TensorFlow's per-save chatter.
    assert "Sharding callback duration" not in result.stderr
    assert "cpu_feature_guard" not in result.stderr


def test_auto_is_a_bar_only_on_the_chiefs_terminal(monkeypatch):
    class Stream:
        def __init__(self, tty):
            self.tty = tty

        def isatty(self):
            return self.tty

    monkeypatch.setattr("sys.stdout", Stream(True))
    assert progress.choose("auto") == "bar"
    assert progress.choose("auto", chief=False) == "log"
    assert progress.choose("log") == "log"
    monkeypatch.setattr("sys.stdout", Stream(False))
    assert progress.choose("auto") == "log" and progress.choose("bar") == "bar"
    with pytest.raises(ValueError, match="Unknown train.progress 'fancy'. Choose one of: auto, bar, log."):
        progress.choose("fancy")


def test_counter_logs_in_log_mode_and_draws_in_bar_mode(monkeypatch, capsys):
    lines = []
    monkeypatch.setattr(progress, "EVERY_S", 0.0)
    monkeypatch.setattr(progress.logging, "info", lambda fmt, *args: lines.append(fmt % args))
    progress.set_mode("log")
    counter = progress.Counter(10, "Scanning images", "files")
    counter.update(5)
    counter.close()
    assert lines and lines[0].startswith("Scanning images: 5/10 files")
    progress.set_mode("bar")
    try:
        counter = progress.Counter(4, "LR range test", "steps")
        for i in range(1, 5):
            counter.update(i, loss=0.5)
        counter.close()
    finally:
        progress.set_mode("log")
    out = capsys.readouterr().out
    assert "LR range test:" in out and "4/4" in out and "loss: 0.5" in out
