"""The CPUs this process may use: what training threads and data-preparation workers are sized from."""

from __future__ import annotations

import os
from pathlib import Path

# CPUs a process may run on ("0,1"), applied before anything starts threads: `lrexp grid --jobs K` gives each
# of its K cells its own share of the cores this way, so their thread pools do not fight over the same ones.
CPUS_ENV = "LREXP_CPUS"


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask, bounded by a cgroup v2 CPU quota (a container's
    share, which the affinity mask and torch's default both ignore)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cpus = min(cpus, max(1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return cpus
