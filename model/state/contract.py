"""What a training state is -- the one contract of a save and a resume.

A state is one folder under ``train_state_dir`` (model/state/states.py keeps it atomic: written
under a temporary name, marked with every file's size and checksum, renamed into place). It
holds named parts:

=================  ==============================================  ===============================
part               what                                            file(s)
=================  ==============================================  ===============================
model, optimizer,  the engine's parts: accelerate's save_state /   model.safetensors optimizer.bin
scaler, rng        load_state, as DDP, FSDP or DeepSpeed keep them [scaler.pt] random_states_<r>.pkl
schedule           the learning-rate schedule                      schedule.json
data_position      the loader's place in the global order          data_position.json
counters           steps, rows, tokens, best loss (TrainState)     counters.json
=================  ==============================================  ===============================

and what describes the run that saved it -- ``config.json``, ``fingerprint.json`` (model shape,
tokenizer, data), ``run.json`` (world size, engine, time, the run's id), ``tokenizer/`` (its
copy). The run's own parts are ``Stateful`` (``state_dict()`` / ``load_state_dict()``) and are
saved as JSON: plain data, so loading one runs no code, and a newcomer adds a part by adding it to
the dict.

The run's id (:func:`new_run_id`) is made by a fresh start, kept by every resume, and recorded in
every state and every model the run writes: a resume never replaces another run's models nor
prunes another run's states (preflight, states.py), and a run folder copied with its states is
known as the same run (:func:`states_of_output`).

Validated once: :func:`inspect` (the start-up checks, on the main process, and the dry run)
judges the states newest first -- every listed file as saved, no torch file that would unpickle
more than tensors, the JSON parts readable -- and returns the chosen one as a
:class:`SavedState`. A run shares the main process's SavedState with every rank
(:meth:`StateParts.load_all_ranks`) and loads exactly that folder; nothing is judged twice.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import itertools
import json
import math
import os
import secrets
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from model.errors import UserError
from model.faults import fault_point
from model.state import markers, model_files, ownership, states

PART_FILES = {'schedule': 'schedule.json', 'data_position': 'data_position.json', 'counters': 'counters.json'}
RUN_FILES = {'config': 'config.json', 'fingerprint': 'fingerprint.json', 'run': states.RUN_JSON}
TOKENIZER_COPY = states.TOKENIZER_COPY
run_id_of = states.run_id_of  # the run's id a state's run.json records (None: before runs had ids)
STATES_KEPT = 2  # loadable states a run keeps: a damaged newest one still leaves one to resume


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class TrainState:
    """The run's counters (never written onto the config); the ``counters`` part of a state."""

    global_step: int = 0  # optimizer steps done
    best_val_loss: float = math.inf
    best_step: int = -1
    samples_seen: int = 0  # real rows trained on, all ranks
    tokens_seen: int = 0  # label tokens trained on, all ranks
    last_eval_step: int = -1
    eval_pending: bool = False  # the evaluation at global_step was cut by a stop: a resume performs it first

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict) -> None:
        fields = {f.name for f in dataclasses.fields(self)}
        for name, value in state.items():
            if name in fields:
                setattr(self, name, value)


@dataclass
class SavedState:
    """A state judged loadable, with its JSON read: what the dry run reports, the start-up checks
    compare, and every rank of the resumed run loads."""

    path: str
    step: int
    parts: dict[str, dict]  # the run's own parts, by name
    config: dict
    fingerprint: dict
    run: dict


# a state of the toolkit before the contract (2026-12): the run's parts pickled by accelerate
# (custom_checkpoint_<i>.pkl, in the order they were registered) and the counters in train_state.json
LEGACY_PART_FILES = {'schedule': 'custom_checkpoint_0.pkl', 'data_position': 'custom_checkpoint_1.pkl',
                     'counters': 'train_state.json'}


