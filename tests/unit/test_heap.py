"""train.keep_freed_memory: glibc's malloc keeps the large blocks a step frees, so the next step's tensors of
the same size touch no fresh pages (docs/configuration.md#threads)."""

import os
import subprocess
import sys

import pytest

from lrexp.runtime import heap

# A 32 MiB block (the tiny scale's logits) allocated, written and freed twice; prints the minor page faults of
# the second round. In a process of its own: the setting lasts for the process.
_ROUND = """
import ctypes, resource, sys
from lrexp.runtime.heap import keep_freed_memory
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
kept = sys.argv[1] == "keep" and keep_freed_memory()
def round_():
    p = libc.malloc(32 << 20)
    ctypes.memset(p, 1, 32 << 20)
    libc.free(p)
round_()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
round_()
print(int(kept), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _second_round_faults(mode: str):
    out = subprocess.run([sys.executable, "-c", _ROUND, mode], capture_output=True, text=True, check=True,
                         env={k: v for k, v in os.environ.items() if k not in heap._USER_SETTINGS}).stdout.split()
    return bool(int(out[0])), int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc options")
def test_freed_blocks_are_reused_without_page_faults():
    kept, faults = _second_round_faults("keep")
    assert kept
    assert faults < 100  # the same pages again
    _, default_faults = _second_round_faults("default")
    assert default_faults > 4000  # 8192 fresh 4 KiB pages: what the setting removes


def test_malloc_options_of_the_environment_win(monkeypatch):
    monkeypatch.setenv("MALLOC_MMAP_MAX_", "65536")
    assert heap.keep_freed_memory() is False


class _Stop(Exception):
    pass


def _stop(*args, **kwargs):
    raise _Stop  # the MLflow run opens just after the heap is set: nothing to train


@pytest.mark.parametrize("keep", [True, False])
def test_a_cpu_run_keeps_freed_memory_unless_told_not_to(monkeypatch, keep):
    from lrexp.config.load import load
    from lrexp.train import run as train

    calls = []
    monkeypatch.setattr(train, "keep_freed_memory", lambda: calls.append(1))
    monkeypatch.setattr(train.run_logger, "open_run", _stop)
    with pytest.raises(_Stop):
        train.run(load(overrides=["scale=smoke", "train.accelerator=cpu", f"train.keep_freed_memory={keep}"]))
    assert calls == ([1] if keep else [])
