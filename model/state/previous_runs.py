"""A fresh run moves an earlier run aside instead of overwriting it: what that run left at these
places (its states, step and best weights files, best/ and final/, the predictions `test` wrote of
them) goes whole into output_dir/previous_runs/<stamp>/ -- renamed, or, where previous_runs lies
on another filesystem, copied whole, then removed where it was. A move cut short (a kill, a full
disk) leaves records (MOVING, COPYING) by which the next fresh run finishes it into the same
folder, or a resume of the earlier run ends it. State folders as files are model/state/states.py's."""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import os
import re
import shutil
import stat

from model.errors import UserError
from model.state import markers, ownership, states as state_files, writes
from model.state.markers import MODEL, PREDICTIONS, STATE_DIR, WEIGHTS
from model.state.model_files import (MODEL_FOLDERS, PREDICTIONS_TAIL, PREVIOUS_RUNS, STATES_IN_OUTPUT_DIR,
                                     model_file_pattern, model_folder, model_folders, model_identity,
                                     owned_model_files)

logger = logging.getLogger(__name__)


def previous_run_artifacts(train_state_dir: str, model_file: str, output_dir: str) -> list[str]:
    """What an earlier run of the toolkit left at these paths and a fresh run moves aside: its
    states, step and best weights files, best/ and final/, and the predictions `test` wrote of
    those models beside them (<model>.predictions.<name>.jsonl, a step file's too when the file was
    pruned since: they go with the model they score, never stay beside the next run's model of the
    same name) -- only what is wholly its own."""
    found = [path for folder in state_folders(train_state_dir, model_file, output_dir)
             for _, path in state_files.list_complete_states(folder)]
    found += [p for _, p in owned_model_files(model_file, r'\d+|best') if markers.file_kind(p) == WEIGHTS]
    found += [p for p in model_folders(output_dir) if ownership.kind_of(p) == MODEL]
    found += [p for p in named_predictions(model_file, output_dir) if p not in found and scored_model(p) == p]
    return found


def state_folders(train_state_dir: str, model_file: str, output_dir: str) -> list[str]:
    """The state folders a fresh run moves states out of: train_state_dir, and output_dir, the
    step files' folder or output_dir's default state folder where an earlier run of this output_dir
    kept its states there (a state folder of the toolkit's: --train_state_dir=<that folder>, or
    none given)."""
    folders = [train_state_dir]
    for folder in (output_dir, model_folder(model_file), os.path.join(output_dir, STATES_IN_OUTPUT_DIR)):
        if (ownership.folder_kind(folder) == STATE_DIR
                and os.path.realpath(folder) not in {os.path.realpath(f) for f in folders}):
            folders.append(folder)
    return folders


def named_predictions(model_file: str, output_dir: str) -> list[str]:
    """Files named as the predictions of a model a run writes at these paths (its step files,
    best/, final/), whoever wrote them."""
    models = '|'.join(map(re.escape, MODEL_FOLDERS))
    found = []
    for folder, names in ((model_folder(model_file), model_file_pattern(model_file, r'\d+|best', PREDICTIONS_TAIL)),
                          (output_dir, re.compile(f'^({models})' + PREDICTIONS_TAIL + '$'))):
        for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
            path = os.path.join(folder, name)
            if names.match(name) and path not in found:
                found.append(path)
    return found


def scored_model(path: str) -> str | None:
    """For predictions `test` wrote and nobody changed since: ``path`` itself when they score the
    model beside them that their name gives (<model>.predictions.<name>.jsonl): the model's path
    as `test` resolved it is that one (there or pruned since), or the model there is the one they
    score by content (the folder moved since, links and all); else the model they do score. None:
    not such a file."""
    info = _predictions_record(path) or {}
    model = info.get('model')
    if not isinstance(model, str) or not model:
        return None
    model = os.path.normpath(model)
    if not os.path.basename(path).startswith(os.path.basename(model) + '.predictions.'):
        return model
    if os.path.realpath(os.path.dirname(model)) == os.path.realpath(os.path.dirname(path)):
        return path
    beside = os.path.join(os.path.dirname(path), os.path.basename(model))
    scored = info.get('model_id')
    return path if scored and os.path.lexists(beside) and model_identity(beside) == scored else model


