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

import json
import math
import os
import re
import shlex
import stat
import tempfile
from collections.abc import Callable, Iterator

from model.errors import NotOurs, UserError
from model.stopping import critical

from model.state.markers import (DATA, LOCK_FILE, MARKER_FILE, MARKER_KEY, MAX_MARKER_BYTES, MODEL, SAVING_FILE, STATE,
                                 STATE_DIR, STATE_NAME, TOKENIZER, file_status, file_kind, file_sha256, marker_info,
                                 state_key)

# --------------------------------------------------------------------------- paths


def resolve_place(path: str, what: str, file: bool = False) -> str:
    """The real path behind a path a user gives, resolved once at start: links anywhere in it
    (the last one included, even when it points to nothing yet) are followed, so the toolkit
    writes where they point and never replaces them. A link loop is a UserError; so is, for a
    ``file``, a link whose target is written as a folder (k.parquet -> k.parquet/)."""
    real = os.path.realpath(os.path.expanduser(str(path)))
    if os.path.islink(real):
        raise UserError(f'{what}: {path} is a symbolic link that leads back to itself (a loop); fix the link')
    as_folder = link_written_as_a_folder(str(path)) if file else None
    if as_folder:
        raise UserError(f'{what}={path}: the link {as_folder[0]} points to {as_folder[1]}, a folder\'s name; the '
                        f'output is a file: fix the link, or give the file itself')
    check_dangling_links(str(path), what)
    check_name_lengths(real, what)
    PLACES[real] = (str(path), *(link_to_nothing(str(path)) or (None, None)))
    return real


# Every place this command resolved: real path -> (the path as given, and the first link in it whose target
# is not there yet with that target, or None, None). Everything after reads and writes the real path, and
# its messages name it: as_given says a place behind a link to nothing with the path the user typed, and
# that it is such a link (said at the face, in the dry run's lines); a place given another way, even one
# inside it, is left as it is. Cleared at the start of each command (train_low_mem, preflight).
PLACES: dict[str, tuple[str, str | None, str | None]] = {}


def through_link_to_nothing(real: str) -> tuple[str, str, str] | None:
    """(the path as given, the link, its target) of a place resolved through a link to nothing, or None."""
    given, link, target = PLACES.get(real, (None, None, None))
    return (given, link, target) if link else None


def link_to_nothing(path: str) -> tuple[str, str] | None:
    """(the link, its target) of the first link in path whose target is not there, or None."""
    parts = os.path.abspath(os.path.expanduser(path)).split(os.sep)
    for i in range(2, len(parts) + 1):
        prefix = os.sep.join(parts[:i])
        if os.path.islink(prefix) and not os.path.exists(prefix):
            return prefix, os.path.realpath(prefix)
    return None


def as_given(text: str, fix: str = '', name_links: bool = True) -> str:
    """A message (and its fix) with each real path of a place given through a link to nothing
    (resolve_place) said as the user gave it, and that link named once after the message, with its
    target: what the user typed is what they find in the message. A path is read as the longest
    place it lies in, so one given by another flag inside such a place keeps its own name."""
    places = sorted(((real, v) for real, v in PLACES.items() if len(real) > 1), key=lambda kv: -len(kv[0]))
    if not any(link for _, (_, link, _) in places):
        return text + (f'; {fix}' if fix else '')
    pattern = re.compile('(?:' + '|'.join(re.escape(real) for real, _ in places) + r')(?=$|/|[\s;:,)\'"])')
    links = []

    def said(m: re.Match) -> str:
        given, link, target = PLACES[m.group(0)]
        if not link:
            return m.group(0)
        if (link, target) not in links and not os.path.exists(link):  # made since: said no more
            links.append((link, target))
        return given.rstrip(os.sep) or given

    text, fix = pattern.sub(said, text), pattern.sub(said, fix)
    named = ''.join(f' ({link} is a link to {target}, which is not there)' for link, target in links if name_links)
    return text + named + (f'; {fix}' if fix else '')


def error_as_given(e: UserError) -> str:
    """A UserError's line, its paths as the user gave them (:func:`as_given`)."""
    return as_given(e.message, e.fix)


