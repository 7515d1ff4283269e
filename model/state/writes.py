"""The only ways the toolkit writes into a user's place: a file or a folder built at a temporary
name beside its target and renamed into place whole (never through a link, never over what is
not the toolkit's: model/state/ownership.py judges that), temporaries swept when provably a dead
process's own, and a full disk turned into one line."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import hashlib
import os
import re
import shutil
import socket
import stat
from typing import Iterator

from model.errors import UserError
from model.faults import fault_point
from model.state.ownership import (check_replaceable, identity, is_real_dir, kind_of, lstat_or_none, resolve_place,
                                   still_the_one)
from model.state.markers import seal_file
from model.stopping import STOP, critical


# --------------------------------------------------------------------------- disk errors


def is_disk_full(e: BaseException) -> bool:
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(e)
    return 'No space left' in text or 'file write failed' in text or 'Disk quota' in text


@contextlib.contextmanager
def disk_errors(what: str, path: str, after: str = '') -> Iterator[None]:
    """Turn 'no space left' (also as torch's inline_container error) into one clear line."""
    try:
        yield
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - re-raised unless it is a full disk
        if not is_disk_full(e):
            raise
        raise UserError(f'disk full while writing {what} ({path}); nothing half-written was left'
                        f'{after}. Free space and run again') from None


# --------------------------------------------------------------------------- temporaries


TEMP_TAG = 'chat_small_t5-tmp'
_TEMP_RE = re.compile(r'^\.(?P<name>.+)\.' + re.escape(TEMP_TAG) +
                      r'-(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-[0-9a-f]{8}(?:\.old)?$')


@functools.lru_cache(maxsize=1)
def boot_id() -> str:
    """The running kernel's boot id (Linux): what tells one machine from another with its host
    name. Containers on one machine share it; a host name alone does not tell (containers on two
    machines may share one, and a pid of one means nothing on the other)."""
    try:
        with open('/proc/sys/kernel/random/boot_id', encoding='ascii') as f:
            return f.read(64).strip()
    except (OSError, ValueError):
        return ''


def _host_tag() -> str:
    """8 hex digits naming this machine (its host name and kernel's boot id): a pid means something
    only on the machine that made it (two nodes on one shared filesystem)."""
    return hashlib.sha256(f'{socket.gethostname()}\0{boot_id()}'.encode()).hexdigest()[:8]


def temp_path(target: str) -> str:
    """A hidden name beside target (so that os.replace is a rename on one filesystem) that says
    whose it is: ``.<name>.chat_small_t5-tmp-<host>-<pid>-<random>``. Only such names are ever
    swept (:func:`sweep_stale_temps`)."""
    folder, name = os.path.split(os.path.abspath(target).rstrip(os.sep))
    return os.path.join(folder, f'.{name}.{TEMP_TAG}-{_host_tag()}-{os.getpid()}-{os.urandom(4).hex()}')


def pid_alive(pid: int) -> bool:
    """Whether a process of this pid runs on this machine (another user's counts; a pid too
    large to be one does not)."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        return True
    return True


def stale_temps(target: str, place_locked: bool = False) -> list[str]:
    """Temporaries of ``target`` that a run of this toolkit left when it was killed (SIGKILL, a
    lost node): named by :func:`temp_path` for this very target, a plain file or folder (never a
    link), and made by a process that is gone -- on this machine (its pid is not running), or on
    any machine when the caller holds the lock of the place (no other run can be writing there)."""
    folder, name = os.path.split(os.path.abspath(target).rstrip(os.sep))
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    found = []
    for entry in names:
        m = _TEMP_RE.match(entry)
        if not m or m.group('name') != name:
            continue
        path = os.path.join(folder, entry)
        st = lstat_or_none(path)
        if st is None or not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
            continue  # a link or anything else with such a name is not one the toolkit made
        mine = m.group('host') == _host_tag()
        if int(m.group('pid')) == os.getpid() and mine:
            continue
        if place_locked or (mine and not pid_alive(int(m.group('pid')))):
            found.append(path)
    return sorted(found)


def sweep_stale_temps(target: str, place_locked: bool = False) -> list[str]:
    """Remove :func:`stale_temps` of target (a folder without following links inside it);
    returns what was removed."""
    removed = []
    for path in stale_temps(target, place_locked):
        try:
            if stat.S_ISDIR(os.lstat(path).st_mode):
                shutil.rmtree(path)
            else:
                os.unlink(path)
            removed.append(path)
        except OSError:
            pass
    return removed


# --------------------------------------------------------------------------- atomic writes


def fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _open_up(folder: str) -> None:
    """Modes as the umask asks (temporary folders and safetensors make private files; the
    results are not)."""
    mask = _umask()
    os.chmod(folder, 0o777 & ~mask)
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~mask)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_file(path: str, kinds: str | tuple[str, ...], what: str, seal: bool = True,
                own_name: bool = False, last: bool = False) -> Iterator[str]:
    """A temporary path beside the real ``path`` to write; on success it is sealed (the content
    hash filled into its marker), synced and renamed onto the path (a reader sees the old file or
    the whole new one), on failure removed. An existing path must be the toolkit's own unchanged
    file of these kinds; a link on the way is followed, never replaced. ``own_name``: the file's
    name is the toolkit's (a step or best weights file of the model_file pattern), not a place
    the user gave: a link found there is not followed, it is not the toolkit's (NotOurs). ``last``: the
    command's last output: once it is renamed into place a stop changes nothing (STOP.finish: the
    exit code stays the command's, 0, not 130/143 for work that is done)."""
    path = _real_target(path, what, own_name, file=True)
    check_replaceable(path, kinds, what, folder=False)
    with folders_for(path):  # folders made for it go again if nothing is written
        sweep_stale_temps(path)
        tmp = temp_path(path)
        try:
            with disk_errors(what, path):
                yield tmp
                fault_point('write')
                if seal:
                    seal_file(tmp)
                with open(tmp, 'rb') as f:
                    os.fsync(f.fileno())
            with critical():  # a stop lands before the rename (nothing written) or after it (all written)
                os.chmod(tmp, 0o666 & ~_umask())  # temporary files are private; the result is not
                os.replace(tmp, path)
                if last:
                    STOP.finish()
                fault_point('written')
        finally:
            if os.path.lexists(tmp):
                os.unlink(tmp)


@contextlib.contextmanager
def folders_for(path: str) -> Iterator[None]:
    """The missing folders above ``path``, made for a write in the block; when the block does not
    complete (an error, a refusal, a stop, a full disk) those it made go again -- each only while
    empty and still the folder it made (by device and inode: one a user made in its place since,
    or put something in, stays)."""
    made = make_folders(os.path.dirname(os.path.abspath(path)))
    done = False
    try:
        yield
        done = True
    finally:
        if not done:
            remove_made(made)


def make_folders(folder: str) -> list[tuple[str, tuple[int, int]]]:
    """Make ``folder`` and its missing parents, outermost first: (path, (device, inode)) of each
    this call made (one made by someone else meanwhile is not listed)."""
    missing = []
    while not os.path.lexists(folder):
        missing.append(folder)
        parent = os.path.dirname(folder)
        if parent == folder:
            break
        folder = parent
    made = []
    for folder in reversed(missing):
        try:
            os.mkdir(folder)
        except FileExistsError:
            continue
        except OSError as e:  # no right to, a name too long, a full disk: those made so far go again
            remove_made(made)
            fix = 'free space there and run again, or choose another place' if is_disk_full(e) else 'choose another place'
            raise UserError(f'cannot make the folder {folder} ({e.strerror}); {fix}') from None
        made.append((folder, identity(os.lstat(folder))))
    return made


def still_made(folder: str, made: tuple[int, int]) -> bool:
    """folder is still the real folder make_folders made (never a link, nor one made there since)."""
    return still_the_one(folder, made, stat.S_ISDIR)


def remove_made(made: list[tuple[str, tuple[int, int]]]) -> None:
    for folder, made_as in reversed(made):  # innermost first
        if still_made(folder, made_as):
            with contextlib.suppress(OSError):  # not empty: someone wrote there meanwhile
                os.rmdir(folder)


_RENAME_EXCHANGE = 2


def _exchange(a: str, b: str) -> bool:
    """Swap two paths atomically (Linux renameat2); False where the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0


def new_temp_folder(target: str) -> str:
    """An empty folder at :func:`temp_path` of target (stale ones of earlier runs swept first)."""
    parent = os.path.dirname(os.path.abspath(target).rstrip(os.sep))
    os.makedirs(parent, exist_ok=True)
    sweep_stale_temps(target)
    tmp = temp_path(target)
    os.mkdir(tmp, 0o700)
    return tmp


def _real_target(target: str, what: str, own_name: bool, file: bool = False) -> str:
    """target resolved (resolve_place; ``file``: an output file's checks); with ``own_name`` only its
    folder, its last name kept: a link there is the user's, never followed."""
    target = target.rstrip(os.sep)
    if own_name:
        return os.path.join(resolve_place(os.path.dirname(target) or '.', what), os.path.basename(target))
    return resolve_place(target, what, file=file)


def replace_folder(tmp: str, target: str, kinds: str | tuple[str, ...], what: str, own_name: bool = False) -> None:
    """Move the complete folder tmp to the real target. An existing target must be the
    toolkit's and unchanged (or empty); it is swapped out in one step where the system allows
    (never a moment without a complete copy at target), else renamed aside first and removed
    after -- without following any link inside it (nor the last one, with ``own_name``)."""
    target = _real_target(target, what, own_name)
    check_replaceable(target, kinds, what, folder=True)
    _open_up(tmp)
    fsync_dir(tmp)
    with critical():  # a stop never leaves target missing or the old folder at a temporary name
        if not os.path.lexists(target):
            os.rename(tmp, target)
        elif _exchange(tmp, target):
            shutil.rmtree(tmp)  # the old folder, now at the temporary name
        else:
            old = f'{tmp}.old'
            os.rename(target, old)
            os.rename(tmp, target)
            shutil.rmtree(old)
        fsync_dir(os.path.dirname(target))


@contextlib.contextmanager
def building_folder(target: str, kinds: str | tuple[str, ...], what: str, own_name: bool = False) -> Iterator[str]:
    """A temporary folder beside the real target to fill; on success it replaces target, on
    failure it is removed. ``own_name``: target's last name is the toolkit's (best/, final/ in
    output_dir), not a place the user gave: a link found there is never followed (one put there
    mid-run would take the model out of output_dir), it is not the toolkit's (NotOurs)."""
    target = _real_target(target, what, own_name)
    check_replaceable(target, kinds, what, folder=True)
    with folders_for(target):
        tmp = new_temp_folder(target)
        try:
            with disk_errors(what, target):
                yield tmp
                fault_point('write')
            replace_folder(tmp, target, kinds, what, own_name)
        finally:
            if os.path.lexists(tmp):
                shutil.rmtree(tmp, ignore_errors=True)


def remove_owned(path: str, kinds: str | tuple[str, ...]) -> bool:
    """Delete path only if it is wholly the toolkit's, of one of these kinds, unchanged since it
    wrote it (never a link: it is judged by lstat)."""
    kinds = (kinds,) if isinstance(kinds, str) else kinds
    if kind_of(path) not in kinds:
        return False
    if is_real_dir(path):
        shutil.rmtree(path)
    else:
        os.remove(path)
    return True


# --------------------------------------------------------------------------- locks
