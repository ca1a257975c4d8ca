import os
import stat

import pytest

from gsnet_deploy.contracts.atomic import AtomicFiles, leftover_parts, write_bytes_atomic, write_json_atomic


def test_atomic_set_appears_together(tmp_path):
    with AtomicFiles() as files:
        files.part(tmp_path / "a.png").write_bytes(b"a")
        assert not (tmp_path / "a.png").exists()
        files.part(tmp_path / "b.npy").write_bytes(b"b")
    assert (tmp_path / "a.png").read_bytes() == b"a"
    assert (tmp_path / "b.npy").read_bytes() == b"b"
    assert leftover_parts(tmp_path) == []


def test_atomic_set_failure_keeps_previous_outputs(tmp_path):
    (tmp_path / "a.png").write_bytes(b"old-a")
    (tmp_path / "b.png").write_bytes(b"old-b")
    with pytest.raises(OSError), AtomicFiles() as files:
        files.part(tmp_path / "a.png").write_bytes(b"new-a")
        files.part(tmp_path / "b.png")
        raise OSError(28, "No space left on device")
    assert (tmp_path / "a.png").read_bytes() == b"old-a"
    assert (tmp_path / "b.png").read_bytes() == b"old-b"
    assert leftover_parts(tmp_path) == []


def test_atomic_outputs_get_umask_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        path = write_bytes_atomic(tmp_path / "x.bin", b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_atomic_json_is_complete(tmp_path):
    write_json_atomic(tmp_path / "m.json", {"b": 1, "a": [1, 2]})
    assert (tmp_path / "m.json").read_text().startswith('{\n  "a"')


def test_worker_threads_leave_termination_signals_to_the_main_thread() -> None:
    """Catches: a worker that can take SIGINT/SIGTERM, so a main thread blocked in a long call (writing an
    overlay) would not see the interrupt until that call returned (the signal test timed out under load)."""
    import signal
    import threading

    from gsnet_deploy.contracts.atomic import signals_to_main_thread

    seen: list[set[int]] = []

    def worker() -> None:
        signals_to_main_thread()
        seen.append(set(signal.pthread_sigmask(signal.SIG_BLOCK, [])))

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert {signal.SIGINT, signal.SIGTERM} <= seen[0]
    signals_to_main_thread()  # the main thread keeps receiving them
    assert signal.SIGINT not in signal.pthread_sigmask(signal.SIG_BLOCK, [])