def check_dangling_links(path: str, what: str) -> None:
    """A link in path that points to nothing yet is followed (the place is made there) only where
    the folder it points into exists: one whose target's folder is missing too is a scratch
    filesystem not mounted on this node, or a typo, and a requeued run would start afresh in
    folders made on the wrong disk."""
    parts = os.path.abspath(os.path.expanduser(path)).split(os.sep)
    for i in range(2, len(parts) + 1):
        prefix = os.sep.join(parts[:i])
        if not os.path.islink(prefix):
            continue
        target = os.path.realpath(prefix)
        parent = os.path.dirname(target)
        if not os.path.lexists(target) and not os.path.isdir(parent):
            why = ('which is a file, not a folder' if os.path.lexists(parent) else
                   'which is not there either (a filesystem not mounted here?)')
            shown = prefix if os.path.isabs(os.path.expanduser(path)) else os.path.relpath(prefix)  # as typed
            raise UserError(f'{what}: {shown} is a link to {os.readlink(prefix)}, which is not there; it would go '
                            f'in {parent}, {why}; mount it, make that folder, or fix the link')


def link_written_as_a_folder(path: str) -> tuple[str, str] | None:
    """(link, its target) where the chain of links at path's last name has a target written as a
    folder (ending in /, /. or /..), e.g. k2.parquet -> k.parquet/; else None. realpath drops that slash, so a
    file written through such a link lands where the link then reads "Not a directory"."""
    p = os.path.abspath(os.path.expanduser(path))
    for _ in range(40):  # a loop is resolve_place's to report
        if not os.path.islink(p):
            return None
        target = os.readlink(p)
        if os.path.basename(target) in ('', '.', '..'):  # k.parquet/, k.parquet/. : a folder's name
            return p, target
        p = os.path.join(os.path.realpath(os.path.dirname(p)), target)
        p = os.path.join(os.path.realpath(os.path.dirname(p)), os.path.basename(p))
    return None


def check_name_lengths(path: str, what: str) -> None:
    """Every name in path within what its filesystem allows (NAME_MAX of the nearest existing
    folder, PATH_MAX): said here in one line, not met as a traceback halfway through a write."""
    folder = path
    while not os.path.isdir(folder) and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
    try:
        name_max, path_max = os.pathconf(folder, 'PC_NAME_MAX'), os.pathconf(folder, 'PC_PATH_MAX')
    except (OSError, ValueError):
        name_max, path_max = 255, 4096
    long = [name for name in path.split(os.sep) if len(os.fsencode(name)) > name_max]
    if long:
        raise UserError(f'{what}: the name {long[0][:40]}... has {len(os.fsencode(long[0]))} bytes, more than '
                        f'the {name_max} a name may have there; choose a shorter one')
    if len(os.fsencode(path)) >= path_max:
        raise UserError(f'{what}: {path[:60]}... is {len(os.fsencode(path))} bytes long, more than a path may be '
                        f'({path_max - 1}); choose a shorter one')


def same_or_inside(path: str, folder: str) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def lstat_or_none(path: str) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except OSError:
        return None


