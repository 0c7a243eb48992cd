"""Host resource readings for the metrics records."""

from __future__ import annotations

import os
import resource
import time


def host_rss_bytes() -> int:
    """Resident memory of this process now (Linux), or its peak elsewhere."""
    try:
        with open("/proc/self/statm") as statm:
            resident_pages = int(statm.read().split()[1])
        return resident_pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def process_start_time() -> float | None:
    """When this process started, as a ``time.time()`` value (Linux; 10 ms), else None."""
    try:
        with open("/proc/self/stat") as stat:
            # Field 22, counted after the command name (which may hold spaces): clock ticks
            # since boot.
            start_ticks = int(stat.read().rpartition(")")[2].split()[19])
        with open("/proc/uptime") as uptime:
            seconds_since_boot = float(uptime.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    age = seconds_since_boot - start_ticks / os.sysconf("SC_CLK_TCK")
    return time.time() - age