def read_saved(path: str, step: int) -> SavedState:
    """The JSON of a state folder (or an earlier version's parts, read as plain data); a missing
    or unreadable file is a ValueError naming it."""
    legacy = not os.path.exists(os.path.join(path, PART_FILES['schedule'])) and all(
        os.path.isfile(os.path.join(path, f)) for f in LEGACY_PART_FILES.values())
    found: dict[str, Any] = {}
    for name, file in {**(LEGACY_PART_FILES if legacy else PART_FILES), **RUN_FILES}.items():
        try:
            found[name] = _read_part(os.path.join(path, file))
        except FileNotFoundError:
            raise ValueError(f'{file} is missing') from None
        except Exception as e:  # noqa: BLE001 - any damage: the state is not loadable
            raise ValueError(f'{file} is unreadable ({type(e).__name__})') from None
        if not isinstance(found[name], dict):
            raise ValueError(f'{file} holds no JSON object')
    return SavedState(path, step, {name: found[name] for name in PART_FILES},
                      **{name: found[name] for name in RUN_FILES})


def _read_part(path: str):
    if path.endswith('.json'):
        with open(path, encoding='utf-8') as f:
            return json.load(f)
    from accelerate.utils.other import load  # an earlier version's part: tensors and numbers only

    return load(path, map_location='cpu', weights_only=True)


# --------------------------------------------------------------------------- judged once


@dataclass
class StatesReport:
    """What train_state_dir holds for a run about to start: the state a resume loads, and every
    fact worth a line before the first step."""

    resume: SavedState | None = None
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    all_damaged: bool = False  # states there, none whole: neither a resume nor a fresh run (which moves them) can go on

    @property
    def resume_from(self) -> str | None:
        return self.resume.path if self.resume else None


def inspect(state_dir: str, resume: bool, deep: bool = True,
            resume_flags: str = '--is_keep_training=True') -> StatesReport:
    """Judge the saved states once, before anything moves: a resume takes the newest loadable
    state (a damaged newer one is left alone, and a save at its step goes to a new name beside
    it); a fresh run moves the earlier run's states aside, which it may only do with states wholly
    its own. ``deep=False``: by sizes only, problems only -- no state read, no note (each rank of a
    run of several, whose main process then judges deeply and speaks for all)."""
    report = StatesReport()
    found = [path for _, path in states.list_complete_states(state_dir)]
    if not resume:
        verdicts = [states.judge_state(path, deep=deep, pickles=False) for path in found]  # moving aside loads nothing
        report.all_damaged = bool(verdicts) and all(v.problem for v in verdicts)
        if report.all_damaged:  # one problem: what to do is the same for all (preflight gives the fix)
            report.problems.append(f'train_state_dir: {_every_state_damaged(verdicts)}: none can be resumed, and a '
                                   f'fresh run moves aside only states wholly as saved')
            return report
        for v in verdicts:
            if not v.wholly_owned:
                why = (f'it is damaged since this toolkit saved it ({v.problem})' if v.problem else
                       f'it holds {ownership.describe_foreign(v.foreign)}, which this toolkit did not write')
                report.problems.append(f'train_state_dir: {v.path} of an earlier run cannot be moved aside for a '
                                       f'fresh run: {why}; move it away yourself (or resume that run with '
                                       f'{resume_flags})')
        return report
    damaged: list[states.StateVerdict] = []
    loadable = None
    for path in reversed(found):  # judged newest first, down to the one a resume loads
        v = states.judge_state(path, deep=deep)
        if v.loadable and deep:
            try:
                report.resume = read_saved(v.path, v.step)
            except ValueError as e:
                v.problem = str(e)
        if v.loadable:
            loadable = v
            break
        damaged.append(v)
    # a link named as a state is never resumed from (nor pruned, nor moved): said, with the copy that would be
    # said where the resume takes an older state than the link's name (or none): else it changes nothing. In a
    # folder of states copied by hand (not marked yet) such a link is refused whole (ownership.check_replaceable)
    newest = loadable.step if loadable is not None else -1
    ours = ownership.folder_kind(state_dir) is not None
    linked = [link for link in ownership.state_links(state_dir)
              if ours and markers.state_key(os.path.basename(link))[0] > newest]
    links = [ownership.state_links_refused(linked, 'train_state_dir')] if linked else []
    passed_over = '; '.join(f'{message}: passed over; {fix}' for message, fix in links)
    if loadable is None:
        report.all_damaged = bool(damaged)
        what = _every_state_damaged(damaged[::-1]) if damaged else f'no complete saved state in {state_dir}'
        report.problems.append(f'--is_keep_training=True but {what}' + (f' ({passed_over})' if links else ''))
        return report
    if passed_over and deep:
        report.notes.append(passed_over)
    if not deep:
        return report
    if loadable.foreign:
        report.notes.append(f'{loadable.path} holds {ownership.describe_foreign(loadable.foreign)}, not part of the '
                            f'state: left alone (not loaded, never deleted; this state is never pruned)')
    for i, v in enumerate(damaged):
        report.notes.append(f'{"the newest" if i == 0 else "the"} state {v.path} is damaged ({v.problem}): it is '
                            f'left alone (the toolkit never deletes or replaces what changed since it wrote it) and '
                            f'the run resumes from {loadable.path}; remove it once you no longer need it')
    return report