def identity(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def still_the_one(path: str, made: tuple[int, int], is_kind=None) -> bool:
    """The name still leads to this very file or folder (``made``: its device and inode, taken
    while this process held it; ``is_kind``: a stat.S_IS* test it must pass): never a link put in
    its place, nor one made there since."""
    st = lstat_or_none(path)
    return st is not None and identity(st) == tuple(made) and (is_kind is None or is_kind(st.st_mode))


def recorded_identity(path: str) -> list:
    """What a record kept on disk (to be read after a kill, by another process) tells this very file
    or folder by: its real path, device, inode and change time. Device and inode alone (identity)
    are enough only while this process holds the file; across a kill an inode number is soon
    reused (a folder removed and made again often gets the same), its change time is not."""
    st = os.lstat(path)
    return [os.path.realpath(path), st.st_dev, st.st_ino, st.st_ctime_ns]


def still_as_recorded(path: str, dev: int, ino: int, ctime_ns: int) -> bool:
    """The name leads to the file or folder a record's recorded_identity describes, unchanged
    since (a rename changes its change time: so does any write into a folder)."""
    st = lstat_or_none(path)
    return st is not None and (st.st_dev, st.st_ino, st.st_ctime_ns) == (dev, ino, ctime_ns)


def is_link(path: str) -> bool:
    st = lstat_or_none(path)
    return st is not None and stat.S_ISLNK(st.st_mode)


def is_real_dir(path: str) -> bool:
    """A folder that is not a link to one."""
    st = lstat_or_none(path)
    return st is not None and stat.S_ISDIR(st.st_mode)


# --------------------------------------------------------------------------- folder markers


def iter_entries(folder: str, descend: Callable[[str], bool] | None = None
                 ) -> Iterator[tuple[str, os.stat_result]]:
    """Every entry under folder by relative path, from lstat, as it is met: links are listed,
    never followed. The folder's own marker, lock and save-in-progress file are left out, and an
    entry gone before it is looked at (another process's file) with them. ``descend(rel)``: whether
    to walk into the sub-folder rel too (default: every one). Lazy: a caller that stops at the
    first entry it needs (is the folder empty? all folders?) walks no further -- a place given by
    mistake may be a folder of millions of files."""
    pending = ['']
    while pending:
        rel = pending.pop()
        try:
            names = os.listdir(os.path.join(folder, rel))
        except FileNotFoundError:
            if not rel:
                raise
            continue
        for name in names:
            r = os.path.join(rel, name) if rel else name
            if is_own_file(folder, r):
                continue
            try:
                st = os.lstat(os.path.join(folder, r))
            except FileNotFoundError:
                continue
            yield r, st
            if stat.S_ISDIR(st.st_mode) and (descend is None or descend(r)):
                pending.append(r)


def is_own_file(folder: str, name: str) -> bool:
    """name is one of folder's own housekeeping files, never one of its entries: its marker, its
    lock, its save in progress's file."""
    return name == MARKER_FILE or (name == LOCK_FILE and _is_lock_file(os.path.join(folder, name))) or (
        name == SAVING_FILE and is_saving_file(os.path.join(folder, name)))


def list_entries(folder: str) -> dict[str, os.stat_result]:
    """:func:`iter_entries`, all of them."""
    return dict(iter_entries(folder))


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


def write_marker(folder: str, kind: str, *, manifest: bool = True, name: str = MARKER_FILE, **info) -> None:
    """Mark a folder as the toolkit's. With manifest (the default) the marker records every
    entry in it now, with its content; see :func:`foreign_entries`. Created with O_EXCL and
    O_NOFOLLOW: never written through a link, never over a file already there. ``name``: a
    record of another name (an archive's move in progress, model/state/previous_runs.py)."""
    if manifest:
        info['entries'] = describe_entries(folder)
    data = json.dumps(marker_info(kind, **info), ensure_ascii=False, indent=1).encode()
    path = os.path.join(folder, name)
    with critical():  # never half a marker
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        made = identity(os.fstat(fd))
        try:
            with os.fdopen(fd, 'wb') as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:  # a full disk: the empty or cut file this made goes (it would be no marker, in the way)
            if still_the_one(path, made):
                os.remove(path)
            raise


def read_regular_file(path: str, limit: int) -> bytes | None:
    """The bytes of a plain file (never through a link), or None."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)  # a FIFO: no wait for a writer
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > limit:  # a folder of that name opens too
            return None
        with os.fdopen(os.dup(fd), 'rb') as f:
            return f.read(limit)
    except OSError:
        return None
    finally:
        os.close(fd)


def read_marker(folder: str, name: str = MARKER_FILE) -> dict | None:
    """The marker of a folder the toolkit made (a real folder, a plain marker file), else None."""
    if not is_real_dir(folder):
        return None
    raw = read_regular_file(os.path.join(folder, name), MAX_MARKER_BYTES)
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


def missing_entries(folder: str) -> list[str]:
    """The entries a marked folder's marker records that are no longer there (a folder partly
    removed); [] for a folder whose marker records none."""
    recorded = recorded_entries(read_marker(folder) or {}) or {}
    return [rel for rel in sorted(recorded) if not os.path.lexists(os.path.join(folder, rel))]


def describe_foreign(found: list[str]) -> str:
    return ', '.join(found[:3]) + (f' and {len(found) - 3} more' if len(found) > 3 else '')


def kind_of(path: str) -> str | None:
    """The kind of a folder or file that is wholly the toolkit's (content checked), else None."""
    st = lstat_or_none(path)
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
    st = lstat_or_none(path)
    if st is None:
        return
    if stat.S_ISLNK(st.st_mode):
        leads = f'to {os.path.realpath(path)}' if os.path.exists(path) else 'to nothing, or in a loop'
        raise NotOurs(f'{what}: {path} is a symbolic link this toolkit did not make ({leads}); it is never '
                        f'replaced: remove or fix the link, or choose another path')
    if folder:
        if not stat.S_ISDIR(st.st_mode):  # a user's: never replaced (a run that meets it mid-run trains on)
            raise NotOurs(f'{what}: {path} is a file, not a folder; it is never replaced: move it away, or choose '
                          f'another path')
        if next(iter_entries(path), None) is None and not os.path.lexists(os.path.join(path, MARKER_FILE)):
            return
        found = folder_kind(path)
        if found in kinds and found in GROWING:
            return  # adopted as it is: never replaced whole, its entries judged one by one
        links = state_links(path) if found is None else []
        if found is None and any(k in GROWING for k in kinds) and _holds_only_folders_locks_and_states(
                path, passed=tuple(os.path.basename(link) for link in links)):
            if links:  # states copied by hand, one of them linked: never read through, so never passed over
                raise NotOurs(*state_links_refused(links, what))
            if os.path.lexists(os.path.join(path, MARKER_FILE)):  # ours by name, not by content: no room to mark
                raise NotOurs(f'{what}: {path} holds a {MARKER_FILE} this toolkit did not write (the name of its '
                              f'marker); it is never replaced: move it out, or choose another folder')
            return  # e.g. the run's own output folders, made inside it by their locks before it was marked
        if found in kinds:
            extra = foreign_entries(path)
            if extra:
                raise NotOurs(f'{what}: {path} holds what this toolkit did not write or changed since '
                                f'({describe_foreign(extra)}), so it is not replaced; move those out of it first')
            return
        if found == STATE and STATE_DIR in kinds:  # one state given for the folder of them: resumed from there
            raise NotOurs(f'{what}: {path} is one saved state, not a folder of states; give the folder that holds '
                          f'it: --{what}={os.path.dirname(path.rstrip(os.sep))}')
        made = f'a {found} folder of this toolkit' if found else 'a folder this toolkit did not make'
        names = sorted(n for n in os.listdir(path) if n not in (MARKER_FILE, LOCK_FILE))
        holds = (', '.join(names[:4]) + (f' and {len(names) - 4} more' if len(names) > 4 else '')) or MARKER_FILE
        raise NotOurs(f'{what}: {path} is {made} and is not empty (it holds {holds}); nothing in it is '
                        f'replaced: choose a new or empty folder, or move it away first')
    if stat.S_ISDIR(st.st_mode):
        raise UserError(f'{what}: {path} is a folder; give a file path, e.g. '
                        f'{os.path.join(path, "out.parquet") if DATA in kinds else path.rstrip(os.sep) + ".bin"}')
    info, intact = file_status(path)
    if info is not None and info.get('kind') in kinds and not intact:
        raise NotOurs(f'{what}: {path} was written by this toolkit but changed since; it is never overwritten: '
                        f'choose another path, or move it away first')
    if info is None or info.get('kind') not in kinds:
        raise NotOurs(f'{what}: {path} already exists and was not written by this toolkit; '
                        f'it is never overwritten: choose another path, or move it away first')


