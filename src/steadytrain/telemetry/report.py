"""``steadytrain report RUN_DIR``: PNG plots and one self-contained HTML page.

From the run directory's files alone (``metrics.jsonl``, ``events.jsonl``): loss and learning
rate, throughput, the stacked phase breakdown, the health score, and every rank's own time per
step, each with the run's checkpoints, restarts, preemptions, hangs and skipped steps marked
on the step axis. The PNGs go under ``RUN_DIR/report/``; ``index.html`` embeds them (as data
URIs) with the status summary, so the page needs no network and no other file to be viewed.
"""

from __future__ import annotations

import base64
import html
import itertools
import json
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from steadytrain.config import ConfigError
from steadytrain.telemetry.sinks import read_jsonl
from steadytrain.telemetry.status import run_status
from steadytrain.telemetry.timers import PHASES

# Event kind -> (label, colour, line style) of its marker on every plot.
MARKERS = {
    "checkpoint_saved": ("checkpoint", "#2ca02c", ":"),
    "resume": ("restart", "#1f77b4", "--"),
    "preempted": ("preemption", "#ff7f0e", "-"),
    "hang": ("hang", "#d62728", "-"),
    "nonfinite_step_skipped": ("skipped step", "#9467bd", "-."),
    "rolled_back": ("rollback", "#8c564b", "--"),
}
PLOTS = ("loss_lr", "throughput", "phases", "health", "ranks")


@dataclass(frozen=True)
class Report:
    directory: Path
    page: Path
    images: tuple[Path, ...]


