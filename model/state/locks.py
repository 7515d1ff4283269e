"""One run per output place: a lock file per folder, held by the kernel (flock), opened so that no
planted link or stranger's file can redirect it."""

from __future__ import annotations

import errno
import json
import os
import socket
import stat
import time
import weakref

from model.errors import UserError
from model.state.ownership import lock_info, read_regular_file
from model.state.markers import LOCK_FILE


def _open_lock(folder: str, flags: int) -> int:
    """The lock file of a folder, opened so that no link can redirect it (O_NOFOLLOW, a plain
    file with a single name, empty or a lock's content); else a UserError naming it."""
    path = os.path.join(folder, LOCK_FILE)
    not_ours = UserError(f'{path} is not a lock file this toolkit wrote (another kind of file, a file with a '
                         f'second name, or other content); move it away')
    try:  # O_NONBLOCK: a FIFO planted there must not hang the open
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UserError(f'{path} is a link, not the lock file this toolkit writes; remove it '
                            f'(the toolkit never writes through a link)') from None
        if e.errno in (errno.EISDIR, errno.ENXIO):
            raise not_ours from None
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or lock_info(os.pread(fd, 4096, 0)) is None:
        os.close(fd)
        raise not_ours
    return fd


_HELD: weakref.WeakSet = weakref.WeakSet()  # this process's locks now held


def _drop_in_child() -> None:
    """In a forked child (a DataLoader worker): close the copies of the lock files. A flock
    belongs to the open file, which a fork shares: a worker outliving its killed run (it looks
    for its parent only every few seconds) would otherwise hold the run's lock, and the resume
    right after the kill would be refused as "in use". Closing a copy leaves the parent's lock."""
    for lock in list(_HELD):
        for fd in lock._fds:
            try:
                os.close(fd)
            except OSError:
                pass
        lock._fds = []
    _HELD.clear()


os.register_at_fork(after_in_child=_drop_in_child)


class PlaceLock:
    """One run per output place: an exclusive flock on ``<folder>/.chat_small_t5.lock``.

    The kernel drops the lock when the process dies, so a killed run never blocks the next
    one (its forked children close their copies at the fork: they never hold it); the file
    only says who holds it (pid, host, start time) for the error message.
    """

    def __init__(self, folders: list[str], what: str = 'run'):
        self.folders = sorted({os.path.abspath(f) for f in folders})
        self.what = what
        self._fds: list[int] = []

    def acquire(self) -> PlaceLock:
        import fcntl

        _HELD.add(self)
        try:
            for folder in self.folders:  # every lock file judged before any is taken or written
                os.makedirs(folder, exist_ok=True)
                self._fds.append(_open_lock(folder, os.O_RDWR | os.O_CREAT))
            for folder, fd in zip(self.folders, self._fds):
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as e:
                    if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                        raise
                    raise UserError(f'{folder} is in use by another {self.what} ({holder(folder)}); '
                                    f'wait for it to end, or give this one other output paths') from None
            for fd in self._fds:
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps({'pid': os.getpid(), 'host': socket.gethostname(),
                                          'started': time.strftime('%Y-%m-%d %H:%M:%S')}).encode(), 0)
        except BaseException:
            self.release()
            raise
        return self

    def release(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []
        _HELD.discard(self)

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False


def holder(folder: str) -> str:
    info = lock_info(read_regular_file(os.path.join(folder, LOCK_FILE), 4096) or b'') or {}
    if {'pid', 'host', 'started'} <= set(info):
        return f'pid {info["pid"]} on {info["host"]}, started {info["started"]}'
    return 'another process'


def is_locked(folder: str) -> str | None:
    """Who holds the lock of folder, or None if nobody does (checked without waiting). A lock
    file that is a link or not the toolkit's is a UserError."""
    import fcntl

    if not os.path.lexists(os.path.join(folder, LOCK_FILE)):
        return None
    fd = _open_lock(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return holder(folder)
    finally:
        os.close(fd)
    return None
