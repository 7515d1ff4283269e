"""State folders as files: named by step, saved atomically, marked, judged by content, pruned.
File operations only (weights files and model folders are model/state/model_files.py's): what a state holds is model/state/contract.py's; an earlier run
moved aside by a fresh one is model/state/previous_runs.py's.

Layout of ``train_state_dir`` (marked as the toolkit's by ``chat_small_t5.json``)::

    state-000005000/            one complete state per folder (newest wins)
        chat_small_t5.json      the marker (kind "state"), written last with every file's size and
                                checksum: a folder without it, or whose files do not match it, is
                                not a state
        ...                     the state's parts (model/state/contract.py)
    .tmp-state-000006000/       a save in progress, holding .chat_small_t5.saving until it is
                                complete (removed when found stale; one without that file is left);
                                a pruned state is renamed to such a folder, then removed

The previous state stays until the new one is complete, so a crash, a kill or a full disk
during a save loses nothing that was already saved; a resume falls back past a damaged
newest state to the previous complete one. Every rank must see the same filesystem.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import socket
import stat
from dataclasses import dataclass, field

from model.errors import UserError
from model.state import markers, ownership, writes
from model.state.model_files import RUN_ID
from model.state.markers import STATE, STATE_DIR

# torch and numpy are imported inside the functions that need them, so that
# `train --dry_run=True` (which inspects the saved states) stays fast.

logger = logging.getLogger(__name__)

MARKER = markers.MARKER_FILE
TOKENIZER_COPY = 'tokenizer'
RUN_JSON = 'run.json'  # what describes the run that saved a state (model/state/contract.py)
_TMP_RE = re.compile(r'^\.tmp-state-\d+$')
TORCH_FILES = ('.bin', '.pkl', '.pt')


def state_name(step: int) -> str:
    return f'state-{step:09d}'


def list_complete_states(state_dir: str) -> list[tuple[int, str]]:
    """(step, path) of every state folder with a state marker, oldest first: real folders named
    ``state-<step>`` (or ``state-<step>.<n>`` where a save stepped around a folder it may not
    replace), never links."""
    found = []
    if not ownership.is_real_dir(state_dir):
        return []
    for name in os.listdir(state_dir):
        key, path = markers.state_key(name), os.path.join(state_dir, name)
        if key and ownership.is_real_dir(path) and ownership.folder_kind(path) == STATE:
            found.append((key, path))
    return [(key[0], path) for key, path in sorted(found)]


@dataclass
class StateVerdict:
    """What a saved state folder is: loadable or not (why), and what in it is not part of it."""

    path: str
    step: int
    problem: str | None = None  # why it cannot be loaded; None: every file it lists is as saved
    foreign: list[str] = field(default_factory=list)  # entries it does not list: left alone

    @property
    def loadable(self) -> bool:
        return self.problem is None

    @property
    def wholly_owned(self) -> bool:
        """The toolkit may move or delete it: loadable, and nothing in it that is not its own."""
        return self.problem is None and not self.foreign


def judge_state(path: str, deep: bool = True, pickles: bool | None = None) -> StateVerdict:
    """A state folder judged by the files its marker lists (each there, a plain file of the size
    and, with deep, the checksum saved; with pickles (default: deep), each torch file loadable as
    plain tensors) and by what else it holds (never loaded, never deleted)."""
    step = markers.state_key(os.path.basename(path))[0]
    info = ownership.read_marker(path) or {}
    recorded = ownership.recorded_entries(info)
    if not recorded:
        return StateVerdict(path, step, f'{MARKER} lists no files')
    if isinstance(info.get('step'), int) and info['step'] != step:  # a copy renamed: it would be taken for its name
        return StateVerdict(path, step, f'its marker records step {info["step"]}, not the {step} of its name (a copy '
                                        f'renamed?)')
    verdict = StateVerdict(path, step)
    on_disk = ownership.list_entries(path)
    signature = _signature(path, recorded, on_disk)
    if (deep or pickles) and signature is not None and _judged_whole.get(path) == signature:
        deep = pickles = False  # judged whole already in this process, and no listed file changed since
    for rel, saved in sorted(recorded.items()):
        if saved.get('type') == 'dir':
            continue
        st = on_disk.get(rel)
        if st is None or not stat.S_ISREG(st.st_mode):
            verdict.problem = f'{rel} is missing' if st is None else f'{rel} is no longer a plain file'
            break
        if st.st_size != saved.get('bytes'):
            verdict.problem = f'{rel} has {st.st_size} bytes, {saved.get("bytes")} were saved'
            break
        if deep and markers.file_sha256(os.path.join(path, rel)) != saved.get('sha256'):
            verdict.problem = f'{rel} differs from what was saved (checksum)'
            break
    pickles = deep if pickles is None else pickles
    if verdict.problem is None and pickles:
        verdict.problem = unsafe_pickles(path, [r for r, e in recorded.items() if e.get('type') != 'dir'])
    if verdict.problem is None and deep and pickles and signature is not None:
        _judged_whole[path] = signature
    verdict.foreign = [f'{rel} (a link)' if stat.S_ISLNK(st.st_mode) else rel
                       for rel, st in sorted(on_disk.items()) if rel not in recorded]
    return verdict


# states judged whole (checksums and torch files) in this process, by path: the signature of
# their listed files then (size, mtime, ctime, inode). A state is hashed once a process, not at
# every save's pruning; one written to since -- even with its mtime put back: the ctime moves with
# any write -- is judged again. (A disk's own bit rot changes no metadata: a later process sees it.)
_judged_whole: dict[str, tuple] = {}


def _signature(path: str, recorded: dict, on_disk: dict) -> tuple | None:
    try:
        marker = os.lstat(os.path.join(path, MARKER))
    except OSError:
        return None
    found = [(marker.st_size, marker.st_mtime_ns, marker.st_ctime_ns, marker.st_ino)]
    for rel, saved in sorted(recorded.items()):
        st = on_disk.get(rel)
        if saved.get('type') == 'dir':
            continue
        if st is None:
            return None
        found.append((rel, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino))
    return tuple(found)


def remember_whole(path: str) -> None:
    """A state this process has just written and marked: judged whole without hashing it again."""
    recorded = ownership.recorded_entries(ownership.read_marker(path) or {})
    signature = _signature(path, recorded, ownership.list_entries(path))
    if signature is not None:
        _judged_whole[path] = signature


def latest_state(state_dir: str, deep: bool = True) -> str | None:
    """The newest state a resume would load (its listed files as saved: checksums and torch files
    too, or with deep=False sizes only), or None."""
    for _, path in reversed(list_complete_states(state_dir)):
        if judge_state(path, deep).loadable:
            return path
    return None


def write_json(path: str, obj) -> None:
    with open(path, 'w', encoding='utf-8') as f:
        json.dump(obj, f, ensure_ascii=False, indent=1)  # plain data only: anything else fails the save, loudly


def read_json(path: str):
    with open(path, encoding='utf-8') as f:
        return json.load(f)


def ensure_state_dir(state_dir: str) -> None:
    """Create (or adopt an empty) train_state_dir and mark it as the toolkit's."""
    ownership.check_replaceable(state_dir, STATE_DIR, 'train_state_dir', folder=True)
    os.makedirs(state_dir, exist_ok=True)
    if ownership.folder_kind(state_dir) != STATE_DIR:
        ownership.write_marker(state_dir, STATE_DIR, manifest=False)