def predictions_scoring(model_path: str) -> list[str]:
    """The predictions `test` wrote beside this model, under its name, of the model as it is now
    (by content, unchanged since): a save that replaces the model leaves them describing the one
    before."""
    folder, name = os.path.split(os.path.normpath(model_path))
    names = re.compile(re.escape(name) + PREDICTIONS_TAIL + '$')
    found = [os.path.join(folder, n) for n in sorted(os.listdir(folder or '.')) if names.match(n)] \
        if os.path.isdir(folder or '.') else []
    if not found:
        return []
    now = model_identity(model_path)
    return [p for p in found if now and scored_model(p) == p and (_predictions_record(p) or {}).get('model_id') == now]


def _predictions_record(path: str) -> dict | None:
    """The record of predictions `test` wrote, unchanged since; else None."""
    info, intact = markers.file_status(path)
    return info if info and intact and info.get('kind') == PREDICTIONS else None


def predictions_left_beside(model_file: str, output_dir: str) -> list[str]:
    """Notes for the files named as predictions of this place's models that a fresh run does not
    move (changed since `test` wrote them, not written by it, or scoring another model): they
    stay beside the new models of that name, which they do not describe."""
    notes = []
    for path in named_predictions(model_file, output_dir):
        scored = scored_model(path)
        if scored == path:
            continue
        why = ('it is a link (a link is never moved)' if os.path.islink(path) else f'it scores {scored}' if scored
               else '`test` did not write it, or it was changed since')
        notes.append(f'{path} is named as the predictions of a model this run writes there, but {why}: it is '
                     f'left where it is, beside the new model it does not describe')
    return notes


def archive_previous_run(train_state_dir: str, model_file: str, output_dir: str, stamp: str) -> str | None:
    """Move an earlier run's artifacts under output_dir/previous_runs/<stamp>/ instead of
    overwriting them: a fresh run never destroys what was saved. Each is judged by content
    right before it moves (the start-up checks refused a state that is not wholly the
    toolkit's); half-done saves of a killed run are removed. Returns the archive folder."""
    folders = state_folders(train_state_dir, model_file, output_dir)
    locked = {os.path.realpath(f) for f in (train_state_dir, output_dir, model_folder(model_file))}
    for folder in folders:  # half-done saves: only where this run
        if ownership.folder_kind(folder) == STATE_DIR and os.path.realpath(folder) in locked:  # holds the lock
            state_files.sweep_tmp_states(folder)
    items = previous_run_artifacts(train_state_dir, model_file, output_dir)
    # a move of these very items cut short is finished there (one whose last item was cut: ended, record removed)
    archive = unfinished_archive(output_dir, items, tidy=True)
    if not items:
        return None
    if archive is not None:
        if _take_back_part(archive):  # what a kill in the middle of a copy left; an item back at its name moves too
            items = previous_run_artifacts(train_state_dir, model_file, output_dir)
    else:
        archive = os.path.join(output_dir, PREVIOUS_RUNS, stamp)
        suffix = 1
        while os.path.lexists(archive):
            archive = os.path.join(output_dir, PREVIOUS_RUNS, f'{stamp}-{suffix}')
            suffix += 1
    moving = os.path.join(archive, MOVING)
    try:
        with writes.folders_for(os.path.join(archive, 'item')):  # taken back (while empty) if nothing could move
            if not os.path.lexists(moving):  # until the last item is in, the record of what moves
                ownership.write_marker(archive, MOVING_KIND, manifest=False, name=MOVING,
                                       output_dir=os.path.realpath(output_dir), archive=ownership.recorded_identity(archive)[:3],
                                       items=[ownership.recorded_identity(i) for i in items])
            try:
                _move_items(items, folders, archive)
            except BaseException:
                if os.listdir(archive) == [MOVING]:  # nothing moved: the folder goes again, not a split run
                    os.remove(moving)
                raise
            os.remove(moving)
    except (_MoveFailed, OSError) as e:  # a full disk, no right to write there: one line, what is where said
        item, why = (e.item, e.why) if isinstance(e, _MoveFailed) else (None, e.strerror or type(e).__name__)
        if isinstance(e, _MoveFailed) and e.full or writes.is_disk_full(e):
            why = 'no space left on the device'
        what = f'cannot move {item} into {archive}' if item else f'cannot move the earlier run into {archive}'
        if os.path.lexists(moving):
            where = (f'what moved before it is whole there, the rest stays where it was; free space there (or fix '
                     f'the cause) and run the same command again: it moves the rest into {archive}')
        else:
            where = 'nothing moved: every item stays where it was; free space there (or fix the cause) and run again'
        raise UserError(f'{what} ({why}): {where}') from None
    return archive


