"""A torchrun worker: train with the library's own parts, then save this rank's weights.

Usage (under torchrun): worker_train.py CONFIG OUT_DIR [key=value ...]
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path

from safetensors.torch import save_file

from steadytrain.config import load_config
from steadytrain.distributed import barrier, exit_process, start_runtime, stop_runtime
from steadytrain.train import build_parts, fit


def main() -> None:
    config_path, out_dir, *overrides = sys.argv[1:]
    config = load_config(config_path, overrides=overrides)
    runtime = start_runtime(config)
    try:
        parts = build_parts(config, runtime)
        fit(parts)
        weights = {
            name: tensor.detach().contiguous()
            for name, tensor in parts.model.unwrapped.state_dict().items()
        }
        save_file(weights, str(Path(out_dir) / f"rank{runtime.rank}.safetensors"))
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
