"""A training run's folder: its JSON-lines log and its atomically written checkpoints."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch


class Logger:
    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / "log.jsonl"
        self.t0 = time.time()

    def __call__(self, **record) -> None:
        record = {"time": time.strftime("%H:%M:%S"), **record}
        line = json.dumps(record)
        print(line, flush=True)
        with self.path.open("a") as f:
            f.write(line + "\n")


def save_ckpt(path: Path, **state) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