MOVING = '.chat_small_t5.moving'  # in an archive folder while a run's items move in: a cut move is finished there
MOVING_KIND = 'archive-in-progress'


def unfinished_archive(output_dir: str, items: list[str], tidy: bool = False) -> str | None:
    """The archive folder under output_dir/previous_runs/ into which a move of these very items
    (each the same file or folder, by device, inode and change time) was cut short -- a kill, a full disk --
    the newest if several: the rest goes there too, so one run is never split over two archives.
    Only a folder whose record is the toolkit's, for this output_dir, never trained in since (no
    lock file: a run continued it in place), is one. ``tidy`` (a run holding the place's lock): a
    record whose items all moved (a kill after the last move) is removed."""
    root = os.path.join(output_dir, PREVIOUS_RUNS)
    try:
        names = sorted(os.listdir(root))
    except OSError:
        return None
    wanted = []
    for item in items:
        try:
            wanted.append(ownership.recorded_identity(item))
        except OSError:
            return None
    found = None
    for name in names:
        folder = os.path.join(root, name)
        record = _moving_record(folder, output_dir)
        if record is None:  # not the toolkit's (an empty one, cut by a kill, marks nothing either): left as it is
            continue
        recorded = record['items']
        # the item of a copy cut in this folder is the same one whatever its change time (a kill while putting it back:
        # its rename changed it)
        held = _cut_copy_item(folder)
        if held is not None:
            recorded = [held if r[:3] == held[:3] else r for r in recorded]
        if not any(ownership.still_as_recorded(path, *rest) for path, *rest in recorded):  # all moved: the record is stale
            if tidy:
                with contextlib.suppress(OSError, UserError):
                    _take_back_part(folder)
                    os.remove(os.path.join(folder, MOVING))
            continue
        if wanted and all(w in recorded for w in wanted) and not os.path.lexists(os.path.join(folder, markers.LOCK_FILE)):
            found = folder
    return found


def states_all_moved(archive: str, output_dir: str) -> bool:
    """archive is a cut move's (its record, for output_dir) into which every state it was moving
    already went whole: finished, that move loses none of them (one still to go may be out of
    reach: node-local scratch, a filesystem not mounted here)."""
    record = _moving_record(archive, output_dir)
    states = [path for path, *_ in (record or {}).get('items', []) if markers.STATE_NAME.match(os.path.basename(path))]
    if not states or any(os.path.lexists(path) for path in states):  # one still where it was: not moved
        return False
    there = collections.Counter(os.path.basename(path) for name in os.listdir(archive) if not name.startswith('.')
                                for _, path in state_files.list_complete_states(os.path.join(archive, name)))
    return not collections.Counter(map(os.path.basename, states)) - there  # as many of each name (two folders')


