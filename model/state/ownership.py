"""What the toolkit owns, judged by content, and the only ways it deletes, moves or replaces.

A thing is the toolkit's when it carries a marker the toolkit wrote *and* its content is still
what the marker records:

* a folder (tokenizer, model, training state): a ``chat_small_t5.json`` file inside that lists
  every entry it wrote -- each file with its size and SHA-256, each sub-folder. An entry the
  marker does not list (a file someone added, an empty folder, any link) or a listed file whose
  content changed is the user's: the folder is then never replaced, moved or pruned;
* a file (Parquet, weights, plot, predictions): the marker is embedded in it (the Parquet
  footer, the safetensors header, a PNG text chunk, the first line of the JSONL) and records the
  SHA-256 of the rest of the file (:func:`seal_file` fills it in after writing). A file whose
  bytes no longer match, or whose marker was copied into another file, is not the toolkit's.

Links are storage, not ownership: a path a user gives is resolved once (:func:`resolve_place`)
and written where it points; the toolkit never creates, renames, replaces or deletes a link,
never follows one while it deletes, and housekeeping files (markers, locks) are opened so that a
planted link cannot redirect a write (``O_NOFOLLOW``, ``O_EXCL``, one hard link).

Every replace, archive or prune goes through :func:`check_replaceable` (or
:func:`foreign_entries`) first; anything else in the way is a :class:`UserError` naming it.
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
import zlib
from typing import Iterator

from model.errors import UserError
from model.faults import fault_point
from model.stopping import critical

MARKER_FILE = 'chat_small_t5.json'
MARKER_KEY = 'chat_small_t5'
LOCK_FILE = '.chat_small_t5.lock'
CONTENT_KEY = 'content_sha256'
PLACEHOLDER = '0' * 64  # the content hash of a file before seal_file fills it in
MAX_MARKER_BYTES = 64 << 20  # a marker (a manifest of a sharded state included) is read up to this

# kinds of things the toolkit makes
TOKENIZER, MODEL, STATE_DIR, STATE, WEIGHTS, DATA, PREDICTIONS, PLOT = (
    'tokenizer', 'model', 'train-state', 'state', 'weights', 'prepared-data', 'predictions', 'plot')


# --------------------------------------------------------------------------- paths


def resolve_place(path: str, what: str) -> str:
    """The real path behind a path a user gives, resolved once at start: links anywhere in it
    (the last one included, even when it points to nothing yet) are followed, so the toolkit
    writes where they point and never replaces them. A link loop is a UserError."""
    real = os.path.realpath(os.path.expanduser(str(path)))
    if os.path.islink(real):
        raise UserError(f'{what}: {path} is a symbolic link that leads back to itself (a loop); fix the link')
    return real


def resolve_pattern(pattern: str, what: str) -> str:
    """A model_file-like pattern: its folder resolved, its file name kept."""
    folder, name = os.path.split(str(pattern))
    return os.path.join(resolve_place(folder or '.', what), name)


def same_or_inside(path: str, folder: str) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _lstat(path: str) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except OSError:
        return None


def is_link(path: str) -> bool:
    st = _lstat(path)
    return st is not None and stat.S_ISLNK(st.st_mode)


def is_real_dir(path: str) -> bool:
    """A folder that is not a link to one."""
    st = _lstat(path)
    return st is not None and stat.S_ISDIR(st.st_mode)


# --------------------------------------------------------------------------- folder markers


def marker_info(kind: str, **info) -> dict:
    return {'made_by': MARKER_KEY, 'kind': kind, 'version': 2,
            'created': time.strftime('%Y-%m-%d %H:%M:%S'), **info}


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 22), b''):
            digest.update(chunk)
    return digest.hexdigest()


def list_entries(folder: str) -> dict[str, os.stat_result]:
    """Every entry under folder by relative path, from lstat: links are listed, never
    followed. The folder's own marker and lock are left out."""
    out: dict[str, os.stat_result] = {}
    pending = ['']
    while pending:
        rel = pending.pop()
        for name in os.listdir(os.path.join(folder, rel)):
            r = os.path.join(rel, name) if rel else name
            if r == MARKER_FILE or (r == LOCK_FILE and _is_lock_file(os.path.join(folder, r))):
                continue
            st = os.lstat(os.path.join(folder, r))
            out[r] = st
            if stat.S_ISDIR(st.st_mode):
                pending.append(r)
    return out