def _every_state_damaged(verdicts: list[states.StateVerdict]) -> str:
    """The words for a folder's states, oldest first, none whole: the newest one's damage and how many
    more (a resume and a fresh run say it alike; each gives its own way on)."""
    more = f'; and {len(verdicts) - 1} more' if len(verdicts) > 1 else ''
    return (f'every saved state is damaged since this toolkit saved it (the newest, {verdicts[-1].path}: '
            f'{verdicts[-1].problem}{more})')


def damaged_aside(state_dir: str, output_dir: str, free: bool = True) -> str:
    """Where the way on from damaged states (preflight.damaged_states_fix) moves the states of
    state_dir: never inside output_dir, whose next run neither moves nor resumes them (and whose
    folder they would only clutter) -- beside output_dir for a state folder in it (or output_dir
    itself), else beside the state folder; a name taken (an earlier time's) gets -2, -3, ...
    (a `mv` into it would nest them there). ``free=False``: the name without that number."""
    if ownership.same_or_inside(state_dir, output_dir):
        base = output_dir.rstrip(os.sep) + '.damaged_states'
    else:
        base = state_dir.rstrip(os.sep) + '.damaged'
    if not free:
        return base
    names = itertools.chain([base], (f'{base}-{n}' for n in itertools.count(2)))
    return next(p for p in names if not os.path.lexists(p))


def moved_as_damaged(train_state_dir: str, output_dir: str, model_file: str,
                     models_at: tuple[str, str] | None = None) -> str | None:
    """The folder where that way on moved the states of the run whose models are at
    ``models_at`` (default: output_dir and model_file; e.g. the archive a fresh run then moved
    them into), from any folder a run at these places keeps states in (previous_runs.state_folders'
    places); None: none there."""
    folders = (train_state_dir, output_dir, model_files.model_folder(model_file),
               os.path.join(output_dir, model_files.STATES_IN_OUTPUT_DIR))
    bases = dict.fromkeys(damaged_aside(folder, output_dir, free=False) for folder in folders)
    for aside in (place for base in bases for place in (base, *sorted(glob.glob(glob.escape(base) + '-[0-9]*')))):
        if any(model_files.holds_run(*(models_at or (output_dir, model_file)), run) for run in runs_of_states(aside)):
            return aside
    return None


def saved_places(state_dir: str) -> dict | None:
    """The places the newest state in state_dir was saved with (:func:`places_of`), by sizes
    only; None when it holds none this can read."""
    newest = states.latest_state(state_dir, deep=False)
    try:
        config = states.read_json(os.path.join(newest, RUN_FILES['config'])) if newest else None
    except (OSError, ValueError):
        return None
    return places_of(config, states.read_run(newest)) if newest else None


def places_of(config, run: dict | None) -> dict | None:
    """From a state's config and run.json: the places it was saved with (output_dir, model_file,
    train_state_dir -- None if not recorded) and its run's id (``run_id``: None before runs had
    ids); None when the config names no output_dir and model_file."""
    train = config.get('train') if isinstance(config, dict) else None
    if not (isinstance(train, dict) and train.get('output_dir') and train.get('model_file')):
        return None
    return {'output_dir': str(train['output_dir']), 'model_file': str(train['model_file']),
            'train_state_dir': str(train['train_state_dir']) if train.get('train_state_dir') else None,
            'run_id': run_id_of(run)}


def copied_states(state_dir: str, saved_state_dir: str | None, output_dir: str) -> bool:
    """Whether the states in state_dir are a copy (or a move) of a run's, not the folder the run
    saved them in -- or lie inside output_dir: they went along with a run folder copied or moved."""
    moved = saved_state_dir is not None and os.path.realpath(state_dir) != os.path.realpath(saved_state_dir)
    return moved or ownership.same_or_inside(state_dir, output_dir)


