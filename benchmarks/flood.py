"""P5, flood survival: ``rtml-ebpf demo --json`` (the demo's runs, its table and flood.png)."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any


def p5_flood(out_dir: str, duration: float) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-m", "rtml_ebpf.cli", "demo", "--json", "--duration", str(duration),
                          "--out", out_dir], capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        raise RuntimeError(f"P5 demo failed: {out.stderr[-2000:]}")
    return dict(json.loads(out.stdout))