# folders the toolkit replaces whole: anything else put inside one would block that (or be lost)
SEALED = (TOKENIZER, MODEL, STATE)
# folders whose content grows (train_state_dir): marked without a manifest, never replaced whole
GROWING = (STATE_DIR,)


def check_outside_sealed(path: str, what: str, itself: bool = False) -> None:
    """An output never lies inside a tokenizer, model or state folder of this toolkit (``itself``:
    an output folder that is one is refused too)."""
    folder = os.path.abspath(path) if itself else os.path.dirname(os.path.abspath(path))
    while True:
        kind = folder_kind(folder)
        if kind in SEALED:
            where = 'is' if folder == os.path.abspath(path) else f'lies inside {folder},'
            raise UserError(f'{what}: {path} {where} a {kind} folder of this toolkit that is '
                            f'replaced whole; write it elsewhere')
        parent = os.path.dirname(folder)
        if parent == folder:
            return
        folder = parent


def _as_given_output(output: str, given: str | None) -> str:
    """An output's path as the user gave it, with the real path where a link lies on its way."""
    if given is None or os.path.abspath(given) == output:
        return given or output
    return f'{given} (a link to {output})' if os.path.islink(given) else f'{given} (through a link: {output})'


def check_not_an_input(output: str, inputs: list[str], what: str, input_specs=(), given: str | None = None) -> None:
    """An output never equals an input file or holds one, and is never where a later read of an
    input folder (its *.parquet) or pattern would pick it up -- links on either side followed.
    ``given``: the output as the user gave it (a link to ``output``), said first."""
    real = os.path.realpath(output)
    for f in inputs:
        if real == os.path.realpath(f) or (
                os.path.exists(output) and os.path.exists(f) and os.path.samefile(output, f)):
            raise UserError(f'{what}: {_as_given_output(output, given)} is also an input; write to another path')
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


