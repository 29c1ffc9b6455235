"""Where a ``lits`` process logs to W&B: online only when it can, decided once per process before any logger starts.

A leaf module (standard library only): the entry points of ``lits fit``, ``run``, ``study`` and ``sweep`` call it,
and the orchestrating ones must not import W&B or Lightning to do so. ``yaml_command`` is the entry of the three
commands that take a YAML file.
"""

from __future__ import annotations

import os
import socket
import warnings
from collections.abc import Callable
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


def yaml_command(argv: list[str], usage: str, run: Callable[[str, list[str]], None]) -> None:
    """The entry of the commands that take a YAML file (``lits run``, ``study``, ``sweep``): ``usage`` for no argument
    or ``--help``, otherwise the W&B mode settled once, before any run it starts, then ``run(path, overrides)``."""
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        return
    configure_wandb_mode()
    run(argv[0], argv[1:])
