"""What the toolkit owns, and the only ways it deletes, moves or replaces anything.

A thing is the toolkit's when it carries a marker the toolkit wrote:

* a folder (tokenizer, model, training-state folder): a ``chat_small_t5.json`` file inside,
  naming its kind;
* a Parquet file: the key ``chat_small_t5`` in its footer's metadata;
* a weights file: the key ``chat_small_t5`` in its safetensors header;
* a plot: a ``chat_small_t5`` text chunk in the PNG; a predictions file: its first line.

Every replace, archive or prune goes through :func:`check_replaceable` first, so a path that
merely exists -- the user's data, a checkout, a folder they made -- is never touched: it is a
:class:`UserError` naming the path. Writes go to a temporary name beside the target and are
renamed into place (:func:`atomic_write_file`, :func:`replace_folder`), so a reader never
sees half a file and a folder is never missing while it is replaced.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import re
import shutil
import socket
import stat
import struct
import tempfile
import time
from typing import Iterator

from config import UserError
from model.faults import fault_point
from model.stopping import critical

MARKER_FILE = 'chat_small_t5.json'
MARKER_KEY = 'chat_small_t5'
LOCK_FILE = '.chat_small_t5.lock'

# kinds of things the toolkit makes
TOKENIZER, MODEL, STATE_DIR, STATE, WEIGHTS, DATA, PREDICTIONS, PLOT = (
    'tokenizer', 'model', 'train-state', 'state', 'weights', 'prepared-data', 'predictions', 'plot')


# --------------------------------------------------------------------------- markers


def marker_info(kind: str, **info) -> dict:
    return {'made_by': MARKER_KEY, 'kind': kind, 'version': 1,
            'created': time.strftime('%Y-%m-%d %H:%M:%S'), **info}


def write_marker(folder: str, kind: str, *, manifest: bool = True, **info) -> None:
    """Mark a folder as the toolkit's. With manifest (the default) the marker lists every file
    in it now: a file someone adds later is not the toolkit's, and the folder is then never
    replaced or removed as a whole (see :func:`foreign_files`)."""
    if manifest and 'files' not in info:
        info['files'] = sorted(_relative_files(folder))
    with critical(), open(os.path.join(folder, MARKER_FILE), 'w', encoding='utf-8') as f:  # never half a marker
        json.dump(marker_info(kind, **info), f, ensure_ascii=False, indent=1)


def _relative_files(folder: str) -> list[str]:
    out = []
    for root, _, names in os.walk(folder):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), folder)
            if rel not in (MARKER_FILE, LOCK_FILE):
                out.append(rel)
    return out


def foreign_files(folder: str) -> list[str]:
    """Files in a marked folder that its marker does not list (someone else put them there).
    A marker without a manifest (a folder whose content grows, e.g. train_state_dir) lists none."""
    info = read_marker(folder) or {}
    files = info.get('files')
    if files is None:
        return []
    listed = set(files) if isinstance(files, (list, dict)) else set()
    return sorted(set(_relative_files(folder)) - listed)


def read_marker(folder: str) -> dict | None:
    """The marker of a folder the toolkit made, else None."""
    try:
        with open(os.path.join(folder, MARKER_FILE), encoding='utf-8') as f:
            info = json.load(f)
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and info.get('made_by') == MARKER_KEY else None


def folder_kind(folder: str) -> str | None:
    info = read_marker(folder)
    return info.get('kind') if info else None


def parquet_metadata(kind: str, **info) -> dict[bytes, bytes]:
    """Footer metadata that marks a Parquet file as the toolkit's."""
    return {MARKER_KEY.encode(): json.dumps(marker_info(kind, **info)).encode()}


def weights_metadata(**info) -> dict[str, str]:
    """safetensors header metadata (str -> str) that marks a weights file as the toolkit's."""
    return {'format': 'pt', MARKER_KEY: json.dumps(marker_info(WEIGHTS, **info))}


def safetensors_header(path: str) -> dict | None:
    """The JSON header of a safetensors file, or None if it is not one."""
    try:
        with open(path, 'rb') as f:
            head = f.read(8)
            if len(head) < 8:
                return None
            (size,) = struct.unpack('<Q', head)
            if size > 100 << 20:
                return None
            header = json.loads(f.read(size))
    except (OSError, ValueError):
        return None
    return header if isinstance(header, dict) else None