def _copying_record(archive: str) -> dict | None:
    """archive's record COPYING of a copy in progress, if it is the toolkit's (kind, token, item as
    recorded_identity writes it), else None."""
    record = ownership.read_marker(archive, COPYING)
    item = record.get('item') if record is not None else None
    if (record is None or record.get('kind') != COPYING_KIND or not isinstance(record.get('token'), str)
            or not re.fullmatch(r'[0-9a-f]{32}', record['token'])
            or not (isinstance(item, list) and len(item) == 4 and isinstance(item[0], str))):
        return None
    return record


def _cut_copy_item(archive: str) -> list | None:
    """The item of the copy in progress that archive's record COPYING names, as it is now (its
    identity of today, so long as its path, device and inode are the recorded ones), else None."""
    record = _copying_record(archive)
    if record is None:
        return None
    item = record['item']
    try:
        now = ownership.recorded_identity(item[0])
    except OSError:
        return None
    return now if now[:3] == item[:3] else None


def _moving_record(folder: str, output_dir: str) -> dict | None:
    """The toolkit's record of a move in progress into folder -- this very folder (by inode), for
    output_dir -- else None."""
    # a plain file, never read through a link; a second name of it (a `cp -al` snapshot of the archive) changes
    # nothing: a record is only read and removed, never written into
    record = ownership.read_marker(folder, MOVING)
    if (record is None or record.get('kind') != MOVING_KIND or record.get('output_dir') != os.path.realpath(output_dir)
            or record.get('archive') != ownership.recorded_identity(folder)[:3]  # a copy of the folder or its record: not the one (its
            # change time changes as items move in: path, device and inode)
            or not isinstance(record.get('items'), list)
            or not all(isinstance(i, list) and len(i) == 4 for i in record['items'])):
        return None
    return record


def _move_items(items: list[str], folders: list[str], archive: str) -> None:
    """archive_previous_run's moves into the (new) archive folder; a state folder for each state
    folder they come from, made as its first state moves (one left empty by a failed move goes
    again)."""
    # by what each is, not where: a state folder may be output_dir or the step files' folder
    states_of = {path: folder for folder in folders for _, path in state_files.list_complete_states(folder)}
    # each state folder's folder in the archive, named after it: never a name the archive has or may have as a
    # run's output_dir (resumed there: a folder named final would be its final/)
    taken = {os.path.basename(os.path.normpath(item)) for item in items if item not in states_of}
    taken |= {*MODEL_FOLDERS, PREVIOUS_RUNS}
    into = {}
    for folder in dict.fromkeys(states_of.values()):
        name = os.path.basename(os.path.normpath(folder))
        while name in taken:  # e.g. a train_state_dir named final
            name += '-states'
        taken.add(name)
        into[folder] = os.path.join(archive, name)
    made = []
    try:
        for item in items:
            if item in states_of:
                if not state_files.judge_state(item, pickles=False).wholly_owned:
                    continue  # changed since the check: left where it is
                states = into[states_of[item]]
                if not os.path.isdir(states):  # the state folder itself stays (it holds the run's lock)
                    os.mkdir(states)
                    made.append((states, ownership.identity(os.lstat(states))))
                    ownership.write_marker(states, STATE_DIR, manifest=False)
                _move_whole(item, os.path.join(states, os.path.basename(item)), archive)
            elif ownership.kind_of(item) in (WEIGHTS, MODEL, PREDICTIONS):
                _move_whole(item, os.path.join(archive, os.path.basename(os.path.normpath(item))), archive)
    except BaseException:
        for states, made_as in made:  # still holding only the marker this made, or nothing (a marker cut by a full disk)
            with contextlib.suppress(OSError):
                if writes.still_made(states, made_as) and _holds_only_its_marker(states):
                    _unmake_marked(states)
        raise