def unmark_state_dir(state_dir: str) -> None:
    """Take back the marker :func:`ensure_state_dir` wrote into a train_state_dir this run made
    (a run that failed to start): only the toolkit's own marker of that kind, a plain file."""
    if ownership.folder_kind(state_dir) == STATE_DIR:
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(state_dir, markers.MARKER_FILE))


def tmp_path(state_dir: str, step: int) -> str:
    """Where the state of this step is written before it is complete."""
    return os.path.join(state_dir, '.tmp-' + state_name(step))


SAVING = markers.SAVING_FILE  # what makes a half-done save provably the toolkit's (the state folder may be output_dir)
_warned_left: set[str] = set()  # folders named like a save in progress and left: said once a process


def _is_half_done_save(path: str) -> bool:
    """A real folder (never a link) holding a save's SAVING file -- or, a save killed before that
    file was written (or a removal killed after it went), holding nothing, or only that file empty."""
    if not ownership.is_real_dir(path):
        return False
    if ownership.is_saving_file(os.path.join(path, SAVING)):
        return True
    names = os.listdir(path)
    return not names or (names == [SAVING] and is_empty_file(os.path.join(path, SAVING)))


def is_empty_file(path: str) -> bool:
    """A plain file of one name, empty: what a kill between a file's creation and its one write
    leaves (a save's SAVING file, a move's record) -- nothing of anyone's."""
    st = ownership.lstat_or_none(path)
    return st is not None and stat.S_ISREG(st.st_mode) and st.st_nlink == 1 and st.st_size == 0