def file_kind(path: str) -> str | None:
    """The kind of a file the toolkit wrote -- its marker in a Parquet footer, a safetensors
    header, a PNG text chunk, or the first line of a JSONL file -- else None."""
    try:
        with open(path, 'rb') as f:
            head = f.read(8)
        if head[:4] == b'PAR1':
            import pyarrow.parquet as pq

            raw = (pq.read_schema(path).metadata or {}).get(MARKER_KEY.encode())
        elif head == b'\x89PNG\r\n\x1a\n':
            raw = _png_text(path).get(MARKER_KEY)
        elif head[:1] == b'{':
            with open(path, 'rb') as f:
                raw = json.dumps(json.loads(f.readline(1 << 20)))
        else:
            header = safetensors_header(path) or {}
            raw = (header.get('__metadata__') or {}).get(MARKER_KEY)
        info = json.loads(raw) if raw else None
    except Exception:  # noqa: BLE001 - anything unreadable is simply not ours
        return None
    if isinstance(info, dict) and info.get('made_by') == MARKER_KEY:
        return info.get('kind')
    return None


def _png_text(path: str) -> dict[str, str]:
    """The tEXt chunks of a PNG (matplotlib writes its savefig metadata there)."""
    out = {}
    with open(path, 'rb') as f:
        f.read(8)
        while True:
            head = f.read(8)
            if len(head) < 8:
                return out
            length, kind = struct.unpack('>I4s', head)
            if kind == b'IDAT':
                return out
            data = f.read(length)
            f.read(4)  # crc
            if kind == b'tEXt' and b'\0' in data:
                key, value = data.split(b'\0', 1)
                out[key.decode('latin-1')] = value.decode('latin-1')


def kind_of(path: str) -> str | None:
    if os.path.isdir(path):
        return folder_kind(path)
    if os.path.isfile(path):
        return file_kind(path)
    return None


# --------------------------------------------------------------------------- checks


def same_or_inside(path: str, folder: str) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_replaceable(path: str, kinds: str | tuple[str, ...], what: str, *, folder: bool) -> None:
    """path is absent, an empty folder (for a folder output), or the toolkit's own of these kinds.

    Anything else is a UserError that names it: the toolkit never replaces what it did not make.
    """
    kinds = (kinds,) if isinstance(kinds, str) else kinds
    check_outside_sealed(path, what)
    if not os.path.lexists(path):
        return
    if folder:
        if not os.path.isdir(path):
            raise UserError(f'{what}: {path} is a file, not a folder; choose a folder path')
        if not set(os.listdir(path)) - {LOCK_FILE}:
            return
        found = folder_kind(path)
        if found in kinds:
            extra = foreign_files(path)
            if extra:
                shown = ', '.join(extra[:3]) + (f' and {len(extra) - 3} more' if len(extra) > 3 else '')
                raise UserError(f'{what}: {path} holds files this toolkit did not write ({shown}), so it is '
                                f'not replaced; move them out of it first')
            return
        made = f'a {found} folder of this toolkit' if found else 'a folder this toolkit did not make'
        raise UserError(f'{what}: {path} is {made} and is not empty; nothing in it is replaced: '
                        f'choose a new or empty folder, or move it away first')
    if os.path.isdir(path):
        raise UserError(f'{what}: {path} is a folder; give a file path, e.g. '
                        f'{os.path.join(path, "out.parquet") if DATA in kinds else path.rstrip(os.sep) + ".bin"}')
    if file_kind(path) not in kinds:
        raise UserError(f'{what}: {path} already exists and was not written by this toolkit; '
                        f'it is never overwritten: choose another path, or move it away first')


# folders the toolkit replaces whole: anything else put inside one would block that (or be lost)
SEALED = (TOKENIZER, MODEL, STATE)


def check_outside_sealed(path: str, what: str) -> None:
    """An output never lies inside a tokenizer, model or state folder of this toolkit."""
    folder = os.path.dirname(os.path.abspath(path))
    while True:
        kind = folder_kind(folder) if os.path.isdir(folder) else None
        if kind in SEALED:
            raise UserError(f'{what}: {path} lies inside {folder}, a {kind} folder of this toolkit that is '
                            f'replaced whole; write it elsewhere')
        parent = os.path.dirname(folder)
        if parent == folder:
            return
        folder = parent


