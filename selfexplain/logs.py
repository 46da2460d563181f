"""One way to log: plain lines on stderr that stay readable beside tqdm progress bars.

Diagnostics go to stderr (as tqdm's bars do), so a stage's product on stdout, such as
``why_did_you.py --json=True``'s one JSON object per line, stays machine-readable.
"""
from __future__ import annotations

import sys

from tqdm.auto import tqdm


def log(message: str) -> None:
    """Print one line to stderr without breaking an active tqdm bar."""
    tqdm.write(str(message), file=sys.stderr)