def _holds_only_folders_locks_and_states(folder: str, passed: tuple[str, ...] = ()) -> bool:
    """Nothing under folder but folders (each with its own housekeeping files), this toolkit's lock
    files and, at its top, its state folders (named as states are, ``state-N``: not a save in
    progress, which a run sweeps away whole) and the entries named in ``passed``: adopting it as a folder that grows (never replaced
    whole) takes nothing from anyone -- the run's own output folders, made inside it by their
    locks before it was marked, or a train_state_dir made by hand from states copied out of
    another (each state is judged as a state by the run that adopts the folder: loaded only if
    whole, pruned only if wholly as saved, anything else in it left alone). One walk, never into a
    state."""
    def is_state(rel: str) -> bool:
        return os.sep not in rel and STATE_NAME.match(rel) is not None and folder_kind(
            os.path.join(folder, rel)) == STATE

    def passes(rel: str, st: os.stat_result) -> bool:
        sub, name = os.path.split(rel)
        return (stat.S_ISDIR(st.st_mode) or (name == LOCK_FILE and _is_lock_file(os.path.join(folder, rel)))
                or (sub != '' and os.sep not in sub and is_own_file(os.path.join(folder, sub), name)))

    return all(rel in passed or passes(rel, st)
               for rel, st in iter_entries(folder, descend=lambda rel: not is_state(rel)))


def state_links(folder: str) -> list[str]:
    """The links at the top of folder named as states are (``state-N``), wherever they lead. A
    state is only ever a real folder of its train_state_dir: a link is never listed, loaded,
    pruned or moved as one (model/state/states.py; deletes never go through a link)."""
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return []
    return [os.path.join(folder, n) for n in names if STATE_NAME.match(n) and is_link(os.path.join(folder, n))]


