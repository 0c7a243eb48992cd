"""Render the config reference (docs/config.md) from the models themselves.

``python -m steadytrain.config.reference > docs/config.md``; a test keeps the file current.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel

from steadytrain.config.models import Config

HEADER = """# Configuration reference

Generated from `src/steadytrain/config/models.py` by
`python -m steadytrain.config.reference > docs/config.md`; do not edit by hand.

Every key can be set in the YAML file or on the command line with `--set key=value`, where
the value is parsed as YAML (`--set 'model.kwargs={width: 64}'`, `--set train.lr=3e-4`).
Unknown keys and wrong types are refused at load time with exit code 2.

**Identity** keys change the math of a run (model shape, data, seed, global batch,
optimizer); they are fingerprinted together, and a checkpoint may only be restored into a
run with the same identity. **Operational** keys (logging, intervals, micro-batch size and
world size with the same global batch) may change between restarts.
"""


def render_reference() -> str:
    lines = [HEADER]
    lines.extend(_section(Config, prefix="", title="Top level"))
    for name, field in Config.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            lines.extend(_section(annotation, prefix=f"{name}.", title=f"`{name}`"))
    return "\n".join(lines).rstrip() + "\n"


def _section(model: type[BaseModel], *, prefix: str, title: str) -> list[str]:
    rows = [f"\n## {title}\n", "| key | kind | default | description |", "|---|---|---|---|"]
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            continue
        extra = field.json_schema_extra
        kind = "identity" if isinstance(extra, dict) and extra.get("identity") else "operational"
        default = field.get_default(call_default_factory=True)
        rows.append(f"| `{prefix}{name}` | {kind} | `{_format(default)}` | {field.description} |")
    return rows


def _format(value: Any) -> str:
    return json.dumps(value, default=list).replace("|", "\\|")


if __name__ == "__main__":
    print(render_reference(), end="")
