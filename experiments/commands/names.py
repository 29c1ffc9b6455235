"""Names that become folders: run, study and stage names, ``lits fit --name`` and a study's model labels.

A name is one folder name, never a path: ``name: ../../escaped_study`` or ``--name=/tmp/x`` would write outside the
run root. ``check_name`` refuses such names in one line; ``inside`` is the second guard, for every folder the suite
derives from them: resolved, it must lie inside the root it was derived from.
"""

from __future__ import annotations

import re
from pathlib import Path

from datamodules.errors import ConfigError

NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*")
NAME_RULE = "letters, digits, '-', '_' and '.', not starting with '.'"
# A model label is shown in tables ("U-Net, +4 epochs (control)") and becomes a folder through study_config.slug
LABEL = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.,+() -]*")
LABEL_RULE = "letters, digits, spaces and '-', '_', '.', ',', '+', '(', ')', not starting with '.' or a space"


def check_name(value, key: str) -> str:
    """``value`` if it is a folder name; else a ConfigError naming ``key`` and the allowed characters."""
    if not isinstance(value, str) or not NAME.fullmatch(value):
        raise ConfigError(f"{key}: a name has only {NAME_RULE}; got {value!r}")
    return value


def check_label(value, key: str) -> str:
    """``value`` if it is a model label (more characters than a name, but no '/' and no leading '.')."""
    if not isinstance(value, str) or not LABEL.fullmatch(value):
        raise ConfigError(f"{key}: a model label has only {LABEL_RULE}; got {value!r}")
    return value


def inside(root: str | Path, path: str | Path, what: str = "run folder") -> Path:
    """``path`` if, resolved, it lies inside ``root`` (resolved too); else a ConfigError."""
    resolved, base = Path(path).resolve(), Path(root).resolve()
    if resolved != base and base not in resolved.parents:
        raise ConfigError(f"{what} {path} lies outside {root}; names must not lead out of it")
    return Path(path)
