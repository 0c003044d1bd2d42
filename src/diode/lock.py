"""One writer per output folder: a lock file holding the owner's pid and host.

A second run on the same folder is refused with a clear message. A lock left by a process that
no longer exists (killed, crashed machine) is detected and taken over, so a crashed run can be
resumed by simply rerunning its command; the temp files of atomic writes the dead process left
behind are removed then.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from types import TracebackType

from diode.errors import DiodeError

LOCK_NAME = ".diode.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class OutputLock:
    """Context manager: `with OutputLock(folder): ...` (creates the folder if needed)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.held = False

    def acquire(self) -> None:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DiodeError(f"{self.folder}: cannot create output folder ({exc.strerror})") from None
        me = json.dumps({"pid": os.getpid(), "host": socket.gethostname()})
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner is not None and owner.get("host") == socket.gethostname() and _alive(int(owner.get("pid", -1))):
                    raise DiodeError(f"{self.folder}: in use by another diode process (pid {owner['pid']}); "
                                     f"wait for it or choose another output folder") from None
                if owner is not None and owner.get("host") != socket.gethostname():
                    raise DiodeError(f"{self.folder}: locked by a diode process on host {owner.get('host')} "
                                     f"(pid {owner.get('pid')}); delete {self.path} if that run is dead") from None
                self.path.unlink(missing_ok=True)  # stale: its owner is gone
                continue
            except OSError as exc:
                raise DiodeError(f"{self.folder}: cannot write to output folder ({exc.strerror})") from None
            with os.fdopen(fd, "w") as f:
                f.write(me)
            self.held = True
            self._remove_stale_temp_files()
            return
        raise DiodeError(f"{self.folder}: could not take the lock {self.path}")

    def _remove_stale_temp_files(self) -> None:
        """Temp files of atomic writes interrupted by a kill: safe to delete once we own the folder."""
        for path in self.folder.rglob(".*.tmp"):
            if path.is_file():
                path.unlink(missing_ok=True)

    def _owner(self) -> dict | None:
        try:
            owner = json.loads(self.path.read_text())
            return owner if isinstance(owner, dict) else None
        except (OSError, ValueError):
            return None  # unreadable or half-written lock: treat as stale

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> "OutputLock":
        self.acquire()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()