def _holds_only_its_marker(folder: str) -> bool:
    """A state folder the archive made, into which nothing came: its marker alone (or not even that: one
    cut by a full disk is removed as it fails); a real folder, never one a link leads to."""
    return ownership.is_real_dir(folder) and os.listdir(folder) in ([], [markers.MARKER_FILE])


def _unmake_marked(folder: str) -> None:
    """Removes such a folder: its marker, then it (a folder that is not empty then is kept: OSError)."""
    if os.path.lexists(os.path.join(folder, markers.MARKER_FILE)):
        os.remove(os.path.join(folder, markers.MARKER_FILE))
    os.rmdir(folder)


PART = '.chat_small_t5.part-'  # + a copy's token: in the archive folder, the folder the item is copied into
REMOVING = '.chat_small_t5.removing-'  # + the token: beside the item, what the item is renamed to once copied
COPYING = '.chat_small_t5.copying'  # in the archive folder: the record of the copy in progress (token, item, target)
COPYING_KIND = 'copy-in-progress'


class _MoveFailed(Exception):
    """One item could not be moved into the archive; it stays whole where it was."""

    def __init__(self, item: str, why: str, full: bool):
        super().__init__(item, why)
        self.item, self.why, self.full = item, why, full


def _move_whole(item: str, target: str, archive: str) -> None:
    """One item into the archive: renamed, or -- where previous_runs lies on another filesystem --
    copied into a folder of its own in the archive (PART + a token), renamed into place once whole
    (its folder then removed: the mark that it is in place), and only then removed where it was
    (first renamed beside itself, REMOVING + the token, one step on its own disk). The item stays
    under its own name until its whole copy bears that name in the archive; a copy bears it only
    once whole; the record COPYING (token, item, target) lets the next run end what a kill cut
    (:func:`_take_back_part`). A copy that fails (a full disk there) is taken back: the item stays
    whole where it was (_MoveFailed). Whole: by its marker, the same as the item's (_whole_item, _marker_of).
    A name already taken in the archive gets a suffix: nothing there is ever replaced."""
    target = _free_name(target)
    try:
        os.rename(item, target)
        return
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise _MoveFailed(item, e.strerror or type(e).__name__, writes.is_disk_full(e)) from None
    _take_back_part(archive)
    token = os.urandom(16).hex()
    part, removing = os.path.join(archive, PART + token), os.path.join(os.path.dirname(item), REMOVING + token)
    copy = os.path.join(part, os.path.basename(os.path.normpath(item)))  # judged under its own name
    try:
        os.mkdir(part)  # before the record: a record means its folder was made (gone again: the copy is in place)
        marker = _marker_of(item)  # what its whole copy carries, whatever comes of the item
        ownership.write_marker(archive, COPYING_KIND, manifest=False, name=COPYING, token=token,
                               item=ownership.recorded_identity(item), target=os.path.abspath(target), marker=marker)
        if ownership.is_real_dir(item):
            shutil.copytree(item, copy, symlinks=True)
        else:
            shutil.copy2(item, copy)
        if not (marker is not None and _whole_item(copy) and _marker_of(copy) == marker):
            raise OSError(errno.EIO, 'the copy is not whole')
        os.rename(copy, target)
        os.rmdir(part)  # from here the copy is the run's item in the archive: a kill is finished by the next run
    except (OSError, shutil.Error) as e:
        with contextlib.suppress(OSError, UserError):
            _take_back_part(archive)  # the half copy this made
        raise _MoveFailed(item, getattr(e, 'strerror', None) or type(e).__name__,
                          writes.is_disk_full(e) or 'No space left' in str(e)) from None  # shutil.Error: text
    try:
        _take_back_part(archive)  # the item removed where it was, the record
    except OSError as e:
        raise UserError(f'{item} was copied whole into {target}, but removing it where it was failed '
                        f'({e.strerror or type(e).__name__}): what is left of it is {removing}; the next run '
                        f'removes it (or remove it yourself)') from None


