"""A torchrun worker for the communication tests: train with the library's own parts, then
save this rank's weights and what its DDP object was built with.

Usage (under torchrun): worker_comm.py CONFIG OUT_DIR [key=value ...]

Writes ``OUT_DIR/rank{R}.safetensors``, ``OUT_DIR/rank{R}.json`` (the DDP object's bucket
cap, gradient views and static graph, the hook's class and PowerSGD's compression rate) and,
on rank 0 of a fresh start, ``OUT_DIR/initial.safetensors`` (the weights before step 0).
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from torch.nn.parallel import DistributedDataParallel

from steadytrain.config import load_config
from steadytrain.distributed import barrier, exit_process, start_runtime, stop_runtime
from steadytrain.distributed.comm_hooks import PowerSGDSync
from steadytrain.train import build_parts, fit


def weights(module: Any) -> dict[str, Any]:
    return {
        name: tensor.detach().clone().contiguous() for name, tensor in module.state_dict().items()
    }


def ddp_facts(parts: Any) -> dict[str, Any]:
    ddp = parts.model.module
    assert isinstance(ddp, DistributedDataParallel), type(ddp)
    hook = parts.model.comm_hook
    return {
        "bucket_bytes_cap": ddp.bucket_bytes_cap,
        "gradient_as_bucket_view": ddp.gradient_as_bucket_view,
        "static_graph": ddp.static_graph,
        "comm_hook": type(hook).__name__,
        "hook_name": getattr(getattr(hook, "hook", None), "__name__", None),
        "powersgd_compression_rate": hook.compression_rate()
        if isinstance(hook, PowerSGDSync)
        else None,
        "resumed_from_step": parts.restored.step if parts.restored is not None else None,
    }


def main() -> None:
    config_path, out_dir, *overrides = sys.argv[1:]
    config = load_config(config_path, overrides=overrides)
    runtime = start_runtime(config)
    out = Path(out_dir)
    try:
        parts = build_parts(config, runtime)
        if runtime.is_main and parts.restored is None:
            save_file(weights(parts.model.unwrapped), str(out / "initial.safetensors"))
        fit(parts)
        save_file(weights(parts.model.unwrapped), str(out / f"rank{runtime.rank}.safetensors"))
        facts = ddp_facts(parts)
        (out / f"rank{runtime.rank}.json").write_text(json.dumps(facts))
        barrier()
    finally:
        stop_runtime()


if __name__ == "__main__":
    # As the CLI does: no interpreter finalization under gloo, whatever the outcome.
    try:
        main()
    except Exception:
        traceback.print_exc()
        exit_process(1)
    exit_process(0)