def describe_entries(folder: str) -> dict[str, dict]:
    """The manifest of a folder the toolkit just filled: each file with its size and SHA-256,
    each sub-folder. The toolkit never makes links, so one found here is a bug."""
    out = {}
    for rel, st in sorted(list_entries(folder).items()):
        if stat.S_ISDIR(st.st_mode):
            out[rel] = {'type': 'dir'}
        elif stat.S_ISREG(st.st_mode):
            out[rel] = {'type': 'file', 'bytes': st.st_size, 'sha256': file_sha256(os.path.join(folder, rel))}
        else:
            raise RuntimeError(f'{os.path.join(folder, rel)}: not a plain file or folder in a folder being marked')
    return out


def write_marker(folder: str, kind: str, *, manifest: bool = True, **info) -> None:
    """Mark a folder as the toolkit's. With manifest (the default) the marker records every
    entry in it now, with its content; see :func:`foreign_entries`. Created with O_EXCL and
    O_NOFOLLOW: never written through a link, never over a file already there."""
    if manifest:
        info['entries'] = describe_entries(folder)
    data = json.dumps(marker_info(kind, **info), ensure_ascii=False, indent=1).encode()
    with critical():  # never half a marker
        fd = os.open(os.path.join(folder, MARKER_FILE), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        with os.fdopen(fd, 'wb') as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def _read_regular(path: str, limit: int) -> bytes | None:
    """The bytes of a plain file (never through a link), or None."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    with os.fdopen(fd, 'rb') as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_size > limit:
            return None
        return f.read(limit)


def read_marker(folder: str) -> dict | None:
    """The marker of a folder the toolkit made (a real folder, a plain marker file), else None."""
    if not is_real_dir(folder):
        return None
    raw = _read_regular(os.path.join(folder, MARKER_FILE), MAX_MARKER_BYTES)
    try:
        info = json.loads(raw) if raw is not None else None
    except ValueError:
        return None
    return info if isinstance(info, dict) and info.get('made_by') == MARKER_KEY else None


def folder_kind(folder: str) -> str | None:
    info = read_marker(folder)
    return info.get('kind') if info else None


def recorded_entries(info: dict) -> dict[str, dict] | None:
    """What a marker records of its folder's content, or None when it records none (a marker
    of an earlier version listing names only, or a hand-written one: it protects nothing).
    States of the first version recorded their files with checksums: those count."""
    entries = info.get('entries')
    if isinstance(entries, dict):
        return entries
    files = info.get('files')
    if isinstance(files, dict) and files and all(isinstance(v, dict) and 'sha256' in v for v in files.values()):
        out = {name: {'type': 'file', **v} for name, v in files.items()}
        for name in list(out):
            parent = os.path.dirname(name)
            while parent:
                out.setdefault(parent, {'type': 'dir'})
                parent = os.path.dirname(parent)
        return out
    return None


def foreign_entries(folder: str, deep: bool = True) -> list[str]:
    """What in a marked folder is not the toolkit's, one phrase each: an entry its marker does
    not list (a file someone added, an empty folder, any link), a listed file whose size or
    (with deep) content changed. Empty when the folder is wholly the toolkit's."""
    info = read_marker(folder)
    if info is None:
        return ['(no marker of this toolkit)']
    recorded = recorded_entries(info)
    if recorded is None:
        return [f'(its {MARKER_FILE} records no content: written by an earlier version, or by hand)']
    out = []
    for rel, st in sorted(list_entries(folder).items()):
        saved = recorded.get(rel)
        if stat.S_ISLNK(st.st_mode):
            out.append(f'{rel} (a link)')
        elif saved is None:
            out.append(f'{rel}/ (a folder)' if stat.S_ISDIR(st.st_mode) else rel)
        elif stat.S_ISDIR(st.st_mode) != (saved.get('type') == 'dir') or not (
                stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
            out.append(f'{rel} (replaced by another kind of entry)')
        elif stat.S_ISREG(st.st_mode) and (st.st_size != saved.get('bytes') or (
                deep and file_sha256(os.path.join(folder, rel)) != saved.get('sha256'))):
            out.append(f'{rel} (changed since the toolkit wrote it)')
    return out


def describe_foreign(found: list[str]) -> str:
    return ', '.join(found[:3]) + (f' and {len(found) - 3} more' if len(found) > 3 else '')


# --------------------------------------------------------------------------- file markers


def file_marker_info(kind: str, **info) -> dict:
    """The marker of a file: :func:`seal_file` replaces the placeholder by the content's hash."""
    return marker_info(kind, **info, **{CONTENT_KEY: PLACEHOLDER})


def parquet_marker(kind: str, **info) -> dict[str, str]:
    """Footer key-value metadata (ParquetWriter.add_key_value_metadata, not the schema's: a
    table read from this file and written elsewhere does not carry it along)."""
    return {MARKER_KEY: json.dumps(file_marker_info(kind, **info), ensure_ascii=False)}


def weights_metadata(**info) -> dict[str, str]:
    """safetensors header metadata (str -> str) that marks a weights file as the toolkit's."""
    return {'format': 'pt', MARKER_KEY: json.dumps(file_marker_info(WEIGHTS, **info))}


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


class _Layout:
    """Where a marked file keeps its marker and its content: byte ranges of the content (hashed)
    and of the marker (where the placeholder is filled in), and the marker's text."""

    def __init__(self, content: list[tuple[int, int]], marker: tuple[int, int], text: str | None,
                 png_chunk: int | None = None):
        self.content, self.marker, self.text, self.png_chunk = content, marker, text, png_chunk


def _layout(f, size: int) -> _Layout | None:
    f.seek(0)
    head = f.read(8)
    if head[:4] == b'PAR1':
        return _parquet_layout(f, size)
    if head == b'\x89PNG\r\n\x1a\n':
        return _png_layout(f, size)
    if len(head) == 8:  # safetensors: a little-endian header length, then the JSON header
        (n,) = struct.unpack('<Q', head)
        if n <= 100 << 20 and 8 + n <= size:
            try:
                header = json.loads(f.read(n))
            except ValueError:
                header = None
            if isinstance(header, dict):
                text = (header.get('__metadata__') or {}).get(MARKER_KEY)
                return _Layout([(8 + n, size)], (8, 8 + n), text if isinstance(text, str) else None)
    if head[:1] == b'{':  # a JSONL file whose first line is the marker
        f.seek(0)
        first = f.readline(MAX_MARKER_BYTES)
        try:
            json.loads(first)
        except ValueError:
            return None
        return _Layout([(len(first), size)], (0, len(first)), first.decode('utf-8', 'replace'))
    return None


def _parquet_layout(f, size: int) -> _Layout | None:
    """Content: every byte before the footer. The marker is the footer's key-value of that name
    (read by pyarrow); it is found in the footer's bytes by its exact text, after the row groups'
    statistics, so a row that happens to hold the same words is never taken for it."""
    import pyarrow.parquet as pq

    if size < 12:
        return None
    f.seek(size - 8)
    footer_len, magic = struct.unpack('<I4s', f.read(8))
    start = size - 8 - footer_len
    if magic != b'PAR1' or start < 4:
        return None
    f.seek(0)
    raw = (pq.read_metadata(f).metadata or {}).get(MARKER_KEY.encode())
    if raw is None:
        return _Layout([(0, start)], (start, start), None)
    f.seek(start)
    at = f.read(footer_len).rfind(raw)
    if at < 0:
        return None
    return _Layout([(0, start)], (start + at, start + at + len(raw)), raw.decode('utf-8', 'replace'))


def _png_layout(f, size: int) -> _Layout | None:
    pos, content, found = 8, [(0, 8)], None
    while pos + 12 <= size:
        f.seek(pos)
        length, kind = struct.unpack('>I4s', f.read(8))
        end = pos + 12 + length
        if kind == b'tEXt' and found is None and length <= MAX_MARKER_BYTES:
            data = f.read(length)
            key, _, value = data.partition(b'\0')
            if key == MARKER_KEY.encode():
                found = (pos, end, value.decode('latin-1'))
                pos = end
                continue
        content.append((pos, end))
        pos = end
        if kind == b'IEND':
            break
    if found is None:
        return _Layout(content, (0, 0), None)
    return _Layout(content, (found[0], found[1]), found[2], png_chunk=found[0])


def _content_hash(f, ranges: list[tuple[int, int]]) -> str:
    digest = hashlib.sha256()
    for a, b in ranges:
        f.seek(a)
        left = b - a
        while left > 0:
            chunk = f.read(min(left, 1 << 22))
            if not chunk:
                break
            digest.update(chunk)
            left -= len(chunk)
    return digest.hexdigest()


def seal_file(path: str) -> None:
    """Fill in the hash of a marked file's content, in place (same length, so nothing moves;
    a PNG chunk's CRC is recomputed)."""
    with open(path, 'r+b') as f:
        size = os.fstat(f.fileno()).st_size
        layout = _layout(f, size)
        if layout is None or layout.text is None:
            raise RuntimeError(f'{path}: no marker to seal')
        digest = _content_hash(f, layout.content).encode()
        a, b = layout.marker
        f.seek(a)
        region = f.read(b - a)
        at = region.find(PLACEHOLDER.encode())
        if at < 0 or region.find(PLACEHOLDER.encode(), at + 1) >= 0:
            raise RuntimeError(f'{path}: the marker holds no single placeholder to seal')
        region = region[:at] + digest + region[at + len(digest):]
        f.seek(a)
        f.write(region)
        if layout.png_chunk is not None:  # CRC over the chunk's type and data
            f.seek(b - 4)
            f.write(struct.pack('>I', zlib.crc32(region[4:-4]) & 0xFFFFFFFF))


def file_marker(path: str) -> dict | None:
    """The marker embedded in a plain file (read through no link), whatever its content."""
    return _file_status(path)[0]


def _file_status(path: str) -> tuple[dict | None, bool]:
    """(the embedded marker or None, whether the content matches the hash it records)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None, False
    try:
        with os.fdopen(fd, 'rb') as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                return None, False
            layout = _layout(f, st.st_size)
            if layout is None or not layout.text:
                return None, False
            info = json.loads(layout.text)
            if not isinstance(info, dict) or info.get('made_by') != MARKER_KEY:
                return None, False
            return info, info.get(CONTENT_KEY) == _content_hash(f, layout.content)
    except Exception:  # noqa: BLE001 - anything unreadable is simply not ours
        return None, False


def file_kind(path: str) -> str | None:
    """The kind of a file the toolkit wrote and nobody changed since, else None."""
    info, intact = _file_status(path)
    return info.get('kind') if info and intact else None


def kind_of(path: str) -> str | None:
    """The kind of a folder or file that is wholly the toolkit's (content checked), else None."""
    st = _lstat(path)
    if st is None or stat.S_ISLNK(st.st_mode):
        return None
    if stat.S_ISDIR(st.st_mode):
        return folder_kind(path) if not foreign_entries(path) else None
    return file_kind(path) if stat.S_ISREG(st.st_mode) else None


# --------------------------------------------------------------------------- checks


def check_replaceable(path: str, kinds: str | tuple[str, ...], what: str, *, folder: bool) -> None:
    """path is absent, an empty folder (for a folder output), or the toolkit's own of these kinds
    and unchanged since it wrote it. Anything else is a UserError that names it: the toolkit
    never replaces what it did not make. ``path`` is a resolved place (:func:`resolve_place`)."""
    kinds = (kinds,) if isinstance(kinds, str) else kinds
    check_outside_sealed(path, what)
    st = _lstat(path)
    if st is None:
        return
    if stat.S_ISLNK(st.st_mode):
        raise UserError(f'{what}: {path} is a symbolic link this toolkit did not make (to nothing, or in a '
                        f'loop); it is never replaced: remove or fix the link, or choose another path')
    if folder:
        if not stat.S_ISDIR(st.st_mode):
            raise UserError(f'{what}: {path} is a file, not a folder; choose a folder path')
        if not list_entries(path) and not os.path.lexists(os.path.join(path, MARKER_FILE)):
            return
        found = folder_kind(path)
        if found in kinds and found in GROWING:
            return  # adopted as it is: never replaced whole, its entries judged one by one
        if found in kinds:
            extra = foreign_entries(path)
            if extra:
                raise UserError(f'{what}: {path} holds what this toolkit did not write or changed since '
                                f'({describe_foreign(extra)}), so it is not replaced; move those out of it first')
            return
        made = f'a {found} folder of this toolkit' if found else 'a folder this toolkit did not make'
        raise UserError(f'{what}: {path} is {made} and is not empty; nothing in it is replaced: '
                        f'choose a new or empty folder, or move it away first')
    if stat.S_ISDIR(st.st_mode):
        raise UserError(f'{what}: {path} is a folder; give a file path, e.g. '
                        f'{os.path.join(path, "out.parquet") if DATA in kinds else path.rstrip(os.sep) + ".bin"}')
    info, intact = _file_status(path)
    if info is not None and info.get('kind') in kinds and not intact:
        raise UserError(f'{what}: {path} was written by this toolkit but changed since; it is never overwritten: '
                        f'choose another path, or move it away first')
    if info is None or info.get('kind') not in kinds:
        raise UserError(f'{what}: {path} already exists and was not written by this toolkit; '
                        f'it is never overwritten: choose another path, or move it away first')


# folders the toolkit replaces whole: anything else put inside one would block that (or be lost)
SEALED = (TOKENIZER, MODEL, STATE)
# folders whose content grows (train_state_dir): marked without a manifest, never replaced whole
GROWING = (STATE_DIR,)


def check_outside_sealed(path: str, what: str) -> None:
    """An output never lies inside a tokenizer, model or state folder of this toolkit."""
    folder = os.path.dirname(os.path.abspath(path))
    while True:
        kind = folder_kind(folder)
        if kind in SEALED:
            raise UserError(f'{what}: {path} lies inside {folder}, a {kind} folder of this toolkit that is '
                            f'replaced whole; write it elsewhere')
        parent = os.path.dirname(folder)
        if parent == folder:
            return
        folder = parent


def check_not_an_input(output: str, inputs: list[str], what: str, input_specs=()) -> None:
    """An output never equals an input file or holds one, and is never where a later read of an
    input folder (its *.parquet) or pattern would pick it up -- links on either side followed."""
    real = os.path.realpath(output)
    for f in inputs:
        if real == os.path.realpath(f) or (
                os.path.exists(output) and os.path.exists(f) and os.path.samefile(output, f)):
            raise UserError(f'{what}: {output} is also an input; write to another path')
        if os.path.isdir(output) and same_or_inside(f, output):
            raise UserError(f'{what}: {output} holds the input {f}; choose another folder')
    for spec in input_specs:
        spec = os.fspath(spec)
        if os.path.isdir(spec):
            if output.endswith('.parquet') and os.path.realpath(os.path.dirname(real)) == os.path.realpath(spec):
                raise UserError(f'{what}: {output} lies in the input folder {spec}, so a later run '
                                f'would read it as input; write it elsewhere')
        elif any(ch in spec for ch in '*?[') and glob_matches(real, spec):
            raise UserError(f'{what}: {output} matches the input pattern {spec}, so a later run '
                            f'would read it as input; write it elsewhere')


def glob_matches(path: str, pattern: str) -> bool:
    """Whether glob.glob(pattern) would list path (a real path): its file name matches the
    pattern's, and its folder is one the pattern's folder part lists (links resolved), so '*'
    never crosses a '/' and a linked folder is seen where it really is."""
    import fnmatch
    import glob

    folder_pattern, name_pattern = os.path.split(os.path.abspath(pattern))
    if not fnmatch.fnmatchcase(os.path.basename(path), name_pattern):
        return False
    folder = os.path.realpath(os.path.dirname(path))
    if not any(ch in folder_pattern for ch in '*?['):
        return os.path.realpath(folder_pattern) == folder
    return any(os.path.realpath(d) == folder for d in glob.glob(folder_pattern))


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


# --------------------------------------------------------------------------- temporaries


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
        st = _lstat(path)
        if st is None or not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
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
def atomic_file(path: str, kinds: str | tuple[str, ...], what: str, seal: bool = True) -> Iterator[str]:
    """A temporary path beside the real ``path`` to write; on success it is sealed (the content
    hash filled into its marker), synced and renamed onto the path (a reader sees the old file or
    the whole new one), on failure removed. An existing path must be the toolkit's own unchanged
    file of these kinds; a link on the way is followed, never replaced."""
    path = resolve_place(path, what)
    check_replaceable(path, kinds, what, folder=False)
    os.makedirs(os.path.dirname(path), exist_ok=True)
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
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0


def new_temp_folder(target: str) -> str:
    """An empty folder at :func:`temp_path` of target (stale ones of earlier runs swept first)."""
    parent = os.path.dirname(os.path.abspath(target).rstrip(os.sep))
    os.makedirs(parent, exist_ok=True)
    sweep_stale_temps(target)
    tmp = temp_path(target)
    os.mkdir(tmp, 0o700)
    return tmp


def replace_folder(tmp: str, target: str, kinds: str | tuple[str, ...], what: str) -> None:
    """Move the complete folder tmp to the real target. An existing target must be the
    toolkit's and unchanged (or empty); it is swapped out in one step where the system allows
    (never a moment without a complete copy at target), else renamed aside first and removed
    after -- without following any link inside it."""
    target = resolve_place(target.rstrip(os.sep), what)
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
    """A temporary folder beside the real target to fill; on success it replaces target, on
    failure it is removed."""
    target = resolve_place(target.rstrip(os.sep), what)
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


def _is_lock_file(path: str) -> bool:
    """A plain file with one link whose content is empty or a lock this toolkit wrote."""
    st = _lstat(path)
    if st is None or not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        return False
    raw = _read_regular(path, 4096)
    return raw is not None and _lock_info(raw) is not None


def _lock_info(raw: bytes) -> dict | None:
    if not raw.strip():
        return {}
    try:
        info = json.loads(raw)
    except ValueError:
        return None
    return info if isinstance(info, dict) and {'pid', 'host', 'started'} <= set(info) else None


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
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or _lock_info(os.pread(fd, 4096, 0)) is None:
        os.close(fd)
        raise not_ours
    return fd


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

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False


def holder(folder: str) -> str:
    info = _lock_info(_read_regular(os.path.join(folder, LOCK_FILE), 4096) or b'') or {}
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