def states_of_output(folders: list[str], output_dir: str, model_file: str, saved_for: str | None = None
                     ) -> str | None:
    """The first of these state folders that holds the states of the run whose models are at
    output_dir and model_file: saved by a run with that output_dir (``saved_for``, where they
    were moved from, when given), or -- a run folder copied or moved -- by the run whose models
    these are, when the states went along (:func:`copied_states`) or the run's models are nowhere
    else (:func:`run_home`): a copy of the outputs alone never takes the original's states."""
    for folder in folders:
        places = saved_places(folder)
        if not places:
            continue
        home = run_home(places)
        here = home is None or os.path.realpath(home[0]) == os.path.realpath(output_dir)  # its models: here or nowhere
        if os.path.realpath(places['output_dir']) == os.path.realpath(saved_for or output_dir) and here:
            return folder  # (a fresh run there since moved its models aside: they are in that archive, not here)
        if model_files.holds_run(output_dir, model_file, places['run_id']) and (
                here or copied_states(folder, places['train_state_dir'], output_dir)):
            return folder
    return None


def run_home(places: dict) -> tuple[str, str] | None:
    """(output_dir, model_file) where the models of the run that saved a state are now (places:
    :func:`saved_places`): the places it was saved for, or -- a run with an id -- the archive a
    fresh run there moved them to (output_dir/previous_runs/<time>/, newest first); None: neither
    holds them (moved or copied by hand, or gone)."""
    output_dir, model_file, run = places['output_dir'], places['model_file'], places.get('run_id')
    if model_files.holds_run(output_dir, model_file, run):
        return output_dir, model_file
    archives = os.path.join(output_dir, model_files.PREVIOUS_RUNS)
    if run is None or not ownership.is_real_dir(archives):
        return None
    _, before, after = model_files.split_model_file(model_file)
    for name in sorted(os.listdir(archives), reverse=True):
        archive = os.path.join(archives, name)
        pattern = model_files.join_model_file(archive, before, after)
        if ownership.is_real_dir(archive) and model_files.holds_run(archive, pattern, run):
            return archive, pattern
    return None


def runs_of_states(state_dir: str) -> dict[str | None, list[str]]:
    """The complete states in state_dir by the run that saved them (None: before runs had ids);
    a state whose run.json cannot be read is left out."""
    found: dict[str | None, list[str]] = {}
    for _, path in states.list_complete_states(state_dir):
        run = states.read_run(path)
        if run is not None:
            found.setdefault(run_id_of(run), []).append(path)
    return found


def new_run_id(stamp: str) -> str:
    """A fresh run's id: its start time and 8 random hex digits (two runs started in the same
    second on two nodes differ)."""
    return f'{stamp}-{secrets.token_hex(4)}'


# --------------------------------------------------------------------------- fingerprints


EXAMPLE_FIELDS = ('max_seq_len', 'noise_density', 'mean_noise_span_length')  # what a span-corruption example is made of


def fingerprint(model_shape: dict, train_files: list[tuple[str, int]], tokenizer: str,
                objective: str = 'pairs', examples: dict | None = None) -> dict:
    """What a resume must find unchanged: the model's shape, the tokenizer's fingerprint, the
    objective (its data position counts rows or examples), the training data as (path, rows) --
    names, sizes and row counts: metadata, not a content hash."""
    data = [{'name': os.path.basename(f), 'bytes': os.path.getsize(f), 'rows': rows} for f, rows in train_files]
    out = {'model_shape': model_shape, 'data': data, 'tokenizer': tokenizer, 'objective': objective}
    if examples:  # span corruption: what an example is made of (its data position counts examples)
        out['examples'] = examples
    return out


