"""Temporary output folders, and removing those that killed runs left behind.

Every output is written into a ``.NAME.xxxxxxxx.tmp`` folder beside it and renamed into place. A run
killed mid-save (kill -9, power loss) leaves its folder; the next run in that folder removes it, but
only when the owner marker written first into the folder proves that its run is dead.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any

from onnxq.errors import OnnxqError

logger = logging.getLogger(__name__)

#: Written first into every temporary output folder: who made it (see ``remove_stale_temporaries``).
OWNER_MARKER = "onnxq-owner.json"
#: ``tempfile.mkdtemp(prefix=".NAME.", suffix=".tmp")`` names: 8 random characters in between.
_TEMPORARY_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")


def make_temporary(folder: Path, name: str) -> Path:
    """A fresh ``.NAME.xxxxxxxx.tmp`` folder in ``folder``, its owner marker written first."""
    try:
        temporary = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=folder))
    except OSError as error:
        raise OnnxqError(
            f"cannot create a temporary folder in {folder}: {error.strerror or error}",
            "choose an -o path in a writable folder",
        ) from error
    try:
        (temporary / OWNER_MARKER).write_text(json.dumps(_owner()), encoding="utf-8")
    except OSError as error:
        shutil.rmtree(temporary, ignore_errors=True)
        raise OnnxqError(
            f"cannot write in {folder}: {error.strerror or error}", "check free space"
        ) from error
    return temporary


def _owner() -> dict[str, Any]:
    pid = os.getpid()
    return {
        "pid": pid,
        "start": _process_start(pid),
        "boot": _boot_id(),
        "host": socket.gethostname(),
        "pid_namespace": _pid_namespace(),
    }


def _process_start(pid: int) -> str | None:
    """The process start time in clock ticks since boot (Linux /proc), None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()  # the command name may hold spaces and parentheses
    return fields[19] if len(fields) > 19 else None


def _pid_namespace() -> str | None:
    """Which PID numbering this process sees (containers sharing a folder see different ones)."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text(encoding="ascii").strip() or None
    except OSError:
        return None


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Remove temporary output folders that an onnxq run killed mid-save left in ``folder``.

    Only folders named like onnxq's (``.NAME.xxxxxxxx.tmp``, not symlinks) that hold an owner marker
    saying their run is dead: another boot of this host, no process with that PID, or a process
    with that PID started at another time (PID reused). Kept: folders without a marker or with an
    unreadable one, markers from another host or PID namespace, live owners. Returns the removed folders.
    """
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        if not (_TEMPORARY_NAME.match(entry.name) and entry.is_dir(follow_symlinks=False)):
            continue
        marker = _read_marker(Path(entry.path) / OWNER_MARKER)
        if marker is not None and not _owner_alive(marker):
            shutil.rmtree(entry.path, ignore_errors=True)
            logger.info("removed %s, left by a dead onnxq run (pid %s)", entry.path, marker["pid"])
            removed.append(Path(entry.path))
    return removed


def _read_marker(path: Path) -> dict[str, Any] | None:
    try:
        if not path.is_file() or path.is_symlink():
            return None
        marker = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    pid = marker.get("pid") if isinstance(marker, dict) else None
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:  # kill(0 or -1) signals groups
        return None
    return marker


def _owner_alive(marker: dict[str, Any]) -> bool:
    """False only when the marker proves that its process is gone; True when in doubt."""
    if marker.get("host") != socket.gethostname() or marker.get("pid_namespace") != _pid_namespace():
        return True  # its PID means nothing here
    boot = _boot_id()
    if marker.get("boot") and boot and marker["boot"] != boot:
        return False
    pid = marker["pid"]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        pass
    start = _process_start(pid)
    return not (marker.get("start") and start and marker["start"] != start)
