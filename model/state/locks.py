"""One run per output place: a lock file per folder, held by the kernel (flock), opened so that no
planted link or stranger's file can redirect it.

On a filesystem shared by several machines a flock stops a second run only where the filesystem
shares its locks (NFSv4, GPFS, Lustre mounted with ``-o flock``); where it does not (Lustre's
``localflock``, NFS mounted ``nolock``) every machine gets the lock, and where flock is not
there at all (Lustre without either) it fails. So the holder also renews a heartbeat in the lock
file every BEAT_S seconds (a release clears the file), and a run that takes a lock whose file
still names another machine watches that heartbeat for a little longer than one beat -- the
clocks of two machines may differ by any amount, so only a renewal tells: renewed, the other run
is alive and this one is refused; not renewed, the other run is gone (killed, its node lost) and
this one takes over. Without flock the heartbeat (and on one machine the holder's pid) is the lock.
"""

from __future__ import annotations

import errno
import json
import os
import random
import socket
import stat
import sys
import threading
import time
import weakref

from model import run_outcome
from model.errors import UserError
from model.state.ownership import identity, lock_info, read_regular_file, still_the_one
from model.state.markers import LOCK_FILE
from model.state.writes import boot_id, pid_alive


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
        if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise UserError(f'{path} cannot be opened for writing ({e.strerror}): another user\'s lock file, or one '
                            f'made read-only; if no run holds it, remove it, or give this run other output paths') from None
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or _read_info(fd) is None:
        os.close(fd)
        raise not_ours
    return fd


BEAT_S = 10.0  # the holder renews its heartbeat about this often (0.9 to 1.1 times it, drawn each beat)
_JITTER = random.SystemRandom()  # never the seeded global generator: two runs seeded alike would beat alike
CONTENT_BYTES = 512  # the lock file's content, padded to one size: a renewal overwrites it in place, never shorter
NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)  # flock not there: a filesystem without it


def _read_info(fd: int) -> dict | None:
    """The holder the lock file records ({} when empty, None when not a lock's): read twice a
    moment apart when the first read is not a lock's (a renewal may be half written)."""
    info = lock_info(os.pread(fd, 4096, 0))
    if info is None:
        time.sleep(0.05)
        info = lock_info(os.pread(fd, 4096, 0))
    return info


def _read_path(path: str) -> dict:
    """The holder as the file says now, opened afresh: an NFS client revalidates its cache at an
    open, while a file kept open may show another machine's writes late. {} when unreadable."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return {}
    try:
        return _read_info(fd) or {}
    finally:
        os.close(fd)


BOOT_ID = boot_id()  # this machine (writes.boot_id); the tests play other machines by changing it


def _same_machine(info: dict) -> bool:
    """Whether the holder a lock file names runs on this machine's kernel: the same host name and,
    where both recorded one, the same boot id (a content from before boot ids: the host name)."""
    theirs = info.get('boot')
    return info.get('host') == socket.gethostname() and not (theirs and BOOT_ID and theirs != BOOT_ID)


def _content(started: str, since: float, run: str) -> bytes:
    info = {'pid': os.getpid(), 'host': socket.gethostname(), 'boot': BOOT_ID, 'started': started, 'since': since,
            'run': run, 'beat': round(time.time(), 3)}
    return json.dumps(info).encode().ljust(CONTENT_BYTES)


_RUNS: set[str] = set()  # the random ids of the locks this process holds


def _is_mine(info: dict) -> bool:
    """Content this process wrote: by its random id (containers may share a host name and a pid,
    and a host may be renamed mid-run); a content without one by pid and host."""
    if 'run' in info:
        return info['run'] in _RUNS
    return (info.get('pid'), info.get('host')) == (os.getpid(), socket.gethostname())


def _maybe_alive(info: dict, kernel_locked: bool) -> bool:
    """Whether the holder a lock file names may still run, to be told by watching its heartbeat.
    With the kernel's lock taken, only one on another machine may (its flock may not reach here);
    without flock, one elsewhere, or one on this machine whose pid lives (a pid is reused, and a
    clock may jump: the heartbeat decides, never its age)."""
    if not info or 'beat' not in info or _is_mine(info):
        return False  # released, written before heartbeats (a flock was all there was), or this process's
    if not _same_machine(info):
        return True
    return not kernel_locked and pid_alive(info['pid'])


def _beat(info: dict) -> tuple:
    """One heartbeat of one holder: a renewal or another holder changes it."""
    return info.get('host'), info.get('pid'), info.get('since'), info.get('beat')


def _still_beating(path: str, info: dict) -> bool:
    """Watch the holder's heartbeat for a little longer than one beat: renewed, its run is alive."""
    seen = _beat(info)
    if seen in _gone:  # watched already, and not renewed since (one run holds all its places)
        return False
    print(f'note: the lock names a run on {info.get("host")} (pid {info.get("pid")}) that did not release it; '
          f'waiting up to {1.5 * BEAT_S:g} s to see whether it still runs', file=sys.stderr, flush=True)
    deadline = time.monotonic() + 1.5 * BEAT_S
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = _read_path(path)
        if _beat(now) != seen:
            return True
    _gone.add(seen)
    return False