def state_link_refused(link: str, what: str) -> tuple[str, str]:
    """(message, fix) for a link among the states of a train_state_dir made by hand: the copy that
    takes its place, or -- a link to nothing -- its removal."""
    never = f'a state is read only from a folder of its own in {what}, never through a link'
    target = os.path.realpath(link)
    if os.path.isdir(target):
        # under the state's own name: its step, which its marker records (else the target's name, else the link's)
        step = (read_marker(target) or {}).get('step')
        if isinstance(step, int) and not isinstance(step, bool) and step >= 0:  # a later save's .N kept, if named so
            same = [n for n in (os.path.basename(target), os.path.basename(link)) if (state_key(n) or (-1,))[0] == step]
            name = same[0] if same else f'state-{step:09d}'
        else:
            name = os.path.basename(target) if STATE_NAME.match(os.path.basename(target)) else os.path.basename(link)
        copy = os.path.join(os.path.dirname(link), name)
        renamed = (f' (under its own name: a state is named by its step, {name})'
                   if os.path.basename(link) != name else '')
        said = f'{what}: {link} is a symbolic link to {target}; {never}'
        if copy != link and is_link(copy):  # its own name is a link too: both go, the copy takes that name
            return said, (f'copy the state in place of both links: rm {shlex.quote(link)} {shlex.quote(copy)} && '
                          f'cp -r {shlex.quote(target)} {shlex.quote(copy)}{renamed}')
        if copy != link and os.path.realpath(copy) == target:  # to a state of this very folder
            return said, f'remove the link (rm {shlex.quote(link)}): the state it leads to is in this folder already'
        if copy != link and os.path.lexists(copy):  # a `cp -r` there would copy it inside the state of that name
            return said, (f'remove the link (rm {shlex.quote(link)}): this folder holds {copy} already, a state of '
                          f'the same step; to resume from the linked one instead, move that one away first, then '
                          f'cp -r {shlex.quote(target)} {shlex.quote(copy)}')
        return said, (f'copy the state in its place: rm {shlex.quote(link)} && cp -r {shlex.quote(target)} '
                      f'{shlex.quote(copy)}{renamed}')
    there = 'is not a folder' if os.path.lexists(target) else 'is not there'
    return (f'{what}: {link} is a symbolic link to {os.readlink(link)}, which {there}; {never}',
            f'remove the link (rm {shlex.quote(link)}), and copy the state itself there to resume from it')


def state_links_refused(links: list[str], what: str) -> tuple[str, str]:
    """(message, fix) for links among the states of a train_state_dir (:func:`state_link_refused`):
    the newest said whole, the others named after it (one sentence each was a page, and one a
    run was a user fixing them one run at a time)."""
    links = sorted(links, key=lambda link: state_key(os.path.basename(link)), reverse=True)  # by step, then .N
    message, fix = state_link_refused(links[0], what)
    if len(links) > 1:
        names = ', '.join(os.path.basename(link) for link in links[1:])
        fix += (f'; and {len(links) - 1} more such link{"s" if len(links) > 2 else ""} ({names}), each to be replaced '
                f'by its state\'s copy or removed the same way')
    return message, fix


def is_saving_file(path: str) -> bool:
    """The file a save in progress holds (model/state/states.py): a plain file with one link that
    says which process saves, ``<host> <pid>``."""
    st = lstat_or_none(path)
    if st is None or not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        return False
    raw = read_regular_file(path, 512)
    return raw is not None and re.fullmatch(rb'\S+ \d+\n', raw) is not None


def _is_lock_file(path: str) -> bool:
    """A plain file with one link whose content is empty or a lock this toolkit wrote."""
    st = lstat_or_none(path)
    if st is None or not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        return False
    raw = read_regular_file(path, 4096)
    return raw is not None and lock_info(raw) is not None


def lock_info(raw: bytes) -> dict | None:
    """The holder a lock file records (pid, host, started), {} when empty, None when not a lock's."""
    if not raw.strip():
        return {}
    try:
        info = json.loads(raw)
    except ValueError:
        return None
    if not (isinstance(info, dict) and {'pid', 'host', 'started'} <= set(info)):
        return None
    kinds = {'pid': int, 'host': str, 'started': str, 'since': (int, float), 'beat': (int, float), 'run': str}
    for key, kind in kinds.items():  # a file edited by hand: never a lock's, rather than a crash or a riddle
        value = info.get(key, '' if kind is str else 0)
        if isinstance(value, bool) or not isinstance(value, kind) or (
                isinstance(value, float) and not math.isfinite(value)):
            return None
    return info if info['pid'] > 0 else None  # 0 or less would name a process group to os.kill