def _take_back_part(archive: str, keep_item: bool = False) -> bool:
    """Ends what the copy its record COPYING describes left (a kill, a failure, or its own end),
    as the record and the names made of its token tell: its folder still there -- the copy is not
    in place: the folder goes (a half copy, or a whole one not yet named), the item stays; the folder
    gone -- the copy is whole in place: the item is removed where it was (renamed beside itself, then
    removed; only while it is still the very item recorded, by device, inode and change time), unless
    ``keep_item`` (a resume of the earlier run: it goes on with the item, the archive keeps the copy).
    Only real folders and files of the token's names are touched, never through a link, the record
    last: a kill in the middle is ended by the next run the same way. A record that is not the
    toolkit's stops the move in one line and stays. True: an item renamed beside itself took its name
    again (its copy in the archive gone since: never removed with no copy anywhere)."""
    record_path = os.path.join(archive, COPYING)
    record_st = ownership.lstat_or_none(record_path)
    if record_st is None or state_files.is_empty_file(record_path):  # none, or killed while it was written
        _remove_empty_parts(archive)  # a copy's folder made just before its record: empty
        if record_st is not None:
            os.remove(record_path)
        return False
    record = _copying_record(archive)  # a plain file (as the move's record: hard links change nothing)
    if record is None:
        raise UserError(f'{record_path} is in the way of the move into {archive} and was not written by this '
                        f'toolkit: move it away, then run again')
    item_id = record['item']
    token, item, target = record['token'], item_id[0], record.get('target')
    if not isinstance(target, str):
        raise UserError(f'{record_path} is in the way of the move into {archive} and was not written by this '
                        f'toolkit: move it away, then run again')
    part, removing = os.path.join(archive, PART + token), os.path.join(os.path.dirname(item), REMOVING + token)
    copy = os.path.join(part, os.path.basename(os.path.normpath(item)))
    for path in (part, removing):
        st = ownership.lstat_or_none(path)
        if st is not None and not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
            raise UserError(f'{path} is in the way of the move into {archive} and was not left there by this '
                            f'toolkit: move it away, then run again')
    # in place: the copy not in its folder (gone, or left empty by a kill between the two steps) but at the target,
    # whole, and a copy of this very item: the marker the record took from it before the copy began (the item may be
    # renamed or half removed since; a state of another run put there carries another) -- never judged by the folder
    # alone (removed by hand to free space, or by a failed copy's take-back cut before its record went, it proves
    # nothing)
    placed = (not os.path.lexists(copy) and _whole_item(target) and record.get('marker') is not None
              and _marker_of(target) == record['marker'])
    left = ownership.lstat_or_none(removing)
    if left is not None and ownership.identity(left) != tuple(item_id[1:3]):  # not the item renamed: someone's
        raise UserError(f'{removing} is in the way of the move into {archive} and was not left there by this '
                        f'toolkit: move it away, then run again')
    _remove_real(part)  # a copy not in place (half, or whole but unnamed) goes: the item stays where it is
    restored = False
    if left is not None and not placed:  # the item renamed beside itself, yet no whole copy of it in place (its copy
        # removed by hand since, to free space): the item takes its name again -- never removed with no copy anywhere
        if os.path.lexists(item):
            raise UserError(f'{removing} is {item} as a cut move into {archive} left it, its copy there gone since, and '
                            f'{item} is taken: move that away (or {removing} back to it yourself), then run again')
        os.rename(removing, item)
        if not _whole_item(item):  # its removal had begun (its copy was in place then): what is left is no state
            raise UserError(f'{item}: what is left of it is not whole -- a cut move into {archive} had begun to remove '
                            f'it, its whole copy there was removed since; look at it, move it away, then run again')
        restored = True
    elif (placed and not keep_item and left is None and ownership.still_as_recorded(*item_id) and _whole_item(item)
          and _marker_of(item) == record['marker']):  # still what was copied (files rewritten in place in a folder
        # leave its change time as it was)
        os.rename(item, removing)  # its whole copy is in place: the item goes (one step, then removed)
    _remove_real(removing)  # only the item whose whole copy is in place is still there
    os.remove(record_path)
    _remove_empty_parts(archive)
    return restored


