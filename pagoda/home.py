"""pagoda's home: the folder of what it keeps between runs (pulled models, the models file,
compiled CPU kernels): $PAGODA_HOME, else ~/.cache/pagoda."""

from __future__ import annotations

import os
from pathlib import Path


def home_dir() -> Path:
    """$PAGODA_HOME, else ~/.cache/pagoda."""
    home = os.environ.get("PAGODA_HOME")
    return Path(home).expanduser() if home else Path.home() / ".cache" / "pagoda"