def write_report(run_dir: Path) -> Report:
    """Write ``RUN_DIR/report/*.png`` and ``index.html``; return where they are."""
    status = run_status(run_dir)  # refuses what is not a run directory
    records = read_jsonl(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").exists() else []
    # After a restart the steps since the checkpoint are logged again: the later one wins.
    by_step = {int(record["step"]): record for record in records if "step_time_s" in record}
    steps = [by_step[step] for step in sorted(by_step)]
    if not steps:
        raise ConfigError(
            f"{run_dir} has no logged step yet; run `steadytrain report` once training has "
            "logged one (log.every_steps)"
        )
    events = read_jsonl(run_dir / "events.jsonl") if (run_dir / "events.jsonl").exists() else []
    out = run_dir / "report"
    try:
        out.mkdir(exist_ok=True)
        images = tuple(_plot(name, steps, records, events, out) for name in PLOTS)
        page = out / "index.html"
        _write_atomically(page, _page(status, images))
    except OSError as error:
        raise ConfigError(
            f"cannot write the report in {out} ({error.strerror or error}); make the run "
            "directory writable, or report a copy of it"
        ) from None
    return Report(directory=out, page=page, images=images)


def _plot(
    name: str,
    steps: Sequence[Mapping[str, Any]],
    records: Sequence[Mapping[str, Any]],
    events: Sequence[Mapping[str, Any]],
    out: Path,
) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    from matplotlib import pyplot as plt

    x = [int(record["step"]) for record in steps]
    figure, axes = plt.subplots(figsize=(10, 3.6), dpi=100)
    if name == "loss_lr":
        axes.plot(x, _series(steps, "loss"), label="train loss", color="#1f77b4")
        evals = [r for r in records if r.get("val_loss") is not None and "step_time_s" not in r]
        if evals:
            axes.plot(
                [r["step"] for r in evals],
                [r["val_loss"] for r in evals],
                "o-",
                label="validation loss",
                color="#ff7f0e",
            )
        axes.set_ylabel("loss")
        lr_axes = axes.twinx()
        lr_axes.plot(x, _series(steps, "lr"), color="#7f7f7f", alpha=0.6, label="lr")
        lr_axes.set_ylabel("learning rate")
        title = "Loss and learning rate"
    elif name == "throughput":
        axes.plot(x, _series(steps, "tokens_per_second"), color="#1f77b4")
        axes.set_ylabel("tokens / s")
        title = "Throughput"
    elif name == "phases":
        bottom = [0.0] * len(steps)
        for phase in PHASES:
            if phase == "grad_sync":  # overlaps backward: shown as a line, not stacked
                continue
            heights = [1000 * float(r.get(f"{phase}_s", 0.0)) for r in steps]
            axes.bar(x, heights, bottom=bottom, label=phase, width=_bar_width(x))
            bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
        sync = [1000 * float(r.get("grad_sync_s", 0.0)) for r in steps]
        axes.plot(x, sync, "k--", label="grad_sync (in flight, overlaps backward)")
        axes.set_ylabel("ms per step")
        title = "Phase breakdown"
    elif name == "health":
        axes.plot(x, _series(steps, "health_score"), color="#2ca02c")
        axes.set_ylim(-5, 105)
        axes.set_ylabel("health score")
        title = "Health score"
    else:
        per_rank = [r.get("rank_own_s") or [] for r in steps]
        for rank in range(max((len(values) for values in per_rank), default=0)):
            axes.plot(
                x,
                [1000 * v[rank] if rank < len(v) else math.nan for v in per_rank],
                label=f"rank {rank}",
            )
        axes.set_ylabel("own ms per step")
        title = "Per-rank compute and loading time (the straggler measure)"
    _mark_events(axes, events)
    axes.set_xlabel("step")
    axes.set_title(title)
    handles, labels = axes.get_legend_handles_labels()
    if handles:  # below the plot, never over the data or the second axis
        axes.legend(
            handles, labels, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=5
        )
    figure.tight_layout()
    path = out / f"{name}.png"
    with tempfile.NamedTemporaryFile(dir=out, suffix=".png", delete=False) as staged:
        figure.savefig(staged, format="png", bbox_inches="tight")
    plt.close(figure)
    os.chmod(staged.name, 0o644)  # for whoever the report is shared with, as a plain file
    os.replace(staged.name, path)
    return path


def _series(records: Sequence[Mapping[str, Any]], key: str) -> list[float]:
    """``key`` of each record; NaN where missing (a gap in the line)."""
    return [math.nan if r.get(key) is None else float(r[key]) for r in records]


def _bar_width(x: Sequence[int]) -> float:
    gaps = [b - a for a, b in itertools.pairwise(x) if b > a]
    return 0.8 * min(gaps) if gaps else 0.8


def _mark_events(axes: Any, events: Sequence[Mapping[str, Any]]) -> None:
    labelled: set[str] = set()
    for event in events:
        marker = MARKERS.get(str(event.get("event")))
        if marker is None or event.get("step") is None:
            continue
        label, colour, style = marker
        axes.axvline(
            float(event["step"]),
            color=colour,
            linestyle=style,
            linewidth=0.9,
            alpha=0.7,
            label=None if label in labelled else label,
        )
        labelled.add(label)


def _page(status: Mapping[str, Any], images: Sequence[Path]) -> str:
    rows = "".join(
        f"<tr><th>{html.escape(key)}</th><td>{html.escape(_text(value))}</td></tr>"
        for key, value in (
            ("state", status["state"]),
            ("progress", status["progress"]),
            ("health", status["health"]),
            ("signals", status["signals"]),
            ("checkpoint", status["checkpoint"]),
            ("usage", status["usage"]),
            ("restarts", status["restarts"]),
            ("recoveries", status["recoveries"]),
            ("stragglers", status["stragglers"]),
        )
    )
    figures = "".join(
        f'<figure><img alt="{path.stem}" src="data:image/png;base64,'
        f'{base64.b64encode(path.read_bytes()).decode()}"></figure>'
        for path in images
    )
    title = html.escape(f"steadytrain report: {status['run_dir']}")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; max-width: 980px; }}
table {{ border-collapse: collapse; margin-bottom: 1.5em; }}
th, td {{ border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: top;
  font-size: 13px; }}
td {{ font-family: monospace; white-space: pre-wrap; }}
figure {{ margin: 0 0 1.5em 0; }}
img {{ max-width: 100%; }}
</style></head>
<body>
<h1>{title}</h1>
<table>{rows}</table>
{figures}
<script>
// For tests and for readers: say on the page whether every image decoded.
window.addEventListener("load", () => {{
  const images = Array.from(document.images);
  const loaded = images.filter((image) => image.complete && image.naturalWidth > 0).length;
  const note = document.createElement("p");
  note.id = "images-loaded";
  note.textContent = `${{loaded}} of ${{images.length}} images loaded`;
  document.body.appendChild(note);
}});
</script>
</body></html>
"""


def _text(value: Any) -> str:
    if isinstance(value, (dict, list)):
        return json.dumps(value, indent=1, default=str)
    return str(value)


def _write_atomically(path: Path, text: str) -> None:
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as staged:
        staged.write(text)
    os.chmod(staged.name, 0o644)
    os.replace(staged.name, path)