def _remove_half_done(path: str) -> None:
    """A half-done save (or a state being pruned) removed with its SAVING file last, so that a kill
    midway leaves what is still provably a half-done save, swept the next time (rmtree removes in
    directory order: a kill after the SAVING file went left a folder no sweep would touch). A folder
    judged half-done for holding nothing (or only an empty SAVING file) loses only that file and
    itself: rmdir fails on whatever was put in it since the judgement, which then stays."""
    if not ownership.is_saving_file(os.path.join(path, SAVING)):
        if is_empty_file(os.path.join(path, SAVING)):
            os.unlink(os.path.join(path, SAVING))
        os.rmdir(path)
        return
    for entry in os.scandir(path):
        if entry.name == SAVING:
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path)
        else:
            os.unlink(entry.path)
    with contextlib.suppress(FileNotFoundError):  # a folder whose save was killed before it was written
        os.unlink(os.path.join(path, SAVING))
    os.rmdir(path)


def temps_in_the_way(state_dir: str) -> list[str]:
    """Entries of state_dir named like a save in progress that are not one of the toolkit's (a
    link, a file, a folder of the user's): each would stop the save of its step, so the start-up
    checks name them before any step is trained."""
    if not ownership.is_real_dir(state_dir):
        return []
    return sorted(os.path.join(state_dir, n) for n in os.listdir(state_dir)
                  if _TMP_RE.match(n) and not _is_half_done_save(os.path.join(state_dir, n)))


def sweep_tmp_states(state_dir: str) -> None:
    """Saves a killed run left half-done: real folders of that name holding the save's own
    SAVING file, in this run's locked train_state_dir (no other run writes there). Links, files,
    and folders of such a name without it are not touched (said once)."""
    for name in os.listdir(state_dir):
        path = os.path.join(state_dir, name)
        if not _TMP_RE.match(name):
            continue
        if _is_half_done_save(path):
            try:
                _remove_half_done(path)
                logger.info('removed %s, a save or a prune that a stopped run left half-done', path)
            except OSError as e:
                if path not in _warned_left:  # said once a process; tried again at every save
                    _warned_left.add(path)
                    logger.warning('%s, a half-done save or pruned state, could not be removed (%s): it stays until '
                                   'removed by hand, or by a later save once it can be', path, e.strerror or e)
        elif path not in _warned_left:
            _warned_left.add(path)
            logger.warning('%s is named like a save in progress but is not one of this toolkit\'s: left as it is',
                           path)


def begin_save(state_dir: str, tmp: str) -> None:
    """The temporary folder of a save, once stale ones are gone and a state the size of the last fits."""
    ensure_state_dir(state_dir)
    sweep_tmp_states(state_dir)
    previous = latest_state(state_dir, deep=False)
    if previous:  # a state the size of the last one must fit: found before any rank writes
        need = sum(os.path.getsize(os.path.join(root, n)) for root, _, names in os.walk(previous) for n in names)
        if shutil.disk_usage(state_dir).free < need * 1.05:
            raise OSError(errno.ENOSPC, f'No space left on device: a state needs about {need} bytes')
    if os.path.lexists(tmp):  # not a save of the toolkit's (those were swept): never written into, never removed
        raise UserError(f'{tmp} is in the way of the save of this step: named like a save in progress, but this '
                        f'toolkit did not make it; move it away, then resume with --is_keep_training=True')
    os.mkdir(tmp)
    try:
        _write_saving_file(tmp)
    except OSError:  # made just now, by this call: its own file, then the folder only if empty
        with contextlib.suppress(OSError):
            os.remove(os.path.join(tmp, SAVING))
        with contextlib.suppress(OSError):
            os.rmdir(tmp)
        raise


