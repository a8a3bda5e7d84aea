"""Result tables written next to each other: ``OUT.json`` and ``OUT.md``, each atomically (a reader
never sees half a table, and a killed run leaves the previous pair)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_tables(out: Path, data: Any, markdown: str) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    for suffix, text in ((".json", json.dumps(data, indent=1)), (".md", markdown)):
        tmp = out.with_suffix(suffix + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, out.with_suffix(suffix))