def describe_data_change(saved: list[dict], now: list[dict]) -> str:
    """'train.parquet: 900 rows (379,822 bytes) -> 1,200 rows (...); new: b.parquet (...)', file by file."""
    def one(d: dict) -> str:
        rows = d.get('rows', 0)
        return f'{rows:,} row{"" if rows == 1 else "s"} ({d.get("bytes", 0):,} bytes)'

    def name(d: dict) -> str:
        return d.get('name', '?')

    if any(len({name(d) for d in ds}) != len(ds) for ds in (saved, now)):  # one name in two folders: by place
        said = [f'file {i + 1} of {len(now)} ({name(b)}): {one(a)} -> {one(b)}'
                for i, (a, b) in enumerate(zip(saved, now)) if a != b]
        if len(saved) != len(now):
            said.append(f'{len(saved)} file(s) -> {len(now)}')
        return '; '.join(said) or 'changed'
    before, after = {name(d): d for d in saved}, {name(d): d for d in now}
    said = [f'{n}: {one(before[n])} -> {one(after[n])}' for n in before if n in after and before[n] != after[n]]
    said += [f'gone: {n} ({one(before[n])})' for n in before if n not in after]
    said += [f'new: {n} ({one(after[n])})' for n in after if n not in before]
    if not said and [name(d) for d in saved] != [name(d) for d in now]:
        said = ['the files are read in another order']
    return '; '.join(said) or 'changed'


def compare_fingerprints(saved: dict, current: dict, allow_data_change: bool, state_path: str = '') -> list[str]:
    """Raise on a changed tokenizer or model shape; on changed data unless allowed. Returns notes."""
    if saved.get('tokenizer') != current['tokenizer']:
        copy = os.path.join(state_path, TOKENIZER_COPY) if state_path else ''
        fix = (f"resume with the run's own copy, copied out of the state (its states are pruned as the run "
               f"saves): cp -r {copy} tokenizer_of_the_run, then --tokenizer_dir=tokenizer_of_the_run"
               if copy and os.path.isdir(copy) else 'resume with the tokenizer it was trained with')
        raise UserError('the tokenizer in tokenizer_dir is not the one this run was trained with '
                        '(retrained or replaced since the save)', fix)
    from model.net.sizing import shape_differences, shape_fix_flags

    diff = shape_differences(saved.get('model_shape') or {}, current['model_shape'])  # a field newer than it: default
    if diff:
        desc = ', '.join(f'{k}: saved {a} -> now {b}' for k, (a, b) in diff.items())
        flags = shape_fix_flags(diff)
        raise UserError(f'the saved state has a different model shape ({desc})',
                        f'resume with the same shape{": " + flags if flags else ""}, or start a new run in another '
                        f'--train_state_dir')
    was, now = saved.get('objective', 'pairs'), current.get('objective', 'pairs')  # states before it: pairs
    if was != now:
        raise UserError(f'the saved state trained --objective={was}, this run asks for --objective={now}',
                        f'resume it with --objective={was}, or start the next stage as a new run from its weights: '
                        f'--init_from=<its model folder> with another --train_state_dir')
    if saved.get('examples') and current.get('examples') and saved['examples'] != current['examples']:
        desc = ', '.join(f'{k} {v} -> {current["examples"].get(k)}' for k, v in saved['examples'].items()
                         if current['examples'].get(k) != v)
        raise UserError(f'a span-corruption example is made differently since the save ({desc}): the saved data '
                        f'position counts examples of the old kind',
                        'resume with the saved values, or start a new run from its weights with --init_from')
    if saved.get('data') == current['data']:
        return []
    msg = f'the training data changed since the save ({describe_data_change(saved.get("data") or [], current["data"])})'
    if not allow_data_change:
        raise UserError(msg, 'pass --allow_data_change=True to continue on the new data anyway')
    return [msg + '; continuing as --allow_data_change=True asks']


# --------------------------------------------------------------------------- saved and loaded as one