def check_not_an_input(output: str, inputs: list[str], what: str, input_specs=()) -> None:
    """An output never equals an input file or holds one, and is never where a later read of an
    input folder (its *.parquet) or pattern would pick it up."""
    for f in inputs:
        if os.path.realpath(output) == os.path.realpath(f) or (
                os.path.exists(output) and os.path.exists(f) and os.path.samefile(output, f)):
            raise UserError(f'{what}: {output} is also an input; write to another path')
        if os.path.isdir(output) and same_or_inside(f, output):
            raise UserError(f'{what}: {output} holds the input {f}; choose another folder')
    for spec in input_specs:
        spec = os.fspath(spec)
        if os.path.isdir(spec):
            if output.endswith('.parquet') and os.path.realpath(os.path.dirname(os.path.abspath(output))) == \
                    os.path.realpath(spec):
                raise UserError(f'{what}: {output} lies in the input folder {spec}, so a later run '
                                f'would read it as input; write it elsewhere')
        elif any(ch in spec for ch in '*?[') and glob_matches(output, spec):
            raise UserError(f'{what}: {output} matches the input pattern {spec}, so a later run '
                            f'would read it as input; write it elsewhere')


def glob_matches(path: str, pattern: str) -> bool:
    """Whether glob.glob(pattern) would list path: component by component, so '*' never
    crosses a '/'."""
    import fnmatch

    parts = os.path.abspath(path).split(os.sep)
    pattern_parts = os.path.abspath(pattern).split(os.sep)
    return len(parts) == len(pattern_parts) and all(
        fnmatch.fnmatchcase(p, q) for p, q in zip(parts, pattern_parts))


def check_writable(path: str, what: str) -> None:
    """path (file or folder, existing or not) can be created or written: its nearest existing
    ancestor is a folder in which a file can be made (a real probe: root ignores modes)."""
    probe_dir = os.path.abspath(path)
    if os.path.isdir(probe_dir):
        target = probe_dir
    else:
        target = os.path.dirname(probe_dir)
        while not os.path.lexists(target):
            target = os.path.dirname(target)
        if not os.path.isdir(target):
            raise UserError(f'{what}: {path}: {target} is a file, so nothing can be created under it')
    try:
        fd, name = tempfile.mkstemp(prefix='.chat_small_t5-probe-', dir=target)
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        raise UserError(f'{what}: cannot write in {target} ({e.strerror}); choose a writable place') from None


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
    """Modes as the umask asks (mkdtemp and safetensors make private files; the results are not)."""
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


TEMP_TAG = 'chat_small_t5-tmp'
_TEMP_RE = re.compile(r'^\.(?P<name>.+)\.' + re.escape(TEMP_TAG) +
                      r'-(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-[0-9a-f]{8}(?:\.old)?$')


def _host_tag() -> str:
    """8 hex digits naming this machine: a pid means something only on the machine that made it
    (two nodes on one shared filesystem)."""
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def temp_path(target: str) -> str:
    """A hidden name beside target (so that os.replace is a rename on one filesystem) that says
    whose it is: ``.<name>.chat_small_t5-tmp-<host>-<pid>-<random>``. Only such names are ever
    swept (:func:`sweep_stale_temps`)."""
    folder, name = os.path.split(os.path.abspath(target).rstrip(os.sep))
    return os.path.join(folder, f'.{name}.{TEMP_TAG}-{_host_tag()}-{os.getpid()}-{os.urandom(4).hex()}')


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
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
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
            continue  # a link or anything else with such a name is not one the toolkit made
        mine = m.group('host') == _host_tag()
        if int(m.group('pid')) == os.getpid() and mine:
            continue
        if place_locked or (mine and not _pid_alive(int(m.group('pid')))):
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


