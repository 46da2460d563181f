"""Where each benchmark writes its markdown section (bench/run_all.py merges them)."""
from __future__ import annotations

from pathlib import Path


def write_section(path: str | Path, lines: list[str]) -> None:
    """Write one benchmark's markdown section and echo it."""
    text = "\n".join(lines)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text)
    print(text)
