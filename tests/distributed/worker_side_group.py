"""A torchrun worker: rank 0 waits on the side group for rank 1, which stays away.

Usage (under torchrun, 2 ranks): worker_side_group.py TIMEOUT_S ABSENT_S
Rank 0 prints ``gave up after S s`` (or ``joined``); rank 1 sleeps ABSENT_S, then leaves.
"""

from __future__ import annotations

import datetime
import sys
import time

import torch.distributed as dist

from steadytrain.distributed import exit_process, side_group


def main() -> None:
    timeout_s, absent_s = float(sys.argv[1]), float(sys.argv[2])
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=600))
    group = side_group(timeout_s=timeout_s)
    if dist.get_rank() == 1:
        time.sleep(absent_s)  # a peer that never joins the collective
        return
    started = time.monotonic()
    try:
        dist.broadcast_object_list([None], src=1, group=group)
        print("joined", flush=True)
    except RuntimeError:
        print(f"gave up after {time.monotonic() - started:.1f} s", flush=True)


if __name__ == "__main__":
    main()
    exit_process(0)
