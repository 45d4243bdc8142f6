"""`lrexp train` writing to a file (SLURM, nohup) prints progress lines, not a bar redrawn per batch; on a
terminal the bar stays (docs/configuration.md#logs). The same smoke run, stdout to a file and to a pseudo-terminal."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import struct
import subprocess
import sys
import termios

import pytest

from corpora import word_documents


def _train(tmp_path, name, stdout):
    corpus = word_documents(tmp_path / "corpus", "quiet logs keep a long run's output small",
                            [80 + 11 * i for i in range(16)])
    argv = [sys.executable, "-m", "lrexp.cli", "train", "scale=smoke", f"data.corpus={corpus}", "data.tokenizer=bytes",
            "data.val_fraction=0.25", "data.test_fraction=0.25", f"data.cache_dir={tmp_path / 'data'}",
            f"log.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", f"train.checkpoint_dir={tmp_path / name}",
            "train.accelerator=cpu"]
    return subprocess.Popen(argv, stdout=stdout, stderr=subprocess.DEVNULL)


@pytest.mark.slow  # two smoke trainings in processes of their own: about a minute on 2 CPU cores
def test_a_run_logged_to_a_file_prints_lines_where_a_terminal_gets_the_bar(tmp_path):
    with open(tmp_path / "stdout.log", "wb") as f:
        assert _train(tmp_path, "file", f).wait() == 0
    logged = (tmp_path / "stdout.log").read_bytes()

    master, slave = pty.openpty()  # a terminal: Lightning's bar, as before
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # 0 columns: tqdm draws nothing
    proc = _train(tmp_path, "tty", slave)
    os.close(slave)
    shown = b""
    while True:
        ready, _, _ = select.select([master], [], [], 1.0)
        try:
            chunk = os.read(master, 65536) if ready else b""
        except OSError:  # the terminal closed with the process
            break
        if ready and not chunk:
            break
        shown += chunk
        if not ready and proc.poll() is not None:
            break
    assert proc.wait() == 0

    text = logged.decode()
    assert b"\r" not in logged and "final validation pass done in" in text and "final test pass done in" in text
    assert "validation at step 10 done in" in text  # the smoke scale validates every 10 steps
    assert b"\r" in shown and b"it/s" in shown  # the bar, redrawn in place
    assert len(logged) * 5 < len(shown), (len(logged), len(shown))