def _write_saving_file(folder: str) -> None:
    with open(os.path.join(folder, SAVING), 'w') as f:
        f.write(f'{socket.gethostname()} {os.getpid()}\n')


def _remove_state(path: str, step: int) -> None:
    """A state pruned so that a kill at any moment leaves nothing a later run calls damaged: made a
    save in progress first (its SAVING file, which a state's judgement leaves out: still whole),
    renamed to a save's temporary name (atomic), then removed; what a kill leaves is a half-done
    save, swept by the next save (a state half removed in place was "damaged, not written by this
    toolkit", and a fresh run's checks refused it: a requeue of RESUME=auto stopped there)."""
    state_dir = os.path.dirname(path)
    _write_saving_file(path)
    tmp, n = tmp_path(state_dir, step), 0
    while os.path.lexists(tmp):  # never one already there (a stale save of that step, or not the toolkit's)
        n += 1
        tmp = f'{tmp_path(state_dir, step)}{n}'
    os.rename(path, tmp)
    writes.fsync_dir(state_dir)
    _remove_half_done(tmp)


def free_state_path(state_dir: str, step: int) -> str:
    """Where the state of this step goes: ``state-<step>``, or, when something stands there or
    beside it (a damaged state, anything of the user's, an earlier save of this step), the
    ``state-<step>.<n>`` after every one of them: a later save of a step sorts after its earlier
    ones, so it is the newest."""
    siblings = _same_step_paths(state_dir, step)
    if not siblings:
        return os.path.join(state_dir, state_name(step))
    n = markers.state_key(os.path.basename(siblings[-1]))[1] + 1
    while os.path.lexists(path := os.path.join(state_dir, f'{state_name(step)}.{n}')):
        n += 1
    return path


def _same_step_paths(state_dir: str, step: int) -> list[str]:
    """Whatever stands in state_dir under the name of a state of this step (state-<step>[.<n>]),
    by n."""
    try:
        names = os.listdir(state_dir)
    except OSError:
        return []
    found = [(key, name) for name in names if (key := markers.state_key(name)) and key[0] == step]
    return [os.path.join(state_dir, name) for _, name in sorted(found)]


def complete_save(state_dir: str, tmp: str, step: int, keep: int) -> str:
    """Data on disk, the marker with every file's checksum, the rename into place, the pruning."""
    for root, _, names in os.walk(tmp):
        for name in names:  # data on disk before the marker says complete
            _fsync_file(os.path.join(root, name))
    ownership.write_marker(tmp, STATE, step=step)  # SAVING stays until the state is in place: never listed
    final = free_state_path(state_dir, step)
    siblings = [p for p in _same_step_paths(state_dir, step) if p != final]
    mine = [p for p in siblings if _superseded_by(p, tmp)]  # this run's own earlier saves of this step: pruned
    for there in siblings:
        if there not in mine:
            logger.warning('%s holds something this toolkit may not replace; the state of step %d goes to %s',
                           there, step, final)
            break
    if mine:  # a stop cut the step's evaluation (or a resume did it): the state saved again
        logger.info('the state of step %d saved again (its evaluation pending, or done) in %s; the earlier save '
                    '%s is pruned', step, final, ', '.join(mine))
    os.rename(tmp, final)
    writes.fsync_dir(state_dir)
    if ownership.is_saving_file(os.path.join(final, SAVING)):  # in place and complete: no longer a save in progress
        with contextlib.suppress(OSError):
            os.remove(os.path.join(final, SAVING))
    remember_whole(final)
    _prune_states(state_dir, keep, final)
    sweep_tmp_states(state_dir)
    return final


_warned_not_pruned: set[str] = set()


def read_run(path: str) -> dict | None:
    """What describes the run that saved this state (its run.json); None when unreadable."""
    try:
        run = read_json(os.path.join(path, RUN_JSON))
    except (OSError, ValueError):
        return None
    return run if isinstance(run, dict) else None


def run_id_of(run: dict | None) -> str | None:
    """The run's id a state's run.json records (None: saved before runs had ids)."""
    found = run.get(RUN_ID) if isinstance(run, dict) else None
    return found if isinstance(found, str) and found else None


