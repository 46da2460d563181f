"""One way to log: plain lines that stay readable beside tqdm progress bars."""
from __future__ import annotations

import sys

from tqdm.auto import tqdm


def log(message: str, *, error: bool = False) -> None:
    """Print one line (to stderr when ``error``) without breaking an active tqdm bar."""
    tqdm.write(str(message), file=sys.stderr if error else sys.stdout)