_gone: set[tuple] = set()  # holders seen not renewing their heartbeat (by the beat seen)


def _newer(a: dict, b: dict) -> bool:
    """Whether holder a started after holder b, each by its own clock: the one order two runs
    sharing a place both agree on (each reads the same two contents; the clocks that wrote them
    need not agree, so with clocks apart it may not be the true order -- it is the same one)."""
    def key(info):
        try:
            since = float(info.get('since', 0))
        except (TypeError, ValueError):
            since = 0.0
        # the run's random id last: containers with one host name and pid, started in the same instant
        # (or on a coarse clock), tied on all the rest, and neither gave way
        return since, str(info.get('host')), str(info.get('pid')), str(info.get('run'))
    return key(a) > key(b)


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
    """One run per output place: an exclusive flock on ``<folder>/.chat_small_t5.lock``, and a
    heartbeat in it (the module's text: machines whose flock does not reach each other).

    The kernel drops the lock when the process dies, so a killed run never blocks the next
    one on its machine (its forked children close their copies at the fork: they never hold
    it); the file says who holds it (pid, host, start time, heartbeat) for the error message
    and for runs on other machines. Two runs that find each other in one lock file at a beat
    (they started together where flock does not reach, or one was paused longer than the watch
    and then taken over) agree on which started last; that one goes on, the other stops at once,
    without saving, so that the two never write the same place.
    """

    def __init__(self, folders: list[str], what: str = 'run'):
        self.folders = sorted({os.path.realpath(f) for f in folders})  # one folder reached twice: one lock
        self.what = what
        self._fds: list[int] = []
        self._beat: threading.Event | None = None
        self._mutex = threading.Lock()
        self._written = False  # the lock files hold this run's content (a release clears them)
        self._run = ''  # this hold's random id, in the content

    def _in_use(self, folder: str, why: str = '') -> UserError:
        return UserError(f'{folder} is in use by another {self.what} ({holder(folder)}){why}; '
                         f'wait for it to end, or give this one other output paths')

    def acquire(self, take_back: tuple[str, ...] = ()) -> PlaceLock:
        """Take every place, or none: on failure the lock files this made in the folders of
        ``take_back`` (folders the run itself just made) go again (:meth:`release`)."""
        import fcntl

        _HELD.add(self)
        try:
            for folder in self.folders:  # every lock file judged before any is taken or written
                os.makedirs(folder, exist_ok=True)
                self._fds.append(_open_lock(folder, os.O_RDWR | os.O_CREAT))
            kernel = []
            for folder, fd in zip(self.folders, self._fds):
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    kernel.append(True)
                except OSError as e:
                    if e.errno in NO_FLOCK:
                        _say_no_flock(folder, e)
                        kernel.append(False)
                        continue
                    if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                        raise
                    raise self._in_use(folder) from None
                if not _still_the_file(folder, fd):  # a start taking its new folder back removed it meanwhile
                    raise self._in_use(folder, ' (it was starting there a moment ago)')
            contested = not all(kernel)  # a start beside another one could both take the place
            for folder, fd, locked in zip(self.folders, self._fds, kernel):
                info = _read_info(fd) or {}
                contested |= bool(info) and not _same_machine(info)
                if _maybe_alive(info, locked) and _still_beating(os.path.join(folder, LOCK_FILE), info):
                    raise self._in_use(folder, '' if not locked or _same_machine(info) else
                                       f'; its heartbeat goes on from {info.get("host")}: the locks of this '
                                       f'filesystem do not reach between machines (e.g. Lustre without '
                                       f'-o flock, NFS mounted nolock), so only the heartbeat stops a second run')
            started, since, run = time.strftime('%Y-%m-%d %H:%M:%S'), time.time(), os.urandom(8).hex()
            self._run = run
            _RUNS.add(run)
            self._written = True
            content = _content(started, since, run)  # one beat in every file: a watcher sees the run, not the file
            for fd in self._fds:  # in place, one size: a reader never sees it empty or half gone
                _write(fd, content)
                os.ftruncate(fd, CONTENT_BYTES)
            if contested:  # two starts at once both wrote: the one whose content stays has the place
                time.sleep(0.5)
                for folder in self.folders:
                    if not _is_mine(_read_path(os.path.join(folder, LOCK_FILE))):
                        raise self._in_use(folder)
            self._start_beat(started, since, run)
        except BaseException:
            self.release(remove_in=tuple(os.path.realpath(f) for f in take_back))
            raise
        return self

    def _start_beat(self, started: str, since: float, run: str) -> None:
        stop = self._beat = threading.Event()
        places, mutex = list(zip(self.folders, self._fds)), self._mutex

        def beat():
            # each beat reads the file, then writes: two runs beating in step (started together) would each
            # read their own content back for ever and never see each other: a drawn period moves them apart
            while not stop.wait(BEAT_S * _JITTER.uniform(0.9, 1.1)):  # a watch of 1.5 x BEAT_S sees a renewal
                with mutex:  # never after release: a closed fd's number may be another file's by then
                    if stop.is_set():
                        return
                    content = _content(started, since, run)
                    mine = json.loads(content)
                    for folder, fd in places:
                        path = os.path.join(folder, LOCK_FILE)
                        now = _read_path(path)
                        # another run holds it too: if it started later (or is of a version that never
                        # gives way) and still beats, this one gives way; a dead one's content is overwritten
                        if (now and not _is_mine(now) and ('since' not in now or _newer(now, mine))
                                and _still_beating(path, now)):
                            _give_way(folder, now, self.what)
                        try:  # this run's content again (a run that started before it and wrote here gives way)
                            _write(fd, content)
                        except OSError:  # a full disk, say: the next beat tries again
                            pass

        threading.Thread(target=beat, name='chat_small_t5-lock-heartbeat', daemon=True).start()

    def release(self, remove_in: tuple[str, ...] = ()) -> None:
        """Give the places up. The lock files of the folders in ``remove_in`` (ones this run made,
        taken back as it failed to start) are removed while still held: a run that opened one
        meanwhile finds it gone once it holds it, and stops (acquire)."""
        with self._mutex:
            if self._beat is not None:
                self._beat.set()
                self._beat = None
            for folder, fd in zip(self.folders, self._fds):
                try:  # released: a run on another machine need not wait for the heartbeat to age
                    if self._written and _is_mine(_read_info(fd) or {}):
                        os.ftruncate(fd, 0)
                    if folder in remove_in and _held_here(fd) and _still_the_file(folder, fd):
                        os.unlink(os.path.join(folder, LOCK_FILE))  # held: no other run is inside it
                except OSError:
                    pass
                os.close(fd)
            self._fds = []
            _RUNS.discard(self._run)
        _HELD.discard(self)

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False


