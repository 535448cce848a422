"""Import side effect of the probes: the repository root (for ``research``) and ``benchmarks/`` (for
``toyworld``, the extraction benchmark's module) go on ``sys.path``, so that ``python research/probes/X.py``
works from the repository root. The probes' own folder is already there (a script's folder comes first)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

for _folder in (ROOT, ROOT / "benchmarks"):
    if str(_folder) not in sys.path:
        sys.path.append(str(_folder))
