"""One writer per run folder: ``RUN/.uclr.lock``, taken over when its process is gone.

The lock file is created with ``O_CREAT | O_EXCL`` and holds JSON
``{pid, host, command, started}`` (plus the process start time where
``/proc`` has it, so a recycled process id is not mistaken for the holder).
A second command on the same folder is refused with a one-line
:class:`UclrError` while the holder runs; a lock left by a process that no
longer exists on this host (killed, crashed, machine rebooted) is taken over.
Checking and taking over happen under ``flock`` on the folder, so two
commands starting at once cannot both take a stale lock. The lock is released
on exit, also on exceptions and Ctrl-C. Taking it also removes temporary
files (``.NAME.tmp-PID``) that killed writers left in the folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import time
from pathlib import Path

from uclr_cli.errors import UclrError, os_reason

try:  # POSIX; without it the O_EXCL file alone guards the folder
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

LOCK_NAME = ".uclr.lock"
_TMP_RE = re.compile(r"^\..+\.(?:tmp|old)-(\d+)$")


def _start_time(pid: int) -> str | None:
    """Kernel start time of ``pid`` (clock ticks since boot), or None where /proc has none."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()
    if len(fields) < 20 or fields[0] == "Z":  # a zombie has exited
        return "zombie"
    return fields[19]


def pid_alive(pid: int, start: str | None = None) -> bool:
    """True if ``pid`` runs on this host (and, if given, started at ``start``)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    except OSError:
        return False
    now = _start_time(pid)
    if now == "zombie":
        return False
    if start is not None and now is not None and now != start:
        return False  # the id was recycled by another process
    return True


class RunLock:
    """``with RunLock(run_dir, "uclr pretrain"):`` -- refuse a second writer of ``run_dir``."""

    def __init__(self, run_dir: Path | str, command: str = "uclr"):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.command = command
        self.held = False
        self._payload: dict = {}

    # -- acquire / release -------------------------------------------------------------
    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UclrError(f"cannot create run folder: {os_reason(e)}", self.run_dir) from None
        with self._guard():
            self._check_kind()
            holder = self._read()
            if holder is not None:
                if self._is_live(holder):
                    raise UclrError(self._in_use(holder), self.path)
                self.path.unlink(missing_ok=True)  # stale: its process is gone
            elif self.path.exists():  # unreadable or half-written by a killed process: stale
                self.path.unlink(missing_ok=True)
            self._create()
        self.held = True
        self._clean_temporaries()

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        with contextlib.suppress(OSError):
            holder = self._read()
            if (
                holder is not None
                and holder.get("pid") == os.getpid()
                and holder.get("started") == self._payload["started"]
            ):
                self.path.unlink()

    # -- helpers -----------------------------------------------------------------------
    def _check_kind(self) -> None:
        """Whatever lies at the lock path must be a regular file uclr wrote; anything else is named, never removed."""
        if self.path.is_symlink():
            raise UclrError("the lock path is a symbolic link, not a lock file of uclr; remove it", self.path)
        if self.path.exists() and not self.path.is_file():
            raise UclrError(
                "the lock path is a folder or another non-file, not a lock file of uclr; remove it", self.path
            )

    @contextlib.contextmanager
    def _guard(self):
        """Serialise check-and-take-over between processes (flock on the folder)."""
        if fcntl is None:
            yield
            return
        fd = os.open(self.run_dir, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the flock

    def _create(self) -> None:
        self._payload = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": self.command,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "proc_start": _start_time(os.getpid()),
        }
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = self._read() or {}
            raise UclrError(self._in_use(holder), self.path) from None
        except OSError as e:
            raise UclrError(f"cannot create lock file: {os_reason(e)}", self.path) from None
        try:
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(self._payload) + "\n")
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            self.path.unlink(missing_ok=True)
            raise UclrError(f"cannot write lock file: {os_reason(e)}", self.path) from None

    def _read(self) -> dict | None:
        try:
            holder = json.loads(self.path.read_text())
        except (OSError, ValueError, UnicodeDecodeError):
            return None
        return holder if isinstance(holder, dict) else None

    def _is_live(self, holder: dict) -> bool:
        if holder.get("host") != socket.gethostname():
            return True  # cannot tell from here: never take another machine's lock
        return pid_alive(holder.get("pid"), holder.get("proc_start"))

    def _in_use(self, holder: dict) -> str:
        pid, cmd, host = holder.get("pid", "?"), holder.get("command", "?"), holder.get("host")
        on = "" if host == socket.gethostname() else f" on host {host}"
        return (
            f"run folder is in use by process {pid}{on} ({cmd}); "
            "wait for it, or delete the lock file if that process is gone"
        )

    def _clean_temporaries(self) -> None:
        """Remove ``.NAME.tmp-PID`` files of writers that no longer run (we hold the folder now)."""
        me = os.getpid()
        for folder in (self.run_dir, *self.run_dir.glob("seed-*")):
            try:
                entries = list(folder.iterdir())
            except OSError:
                continue
            for p in entries:
                m = _TMP_RE.match(p.name)
                if m and p.is_file() and int(m.group(1)) != me and not pid_alive(int(m.group(1))):
                    with contextlib.suppress(OSError):
                        p.unlink()