@contextlib.contextmanager
def atomic_file(path: str, kinds: str | tuple[str, ...], what: str) -> Iterator[str]:
    """A temporary path beside ``path`` to write; on success it is synced and renamed onto
    path (a reader sees the old file or the whole new one), on failure removed. An existing
    path must be the toolkit's own file of these kinds."""
    check_replaceable(path, kinds, what, folder=False)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    sweep_stale_temps(path)
    tmp = temp_path(path)
    try:
        with disk_errors(what, path):
            yield tmp
            fault_point('write')
            with open(tmp, 'rb') as f:
                os.fsync(f.fileno())
        with critical():  # a stop lands before the rename (nothing written) or after it (all written)
            os.chmod(tmp, 0o666 & ~_umask())  # temporary files are private; the result is not
            os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


_RENAME_EXCHANGE = 2


def _exchange(a: str, b: str) -> bool:
    """Swap two paths atomically (Linux renameat2); False where the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    return False


def new_temp_folder(target: str) -> str:
    """An empty folder at :func:`temp_path` of target (stale ones of earlier runs swept first)."""
    parent = os.path.dirname(os.path.abspath(target).rstrip(os.sep))
    os.makedirs(parent, exist_ok=True)
    sweep_stale_temps(target)
    tmp = temp_path(target)
    os.mkdir(tmp, 0o700)
    return tmp


def replace_folder(tmp: str, target: str, kinds: str | tuple[str, ...], what: str) -> None:
    """Move the complete folder tmp to target. An existing target must be the toolkit's (or
    empty); it is swapped out in one step where the system allows (never a moment without a
    complete copy at target), else renamed aside first and removed after."""
    target = os.path.abspath(target).rstrip(os.sep)
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
def building_folder(target: str, kinds: str | tuple[str, ...], what: str) -> Iterator[str]:
    """A temporary folder to fill; on success it replaces target, on failure it is removed."""
    check_replaceable(target, kinds, what, folder=True)
    tmp = new_temp_folder(target)
    try:
        with disk_errors(what, target):
            yield tmp
            fault_point('write')
        replace_folder(tmp, target, kinds, what)
    finally:
        if os.path.lexists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def remove_owned(path: str, kinds: str | tuple[str, ...]) -> bool:
    """Delete path only if it carries the toolkit's marker of one of these kinds."""
    kinds = (kinds,) if isinstance(kinds, str) else kinds
    if kind_of(path) not in kinds:
        return False
    if os.path.isdir(path):
        shutil.rmtree(path)
    else:
        os.remove(path)
    return True


# --------------------------------------------------------------------------- locks


class PlaceLock:
    """One run per output place: an exclusive flock on ``<folder>/.chat_small_t5.lock``.

    The kernel drops the lock when the process dies, so a killed run never blocks the next
    one; the file only says who holds it (pid, host, start time) for the error message.
    """

    def __init__(self, folders: list[str], what: str = 'run'):
        self.folders = sorted({os.path.abspath(f) for f in folders})
        self.what = what
        self._fds: list[int] = []

    def acquire(self) -> PlaceLock:
        import fcntl

        try:
            for folder in self.folders:
                os.makedirs(folder, exist_ok=True)
                path = os.path.join(folder, LOCK_FILE)
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as e:
                    os.close(fd)
                    if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                        raise
                    raise UserError(f'{folder} is in use by another {self.what} ({holder(folder)}); '
                                    f'wait for it to end, or give this one other output paths') from None
                os.ftruncate(fd, 0)
                os.write(fd, json.dumps({'pid': os.getpid(), 'host': socket.gethostname(),
                                         'started': time.strftime('%Y-%m-%d %H:%M:%S')}).encode())
                self._fds.append(fd)
        except BaseException:
            self.release()
            raise
        return self

    def release(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False


def holder(folder: str) -> str:
    try:
        with open(os.path.join(folder, LOCK_FILE), encoding='utf-8') as f:
            info = json.load(f)
        return f'pid {info["pid"]} on {info["host"]}, started {info["started"]}'
    except (OSError, ValueError, KeyError, TypeError):
        return 'another process'


def is_locked(folder: str) -> str | None:
    """Who holds the lock of folder, or None if nobody does (checked without waiting)."""
    import fcntl

    path = os.path.join(folder, LOCK_FILE)
    if not os.path.isfile(path):
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return holder(folder)
    finally:
        os.close(fd)
    return None