def _remove_empty_parts(archive: str) -> None:
    """Empty copy folders of the toolkit's (PART + a token) in the archive: a kill between making one
    and writing its record leaves it -- nothing of anyone's."""
    for name in os.listdir(archive):
        path = os.path.join(archive, name)
        if re.fullmatch(re.escape(PART) + r'[0-9a-f]{32}', name) and ownership.is_real_dir(path):
            with contextlib.suppress(OSError):  # not empty: someone's, left
                os.rmdir(path)


def _marker_of(path: str) -> dict | None:
    """The marker a state or model folder, weights or predictions file carries (a folder's, or a
    file's sealed one: the content it records), whatever its name."""
    return ownership.read_marker(path) if ownership.is_real_dir(path) else markers.file_status(path)[0]


def _whole_item(path: str) -> bool:
    """A state, weights file, model folder or predictions file of the toolkit's, whole (by its marker)."""
    try:
        if markers.STATE_NAME.match(os.path.basename(path)):
            return state_files.judge_state(path, pickles=False).wholly_owned
        return ownership.kind_of(path) in (WEIGHTS, MODEL, PREDICTIONS) and not ownership.missing_entries(path)
    except OSError:
        return False


def _free_name(target: str) -> str:
    """target, or the first free name beside it: a state as a second save of its step is named
    (state-000000020.1: still a state), anything else with a -1, -2, ..."""
    folder, name = os.path.split(target)
    state = markers.STATE_NAME.match(name)
    if state:  # its own name where that is free, as for anything else
        return target if not os.path.lexists(target) else state_files.free_state_path(folder, int(state.group(1)))
    n, free = 1, target
    while os.path.lexists(free):
        free, n = os.path.join(folder, f'{name}-{n}'), n + 1
    return free


def end_cut_copies(output_dir: str) -> None:
    """A run resumed where a fresh run's move was cut (it was killed, then the earlier run resumed
    instead): the copy in progress is ended, the item kept where it is (whole: a copy already in
    place stays in the archive as one), and the move's record goes -- the earlier run goes on, so a
    later fresh run moves it anew; an archive folder into which nothing had moved goes too. A folder
    without the toolkit's record (one cut empty by a kill marks nothing) is left as it is. Anything
    in the way is left, said."""
    root = os.path.join(output_dir, PREVIOUS_RUNS)
    for name in sorted(os.listdir(root)) if ownership.is_real_dir(root) else []:
        folder = os.path.join(root, name)
        try:
            if _moving_record(folder, output_dir) is None:  # not a cut move of this place's (by its record)
                continue
            _take_back_part(folder, keep_item=True)
            made = [os.path.join(folder, n) for n in os.listdir(folder) if n != MOVING]
            os.remove(os.path.join(folder, MOVING))
            if all(ownership.folder_kind(f) == STATE_DIR and _holds_only_its_marker(f) for f in made):
                for f in made:  # nothing had moved: as if that fresh run had never begun
                    _unmake_marked(f)
                os.rmdir(folder)
        except (OSError, UserError) as e:
            logger.warning('a cut move into %s could not be ended: %s', folder, e)


def _remove_real(path: str) -> None:
    """A real folder (with all in it, links inside removed as links) or a plain file; never through
    a link at path; nothing there: nothing to do."""
    st = ownership.lstat_or_none(path)
    if st is None:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)
    elif stat.S_ISREG(st.st_mode):
        os.remove(path)
    else:
        raise UserError(f'{path} is in the way of the move and was not left there by this toolkit: move it away, '
                        f'then run again')

