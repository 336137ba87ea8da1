"""Where the project's configs live, and the resolvers they use. Import before composing configs."""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = PROJECT_ROOT / "conf"

# Configs name paths relative to the project root, wherever the command is started from.
os.environ.setdefault("PROJECT_ROOT", str(PROJECT_ROOT))