class StateParts:
    """The parts of a live run that a state holds, saved and loaded as one on every rank: the
    engine's through accelerate, the run's own (``parts``) as JSON, in states.py's atomic folder."""

    def __init__(self, accelerator, collectives, parts: dict[str, Stateful], write_tokenizer: Callable[[str], None]):
        """``write_tokenizer(folder)`` writes the run's tokenizer into a new folder (its copy)."""
        unknown = set(parts) ^ set(PART_FILES)
        if unknown:
            raise ValueError(f'state parts {sorted(unknown)}: each part has its file in PART_FILES')
        self.accelerator, self.collectives, self.parts = accelerator, collectives, parts
        self.write_tokenizer = write_tokenizer

    def save_all_ranks(self, state_dir: str, step: int, describe: dict[str, dict], keep: int = STATES_KEPT) -> str:
        """Every rank calls it. The folder is made (main), the engine writes its parts (every
        rank), the run's parts, ``describe`` (config, fingerprint, run) and the tokenizer copy are
        written (main), and the folder is completed (main: checksums, marker, rename, pruning).
        A vote after each, so a rank whose write failed -- a full disk -- never leaves the others
        waiting. Returns the final folder. The caller holds the lock of state_dir."""
        is_main = self.collectives.is_main
        tmp = states.tmp_path(state_dir, step)
        jsons = {PART_FILES[name]: part.state_dict() for name, part in self.parts.items()}
        jsons.update({RUN_FILES[name]: value for name, value in describe.items()})
        final: list[str] = []

        def write_own() -> None:
            fault_point('state-save', step)
            for file, obj in jsons.items():
                states.write_json(os.path.join(tmp, file), obj)
            self.write_tokenizer(os.path.join(tmp, TOKENIZER_COPY))

        steps = [lambda: states.begin_save(state_dir, tmp) if is_main else None,
                 lambda: self.accelerator.save_state(tmp, safe_serialization=True),
                 lambda: write_own() if is_main else None,
                 lambda: final.append(states.complete_save(state_dir, tmp, step, keep)) if is_main else None]
        for part in steps:
            error: BaseException | None = None
            try:
                part()
            except Exception as e:  # noqa: BLE001 - reported after the vote, on every rank
                error = e
            if not self.collectives.ok_all_ranks(error is None):
                raise states.save_failed(error, state_dir, tmp, is_main)
        return final[0] if final else os.path.join(state_dir, states.state_name(step))

    def load_all_ranks(self, saved: SavedState) -> None:
        """Exactly the state judged at start-up (the main process's SavedState): the engine's
        parts through accelerate, then the run's own from the JSON already read."""
        try:
            with _engine_view(saved.path) as folder:
                self.accelerator.load_state(folder)
        except Exception as e:  # noqa: BLE001 - a file that passed its checksum but does not load here
            raise UserError(f'the state {saved.path} does not load into this run ({type(e).__name__}: '
                            f'{str(e).splitlines()[0] if str(e) else ""})',
                            'resume with the engine and model it was saved with, or start a new run '
                            'without --is_keep_training') from None
        for name, part in self.parts.items():
            part.load_state_dict(saved.parts[name])


@contextlib.contextmanager
def _engine_view(path: str):
    """The folder accelerate loads the engine's parts from: the state itself, or for a state of
    the version before the contract a temporary folder of links to all but its pickled parts
    (accelerate would load those into registered objects with weights_only=False)."""
    if not any(os.path.exists(os.path.join(path, f)) for f in LEGACY_PART_FILES.values() if f.endswith('.pkl')):
        yield path
        return
    view = tempfile.mkdtemp(prefix='.chat_small_t5-state-view-')
    try:
        for name in os.listdir(path):
            if name not in LEGACY_PART_FILES.values():
                os.symlink(os.path.join(path, name), os.path.join(view, name))
        yield view
    finally:
        shutil.rmtree(view, ignore_errors=True)


def changed_fields(saved_config: dict, cfg, leave_out=()) -> list[str]:
    """``name old -> new`` for every field of the run's config that differs from the saved one
    (but those named in leave_out)."""
    return [f'{k} {saved_config[part][k]!r} -> {v!r}'
            for part, now in (('train', cfg.train), ('model', cfg.model))
            for k, v in dataclasses.asdict(now).items() if k in saved_config.get(part, {})
            and saved_config[part][k] != v and k not in leave_out]


def fixed_fields(saved_fingerprint: dict) -> set[str]:
    """The config fields a resume of a state with this fingerprint cannot change (compare_fingerprints
    refuses a change): the model's shape, the objective and, under span corruption, what an example
    is made of (EXAMPLE_FIELDS)."""
    return {*(saved_fingerprint.get('model_shape') or {}), 'objective', *(saved_fingerprint.get('examples') or {})}


def describe_run(config: dict, fingerprint_: dict, world: int, engine: str, run_id: str | None = None
                 ) -> dict[str, dict]:
    """config.json, fingerprint.json and run.json of a state about to be saved."""
    return {'config': config, 'fingerprint': fingerprint_,
            'run': {'world_size': world, 'engine': engine, 'saved_at': time.strftime('%Y-%m-%d %H:%M:%S'),
                    model_files.RUN_ID: run_id}}