def state_run(path: str) -> str | None:
    """The id of the run that saved this state (None before runs had ids, or unreadable)."""
    return run_id_of(read_run(path))


def _prune_states(state_dir: str, keep: int, saved: str | None = None) -> None:
    """Delete the states older than the newest ``keep`` loadable ones of the run that just saved
    ``saved`` (default: the newest state) -- only those wholly the toolkit's; any other is left
    alone and said once. Another run's states in the folder are never pruned."""
    states = [path for _, path in list_complete_states(state_dir)]
    saved = saved or (states[-1] if states else None)
    run = state_run(saved) if states else None
    states = [path for path in states if state_run(path) == run]
    # an earlier save of the step just saved again (a stop cut that step's evaluation): not one to keep
    superseded = {p for p in states[:states.index(saved)] if _superseded_by(p, saved)} if saved in states else set()
    loadable = [p for p in states if p not in superseded and judge_state(p).loadable]  # whole: a damaged one never counts
    kept = set(loadable[-keep:]) if keep > 0 else set()
    for path in states:
        if path in kept or states.index(path) > states.index(loadable[-1] if loadable else states[-1]):
            continue
        verdict = judge_state(path)
        if verdict.wholly_owned:
            try:
                _remove_state(path, verdict.step)
                logger.info('pruned %s (a run keeps its %d newest states)', path, keep)
            except OSError as e:  # the new state is saved: what could not go is said (once), and the run goes on
                if path not in _warned_not_pruned:
                    _warned_not_pruned.add(path)
                    logger.warning('%s could not be pruned (%s): what is left of it stays until removed by hand, or '
                                   'by a later save once it can be', path, e.strerror or e)
        elif path not in _warned_not_pruned:
            _warned_not_pruned.add(path)
            why = verdict.problem or f'it holds {ownership.describe_foreign(verdict.foreign)}'
            logger.warning('%s is not pruned: %s, which this toolkit did not write', path, why)


def _superseded_by(path: str, newer: str) -> bool:
    """``path`` is a state of the same step, saved by the same run as ``newer`` (a later save of that
    step), and wholly the toolkit's: a copy the newer one replaces, not something to step around."""
    if not (ownership.is_real_dir(path) and ownership.folder_kind(path) == STATE):
        return False
    run = state_run(path)  # the cheap checks first: judging a state reads every file it lists
    if run is None or run != state_run(newer):
        return False
    verdict = judge_state(path)
    return verdict.wholly_owned and verdict.step == (ownership.read_marker(newer) or {}).get('step')


def save_failed(error: BaseException | None, state_dir: str, tmp: str, is_main: bool) -> BaseException:
    """A save that failed on some rank: its temporary folder removed (main), the error to raise."""
    if is_main and _is_half_done_save(tmp):  # this save's own folder (begin_save never took over another)
        with contextlib.suppress(OSError):
            _remove_half_done(tmp)
    previous = latest_state(state_dir)
    kept = f'; the previous state {previous} is intact' if previous else '; no earlier state was saved'
    if error is None:
        return UserError(f'another process failed while saving the state in {state_dir}{kept}')
    if writes.is_disk_full(error):
        again = 'resume with --is_keep_training=True' if previous else 'start the run again'
        return UserError(f'disk full while saving the training state in {state_dir}{kept} and nothing '
                         f'half-written was left. Free space, then {again}')
    return error


def _fsync_file(path: str) -> None:
    with open(path, 'rb') as f:
        os.fsync(f.fileno())


def unsafe_pickles(path: str, names: list[str] | None = None) -> str | None:
    """The first torch file of a state (of ``names``, the files its marker lists) that does not
    load as plain tensors and numbers (``weights_only=True``, numpy arrays allowed as accelerate
    allows them): loading it would run code from the file. None when every one loads so."""
    from accelerate.utils.other import load

    if names is None:
        names = [os.path.relpath(os.path.join(root, n), path) for root, _, files in os.walk(path) for n in files]
    for rel in sorted(names):
        if not rel.endswith(TORCH_FILES):
            continue
        try:
            load(os.path.join(path, rel), map_location='cpu', weights_only=True)
        except Exception as e:  # noqa: BLE001
            return (f'{rel} holds more than tensors and numbers '
                    f'(loading it could run code from the file: {type(e).__name__})')
    return None
