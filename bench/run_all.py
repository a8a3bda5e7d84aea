"""Run every benchmark (``make bench``); each writes its JSON under ``bench-out/``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = ["lowering.py", "compile.py", "export.py", "prune.py", "amp.py"]


def main() -> int:
    status = 0
    for script in BENCHMARKS:
        out = HERE.parent / "bench-out" / (Path(script).stem + ".json")
        print(f"== {script}")
        rc = subprocess.call([sys.executable, str(HERE / script), "--out", str(out)])
        status = status or rc
    return status


if __name__ == "__main__":
    sys.exit(main())
