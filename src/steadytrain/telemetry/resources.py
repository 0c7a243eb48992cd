"""Host resource readings for the metrics records."""

from __future__ import annotations

import os
import resource


def host_rss_bytes() -> int:
    """Resident memory of this process now (Linux), or its peak elsewhere."""
    try:
        with open("/proc/self/statm") as statm:
            resident_pages = int(statm.read().split()[1])
        return resident_pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