def _held_here(fd: int) -> bool:
    """This process holds the file's flock (taking it again is a no-op; one no other run holds is
    taken now): no other run is using the file."""
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


def _still_the_file(folder: str, fd: int) -> bool:
    """The lock file's name still leads to the file open as fd (not removed or replaced since)."""
    try:
        held = identity(os.fstat(fd))
    except OSError:
        return False
    return still_the_one(os.path.join(folder, LOCK_FILE), held)


def _write(fd: int, content: bytes) -> None:
    os.pwrite(fd, content, 0)
    os.fsync(fd)  # on NFS a write may wait in the client's cache: the other machines must see it now


GAVE_WAY = 75  # exit status of a run that found another one in its place (EX_TEMPFAIL)


def _give_way(folder: str, other: dict, what: str) -> None:
    """Another run that started after this one holds this place too: this one stops now, without
    saving (its DataLoader workers die with it), so that the two never write the same place."""
    import logging

    line = (f'{folder} is held by another {what} too (pid {other.get("pid")} on {other.get("host")}, started '
            f'{other.get("started")}), whose heartbeat goes on: this filesystem\'s locks do not reach between '
            f'machines, or a run was paused longer than the {1.5 * BEAT_S:g} s another one watches for; of the two, '
            f'the later start goes on and this run stops now without saving; resume it later from its last state '
            f'in a place of its own')
    if logging.getLogger().handlers:  # a training run: its log and its console say it
        logging.getLogger(__name__).error('%s', line)
    else:
        print(f'error: {line}', file=sys.stderr, flush=True)
    outcome = run_outcome.path_of_this_rank()  # scripts/rank_outcome.py's own record is skipped by os._exit:
    if outcome:  # the batch job must not read this as a crash and requeue it into the other run's place
        run_outcome.record(outcome, str(GAVE_WAY))
    os._exit(GAVE_WAY)


_said_no_flock: set[str] = set()


def _say_no_flock(folder: str, e: OSError) -> None:
    if folder not in _said_no_flock:
        _said_no_flock.add(folder)
        print(f'note: the filesystem of {folder} has no flock ({os.strerror(e.errno)}): one run per place is '
              f'kept by the lock file\'s heartbeat alone', file=sys.stderr, flush=True)


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
    fd = _open_lock(folder, os.O_RDWR)  # as the run opens it: a file it could not open is said now
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            kernel = True
        except OSError as e:
            if e.errno not in NO_FLOCK:
                return holder(folder)
            kernel = False
        info = _read_info(fd) or {}
        alive = _maybe_alive(info, kernel) and _still_beating(os.path.join(folder, LOCK_FILE), info)
        return holder(folder) if alive else None
    finally:
        os.close(fd)
