"""Names inside a checkpoint root.

```
ROOT/
  .lock                      run lock (held by the writer)
  latest                     name of the newest committed step (a hint for humans and tools)
  step-000001200/            a committed step: segments + manifest.json (written last)
  .tmp-step-000001300-<id>/  a step being written; never selectable
  .trash-step-000000900-<id>/ a step being deleted; never selectable
```
"""

from __future__ import annotations

import re

__all__ = [
    "LATEST",
    "LOCK",
    "TMP_PREFIX",
    "TRASH_PREFIX",
    "step_dirname",
    "parse_step_dirname",
]

LATEST = "latest"
LOCK = ".lock"
TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"
_STEP_RE = re.compile(r"^step-(\d{9,})$")


def step_dirname(step: int) -> str:
    """Directory name of a committed step.

    Example:
        >>> step_dirname(1200)
        'step-000001200'
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return f"step-{step:09d}"


def parse_step_dirname(name: str) -> int | None:
    """The step of a committed-step directory name, or None for any other name."""
    m = _STEP_RE.match(name)
    return int(m.group(1)) if m else None
