"""Where a ``lits`` process logs to W&B: online only when it can, decided once per process before any logger starts.

A leaf module (standard library only): the entry points of ``lits fit``, ``run``, ``study`` and ``sweep`` call it,
and the orchestrating ones must not import W&B or Lightning to do so.
"""

from __future__ import annotations

import os
import socket
import warnings
from pathlib import Path
from urllib.parse import urlparse


def configure_wandb_mode() -> None:
    """Offline unless an API key and the W&B host are reachable; an explicit WANDB_MODE always wins."""
    if "WANDB_MODE" in os.environ:
        return
    has_key = bool(os.environ.get("WANDB_API_KEY")) or "api.wandb.ai" in _read(Path.home() / ".netrc")
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    if has_key:
        try:
            socket.create_connection((host, 443), timeout=3).close()
            return
        except OSError:
            warnings.warn(f"W&B host {host} unreachable: logging offline (sync later with `wandb sync`)")
    os.environ["WANDB_MODE"] = "offline"


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""
