"""The one atomic writer: every file the package writes goes through here.

Why one module: a file under its final name must always be complete (a tile server or the next
pipeline step may pick it up at any moment), an image's set of outputs (mask, overlay,
probabilities) must appear together or not at all, and neither an exception, a full disk, Ctrl-C
nor SIGTERM may leave a half-written or temporary file behind.

How:
- Each output is first written to a hidden temporary file in the destination folder
  (``.<name>.<random>.part<suffix>``; the final suffix is kept so that writers that infer the
  format from it, such as PIL, still work).
- Temporary files are created and registered with SIGINT/SIGTERM blocked, so a signal cannot land
  between creating one and being able to delete it.
- ``commit`` renames every temporary file onto its final name with the signals blocked, after all
  of them were written, so the set appears together; a failure before that leaves the previous
  run's outputs untouched and removes the temporaries.
- Files get the permissions a plain ``open()`` would give (``0o666`` less the umask), not
  ``mkstemp``'s ``0o600``: outputs are meant to be read by others.

Torch-free and dependency-free; it sits at the bottom of the package with the other on-disk contracts.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

PART_MARK = ".part"  # every temporary file's name contains this (tests look for leftovers by it)
_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _umask_mode() -> int:
    """The mode ``open()`` would give a new file: ``0o666`` less the process umask."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def deferred_signals() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block ends (they are delivered right after it).

    Only the main thread receives Python signal handlers, so blocking is done there; in other
    threads this is a no-op (a signal then interrupts the main thread, not this block).
    """
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def signals_to_main_thread() -> None:
    """Block SIGINT and SIGTERM in the calling worker thread (call it first thing in every worker).

    The kernel hands a process-directed signal to any thread that does not block it; when a
    worker gets it, Python only sets a flag, and a main thread sleeping in a long C call (a write,
    a blocking wait) notices it only when that call returns. With the signals blocked in workers
    they always reach the main thread, at once, or right after ``deferred_signals`` ends.
    No-op in the main thread and where ``pthread_sigmask`` does not exist.
    """
    if threading.current_thread() is threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)


class AtomicFiles:
    """A set of output files written to temporaries and renamed into place together.

    Use as a context manager: ask ``part(final)`` for the temporary path of each output, write it,
    and leave the block; on a clean exit every file is renamed to its final name at once, on an
    exception (or a signal) every temporary is removed and no final name is touched.

    Example::

        with AtomicFiles() as files:
            np.save(files.part(out / "a.npy"), array)
            image.save(files.part(out / "a.png"))
    """

    def __init__(self, mode: int | None = None) -> None:
        self._mode = _umask_mode() if mode is None else mode
        self._parts: dict[Path, Path] = {}  # final -> temporary
        self._committed = False

    def part(self, final: str | Path) -> Path:
        """Create (empty) and return the temporary file that becomes ``final`` on commit.

        Raises:
            OSError: the destination folder cannot be written.

        """
        final = Path(final)
        if final in self._parts:
            return self._parts[final]
        with deferred_signals():
            fd, name = tempfile.mkstemp(prefix=f".{final.stem}.", suffix=f"{PART_MARK}{final.suffix}", dir=final.parent)
            os.close(fd)
            self._parts[final] = Path(name)
        return Path(name)

    def commit(self) -> list[Path]:
        """Rename every temporary onto its final name, with signals held; returns the final paths."""
        with deferred_signals():
            for tmp in self._parts.values():
                os.chmod(tmp, self._mode)
            for final, tmp in self._parts.items():
                os.replace(tmp, final)
            self._committed = True
        return list(self._parts)

    def discard(self) -> None:
        """Remove every temporary that was not committed (safe to call more than once)."""
        with deferred_signals():
            for tmp in self._parts.values():
                with contextlib.suppress(OSError):
                    tmp.unlink()
            self._parts.clear()

    def __enter__(self) -> AtomicFiles:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if exc_type is None and not self._committed:
            try:
                self.commit()
            except BaseException:
                self.discard()
                raise
        elif not self._committed:
            self.discard()


def write_with(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary beside ``path``, then rename it to ``path`` (one file)."""
    path = Path(path)
    with AtomicFiles() as files:
        write(files.part(path))
    return path


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (parent folders are created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_with(path, lambda tmp: tmp.write_bytes(data))


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | Path, payload: Any) -> Path:
    """Write ``payload`` as indented, key-sorted JSON to ``path`` atomically."""
    return write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")


def leftover_parts(folder: str | Path, names: Sequence[str] | None = None) -> list[Path]:
    """Temporary files of this module left in ``folder`` (for checks and tests)."""
    found = [p for p in Path(folder).iterdir() if p.name.startswith(".") and PART_MARK in p.name]
    if names is not None:
        found = [p for p in found if any(p.name.startswith(f".{n}") for n in names)]
    return sorted(found)
