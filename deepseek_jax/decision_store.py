"""Where ``auto``'s decisions live between processes: one JSON file per decision beside
the C++ kernel cache (``<kernel cache>/decisions/``), named by a hash of everything that
could change the answer (CPU model and flags, jax, kernel build, what was decided, the
shape class, the rule). ``backends.py`` decides; this module only keeps.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import tempfile
from pathlib import Path

import jax

import cpu_kernels.build as build
import deepseek_jax.host as host

_log = logging.getLogger("deepseek_jax.backends")


@dataclasses.dataclass(frozen=True)
class Decision:
    """What ``auto`` chose for one operation (or program) and shape class, and why."""

    op: str
    shape: tuple[int, ...]
    choice: str
    reason: str
    timings_ms: dict[str, float] = dataclasses.field(default_factory=dict)


def key(what: str, shape: tuple[int, ...], build_id: str, rule: str) -> str:
    """The file name (without .json) of the decision on ``what`` at ``shape``."""
    parts = [host.cpu_model(), build.cpu_flags(), jax.__version__, build_id, what, repr(shape)]
    digest = hashlib.sha256("\n".join([*parts, rule]).encode()).hexdigest()[:16]
    return f"{re.sub(r'[^A-Za-z0-9_.+-]', '_', what.split('|')[0])}-{digest}"


def _path(name: str) -> Path:
    return build.cache_dir() / "decisions" / f"{name}.json"


def load(name: str) -> Decision | None:
    try:
        data = json.loads(_path(name).read_text())
        return Decision(
            data["op"], tuple(data["shape"]), data["choice"], data["reason"], data["timings_ms"]
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None  # not measured yet (or an unreadable file: measure again)


def store(name: str, decision: Decision) -> Decision:
    """Stores ``decision`` unless another process stored one first, and returns the stored
    one: processes that measure at once (a run and its resumed or concurrent twin) must
    all run the same backends, or bit-identical results across processes are lost. The
    file is written under a temporary name and linked into place (first link wins), so
    nobody reads half a file. An unwritable cache only costs a measurement next time."""
    path = _path(name)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".json", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(dataclasses.asdict(decision), f)
            os.link(tmp, path)
        finally:
            os.unlink(tmp)
    except FileExistsError:
        return load(name) or decision
    except OSError as e:
        _log.warning("backends: could not cache the decision in %s: %s", path, e)
    return decision
