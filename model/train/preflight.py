"""Everything a training run depends on that is knowable at start-up, checked in one place.

``train`` runs these checks before it moves, creates or trains anything, and
``train --dry_run=True`` runs the same checks without training, so the dry run says "ready"
only when the run will not fail for such a cause. Metadata and a few rows only: no torch.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import shutil
import warnings
from dataclasses import dataclass, field

from config import PATH_FIELDS, PROJECT_ROOT, UNUSED_WHEN, ResolvedConfig
from model.errors import NotOurs, UserError
from model.state import contract, locks as place_locks, model_files, previous_runs, states as ckpt
from model.state import ownership
from model.data.files import check_usable_rows, files_kind, inspect_parquet, resolve_parquet_files
from model.state.markers import MODEL, STATE_DIR, WEIGHTS, file_status
from model.net.sizing import (aux_parameter_count, human_bytes, model_shape, state_bytes, t5_parameter_count,
                              total_optimizer_steps, warmup_steps_of)
from model.data.tokenizer import check_sentinels, check_tokenizer_folder, tokenizer_fingerprint

# The learning rates that learned well per step, per optimizer: (low, best measured, high), from
# bench/bench_recipe.py on its held-out numbers task (bench/tasks.py), the demo preset's T5 (d_model
# 128), 400 optimizer steps of batch 64 drawn at random (not grouped by length), cosine, 5% warmup,
# median exact match of 2 seeds. "Good": a median exact match of at least 3/4 of that optimizer's
# best; the range reaches halfway (on a log scale) to the nearest rate measured poor, or 2x past the
# last one measured where none was. Measured: adafactor 1e-4 / 1e-3 / 3e-3 / 1e-2 -> 12% / 18% / 13% /
# 0%; with parameter scaling 3e-3 / 1e-2 / 3e-2 / 6e-2 -> 24% / 32% / 38% / 14%; adamw 5e-4 / 1e-3 /
# 2e-3 / 4e-3 -> 26% / 19% / 16% / 8% (the table and its commands: bench/RECIPE_NOTES.md; an earlier
# table, measured with length-grouped batches by mistake, had put the scaled rate's best at 1e-2).
# Tiny models and short runs: a note, never a problem.
GOOD_LEARN_RATES = {'adafactor': (3.2e-4, 1e-3, 1.7e-3), 'adafactor+scale': (5.5e-3, 3e-2, 4.2e-2),
                    'adamw': (2.5e-4, 5e-4, 7.1e-4)}
# --aux_learn_rate, the same way, beside scaled Adafactor 3e-2 with a third of the run as warmup: 0.02 / 0.05 /
# 0.1 -> 98.2% / 99.2% / 98.6% on numbers (seeds 1-4, 400 steps; none: 83.0%), 56% / 69% / 63% on the demo
# corpus (seed 42, 1,000 steps; none: 50%); none measured poor, so 2x past both ends (bench/RECIPE_NOTES.md)
GOOD_AUX_LEARN_RATES = (1e-2, 5e-2, 2e-1)

# a changed value of these fields cannot continue a saved run: field -> (what of its value must stay
# the same, why); a field a state saved before it existed lacks is read as its default
REFUSED_ON_RESUME = {
    'optimizer': (lambda value: value, 'the optimizer state of one optimizer does not load into another'),
    'aux_learn_rate': (lambda value: bool(value), 'it is 0 in one and not the other: the optimizer state of one '
                                                  'param group does not load into two, nor two into one'),
}


@dataclass
class Problem:
    name: str  # the field or thing at fault
    message: str  # one line: what is wrong
    fix: str = ''  # the command or flag that fixes it
    first: bool = False  # said before the others: it explains them (a place in use: no state saved yet, ...)

    def line(self) -> str:
        return self.message + (f'; {self.fix}' if self.fix else '')


@dataclass
class Report:
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # worth saying, not blocking
    train_files: list[str] = field(default_factory=list)
    train_rows: int = 0
    train_examples: int = 0  # span corruption: examples of epoch 0 (the positions a step takes)
    counts_kept: bool = False  # span corruption: the rows' token counts came from the resume's state
    vocab_size: int = 0
    parameters: int = 0
    aux_parameters: int = 0  # of them, trained with Adam at --aux_learn_rate (0 without it)
    total_steps: int = 0
    fingerprint: dict = field(default_factory=dict)  # what a resume must find unchanged (contract.fingerprint)
    resume: contract.SavedState | None = None  # the state a resume loads, judged here once
    # judged for a fresh run that is ready: what an earlier run left here that it moves aside (None: not judged)
    previous_items: int | None = None
    states_moved_to: str | None = None  # the archive into which a fresh run's cut move already took them, states too
    states_damaged: bool = False  # every saved state damaged: neither a resume nor a fresh run can start there

    @property
    def latest_state(self) -> str | None:
        return self.resume.path if self.resume else None

    @property
    def ready(self) -> bool:
        return not self.problems

    def raise_first(self) -> None:
        if self.problems:
            more = len(self.problems) - 1
            tail = f' (and {more} more problem(s): run with --dry_run=True to list them)' if more else ''
            first = sorted(self.problems, key=lambda p: not p.first)[0]
            raise UserError(first.message, first.fix + tail) if first.fix else UserError(first.message + tail)


def _cli(cfg: ResolvedConfig, command: str) -> str:
    return f'python train_low_mem.py {command}' + (f' --preset={cfg.preset}' if cfg.preset else '')


def resolve_places(cfg: ResolvedConfig) -> ResolvedConfig:
    """The config with every path resolved once, at start: links anywhere in a path are followed
    (model_save/ or data/ linked into scratch storage is an ordinary setup), so everything after
    reads and writes where they point, and never replaces a link. A pattern keeps its magic part
    (its folder before the first '*?[' is resolved); model_file keeps its file name."""
    t = dataclasses.replace(cfg.train)
    ownership.PLACES.clear()  # this command's places (ownership.as_given)
    # the places given by a flag first: a fault in a path others follow (model_file, train_state_dir and log_dir
    # follow output_dir) is named by the flag that was given
    for name in sorted((*PATH_FIELDS, 'init_from'), key=lambda name: cfg.sources.get(name) != 'flag'):
        value = getattr(t, name)
        if not value:
            continue
        if name == 'model_file':
            folder, before, after = model_files.split_model_file(value)  # the folder resolved, the name kept
            resolved = model_files.join_model_file(ownership.resolve_place(folder, name), before, after)
        else:
            resolved = resolve_spec(value, name)
        setattr(t, name, resolved)
    return dataclasses.replace(cfg, train=t)


def resolve_spec(spec: str, what: str) -> str:
    """A file, folder or glob with the part before its first wildcard resolved."""
    parts = str(spec).split(os.sep)
    magic = next((i for i, part in enumerate(parts) if any(ch in part for ch in '*?[')), None)
    if magic is None:
        return ownership.resolve_place(spec, what)
    head = os.sep.join(parts[:magic]) or ('/' if str(spec).startswith(os.sep) else '.')
    return os.path.join(ownership.resolve_place(head, what), *parts[magic:])


def data_fix(cfg: ResolvedConfig) -> str:
    t = cfg.train
    folder = os.path.dirname(t.train_file)
    if cfg.preset == 'demo' and (t.train_file, t.validation_file) == tuple(  # the files the demo writes
            os.path.join(folder, name) for name in ('train.parquet', 'valid.parquet')):
        return f'create it with: python prepare_data.py demo --out_dir={folder}'
    return (f'create it with: python prepare_data.py convert YOUR_DATA.jsonl data/all.parquet && '
            f'python prepare_data.py split data/all.parquet --train_out={t.train_file} '
            f'--valid_out={t.validation_file}')


def check_train(cfg: ResolvedConfig, resume: bool, world_size: int, locks: bool = True, deep: bool = True,
                count_examples: bool = True) -> Report:
    """The facts a run needs, and every problem that would stop it, without side effects.
    ``deep=False``: the saved states by their sizes only (a rank whose main process judges them
    fully and shares its verdict, model/train/factory.py). ``count_examples=False``: span
    corruption's steps are left to the run's loaders (they count the rows' tokens, split across
    the ranks), the dry run counts them here."""
    t = cfg.train
    report = Report()

    def problem(name, fn, fix=''):
        try:
            return fn()
        except UserError as e:
            message = e.message if fix else str(e)  # this run's own fix (with its preset) says it better
            named = message.startswith(name) or message.startswith(f'--{name}')
            report.problems.append(Problem(name, message if named else f'{name}: {message}',
                                           fix))
            return None

    # inputs: readable, the right columns, a usable row
    files = {}
    for name in ('train_file', 'validation_file'):
        spec = getattr(t, name)
        missing = not os.path.exists(spec) and not any(ch in spec for ch in '*?[')
        files[name] = problem(name, lambda spec=spec, name=name: _check_data(spec, name, t.objective),
                              data_fix(cfg) if missing else '') or []
    report.train_files = files['train_file']
    tok_fix = f'create it with: {_cli(cfg, "train_tokenizer")} --tokenizer_dir={t.tokenizer_dir}'
    from model.net.model_source import tokenizer_beside

    own = tokenizer_beside(t.init_from) if t.init_from and os.path.exists(t.init_from) else None
    if own:  # a warm start reads the data with the tokenizer its weights know: that one, not a new one
        tok_fix = f'--init_from={t.init_from} was trained with the tokenizer in {own}: give --tokenizer_dir={own}'
    report.vocab_size = problem('tokenizer_dir', lambda: check_tokenizer_folder(t.tokenizer_dir),
                                tok_fix if not os.path.exists(t.tokenizer_dir) else '') or 0
    if report.vocab_size and t.objective == 'span_corruption':
        make_one = (f'{_cli(cfg, "train_tokenizer")} --train_file={shlex.quote(t.train_file)} '
                    f'--vocab_size={report.vocab_size} --tokenizer_dir=NEW_FOLDER, then train with '
                    f'--tokenizer_dir=NEW_FOLDER')
        if problem('tokenizer_dir', lambda: check_sentinels(t.tokenizer_dir, make_one)) is None:
            report.vocab_size = 0

    # outputs: the toolkit's own or new, writable, and never an input
    report.problems += shared_place_problems(t)
    input_files = files['train_file'] + files['validation_file']
    outputs = [('train_state_dir', t.train_state_dir),
               *[('output_dir', path) for path in model_files.model_folders(t.output_dir)],
               ('model_file', t.model_file.format(0)), ('log_dir', t.log_dir)]
    for name, path in outputs:  # also where tokenizer_dir is not made yet
        if ownership.same_or_inside(path, t.tokenizer_dir):
            report.problems.append(Problem(name, f'{name}: {path} lies inside tokenizer_dir '
                                           f'{t.tokenizer_dir}, an input of the run',
                                           'write the run\'s outputs elsewhere'))
    if ownership.same_or_inside(t.tokenizer_dir, t.train_state_dir):  # e.g. a state's own copy: pruned as the run saves
        report.problems.append(Problem('tokenizer_dir', f'tokenizer_dir: {t.tokenizer_dir} lies inside train_state_dir '
                                       f'{t.train_state_dir}, whose states the run moves and prunes',
                                       f'copy it out first: cp -r {t.tokenizer_dir} tokenizer_of_the_run, then '
                                       f'--tokenizer_dir=tokenizer_of_the_run'))
    report.problems += layout_problems(t)
    problem('train_state_dir', lambda: ownership.check_replaceable(t.train_state_dir, STATE_DIR, 'train_state_dir',
                                                                   folder=True))
    for path in ckpt.temps_in_the_way(t.train_state_dir):  # found now, not at that step's save
        report.problems.append(Problem('train_state_dir', f'train_state_dir: {path} is named like a save in progress '
                                       f'but this toolkit did not make it; the save of that step would stop there',
                                       'move it away'))
    best_folder, best_name = os.path.join(t.output_dir, 'best'), model_files.model_file_pattern(t.model_file, 'best')
    best_note = ('; the best model is not exported there until that is moved out: the run trains on, as when '
                 'it came in mid-run (a fresh run would have to move it aside: refused)')
    step_note = ('; the weights of that step are not exported there until it is moved away: the run trains on (its '
                 'state holds them), as when it came in mid-run')
    final_note = ('; the last model is not exported there until that is moved out: the run trains on and ends with '
                  'it in the weights file of its last state, as when it came in mid-run (a fresh run would have to '
                  'move it aside: refused)')
    def replaceable_model_folder(path):
        try:
            ownership.check_replaceable(path, MODEL, 'output_dir', folder=True)
        except NotOurs as e:  # a user's file in best/ or final/: a resume goes on (the run that met it mid-run did)
            if not resume:
                raise
            report.notes.append(str(e) + (best_note if path == best_folder else final_note))
    for path in model_files.model_folders(t.output_dir):
        problem('output_dir', lambda path=path: replaceable_model_folder(path))
    for path in model_files.foreign_model_files(t.model_file):
        info, _ = file_status(path)
        said = (f'model_file: {path} matches the model_file pattern and was written by this toolkit but changed since '
                f'(a disk fault, or an edit)' if (info or {}).get('kind') == WEIGHTS else
                f'model_file: {path} matches the model_file pattern and was not written by this toolkit')
        if resume:  # never replaced; the run that met it mid-run trained on: so does its resume
            report.notes.append(said + (best_note if best_name.match(os.path.basename(path)) else step_note))
            continue
        report.problems.append(Problem('model_file', f'{said}; a fresh run would have to move it aside',
                                       'move it away or choose another --model_file'))
    places = {'train_state_dir': t.train_state_dir, 'output_dir': t.output_dir, 'model_file': model_folder(t),
              'log_dir': t.log_dir}
    links = set()  # given through a link to a place not there yet: the run makes it there (each link said once)
    for name in ('output_dir', 'train_state_dir', 'model_file', 'log_dir'):
        given, link, target = ownership.through_link_to_nothing(places[name]) or (None, None, None)
        if given and link not in links:
            links.add(link)
            how = 'is a link' if os.path.abspath(given) == link else f'lies through {link}, a link'
            report.notes.append(f'{name}: {given} {how} to {target}, which is not there yet: the run makes it there')
    for name, path in places.items():
        if os.path.exists(path) and not os.path.isdir(path):
            if any(p.name == name for p in report.problems):  # said already (a file at train_state_dir: once)
                continue
            report.problems.append(Problem(name, f'{name}: {path} is a file, not a folder',
                                           'choose a folder path'))
            continue
        problem(name, lambda path=path, name=name: ownership.check_writable(path, name))
    input_specs = [t.train_file, t.validation_file]
    for name, path in outputs:
        problem(name, lambda path=path, name=name: ownership.check_not_an_input(path, input_files, name, input_specs))
    for name, path in outputs:  # the others are checked with what they replace (check_replaceable)
        if name in ('model_file', 'log_dir') and not ownership.same_or_inside(path, t.tokenizer_dir):  # said above
            # e.g. inside another run's best/; log_dir: the folder itself too
            problem(name, lambda path=path, name=name: ownership.check_outside_sealed(path, name,
                                                                                    itself=name == 'log_dir'))
    # the longest name the pattern gives (a step of 12 digits): found now, not at the first save
    problem('model_file', lambda: ownership.check_name_lengths(t.model_file.format('9' * 12), 'model_file'))
    archive = os.path.join(t.output_dir, model_files.PREVIOUS_RUNS)
    if os.path.lexists(archive) and not os.path.isdir(archive):
        what = 'a link to nothing' if os.path.islink(archive) else 'a file'
        report.problems.append(Problem('output_dir', f'output_dir: {archive} is {what}; the toolkit keeps '
                                       f'earlier runs in a folder of that name',
                                       'remove or fix the link' if os.path.islink(archive) else 'move the file away'))
    judged = set()  # a folder that is two places (model_file's beside output_dir's models) is said once
    in_use = []
    for name in ('train_state_dir', 'output_dir', 'model_file'):  # a lock file that is a link: always a problem
        if os.path.realpath(places[name]) in judged:
            continue
        judged.add(os.path.realpath(places[name]))
        who = problem(name, lambda path=places[name]: place_locks.is_locked(path))
        if who:
            in_use.append(Problem(name, f'{name}: {places[name]} is in use by another run ({who})',
                                  'wait for it to end, or give this run other output paths', first=True))

    # sizes: at least one optimizer step, and room on disk for a state
    if files['train_file'] and report.vocab_size:
        report.train_rows = sum(inspect_parquet(f).num_rows for f in files['train_file'])
        report.total_steps = total_optimizer_steps(report.train_rows, t.batch_size_per_gpu, world_size,
                                                   t.gradient_accumulation_steps, t.epochs, t.max_steps)
        if t.objective == 'span_corruption':  # examples: counted below, once a resume's state is judged
            report.total_steps = 0
        elif report.total_steps == 0:
            report.problems.append(too_few_for_a_step(t, 'rows', world_size))
        report.parameters = t5_parameter_count(cfg.model, report.vocab_size)
        report.aux_parameters = aux_parameter_count(cfg.model, report.vocab_size) if t.aux_learn_rate else 0
        report.fingerprint = contract.fingerprint(
            model_shape(cfg.model, report.vocab_size), [(f, inspect_parquet(f).num_rows) for f in report.train_files],
            tokenizer_fingerprint(t.tokenizer_dir), t.objective,
            {k: getattr(t, k) for k in contract.EXAMPLE_FIELDS}
            if t.objective == 'span_corruption' else None)
        _check_disk(t, report)
    report.notes += learn_rate_notes(t) + cfg.unused_flags(resume) + cfg.capped_flags(resume)
    if files['validation_file']:
        report.notes += validation_size_notes(cfg, sum(inspect_parquet(f).num_rows for f in files['validation_file']))

    # warm start and trackers
    if t.init_from and not resume and report.vocab_size:
        problem('init_from', lambda: _check_init_from(cfg, report.vocab_size))
    if t.log_with != 'none':
        import importlib.util

        if importlib.util.find_spec(t.log_with) is None:
            extra = " pip install 'chat-small-t5[tensorboard]'" if t.log_with == 'tensorboard' else f' pip install {t.log_with}'
            report.problems.append(Problem('log_with', f'--log_with={t.log_with} but {t.log_with} is not installed',
                                           f'install it:{extra}'))

    # resume: a state that loads, trained with what this run would use; a fresh run: what an
    # earlier one left can be moved aside
    busy = locks and bool(in_use)  # a live run's states change under a check (pruned, saved): not judged then
    if not busy:
        check_states(cfg, resume, report, deep)
    start = report.resume.step if resume and report.resume is not None else 0  # a resume trains from there
    if t.objective == 'pairs' and report.train_rows and report.vocab_size:
        report.notes += run_length_notes(cfg, total_optimizer_steps(
            report.train_rows, t.batch_size_per_gpu, world_size, t.gradient_accumulation_steps, t.epochs), start)
    if t.init_from and resume and report.resume is not None:  # none found: the problem's fix starts it fresh
        report.notes.append(f'--init_from={t.init_from} is not used: the run continues from its saved state')
    if (count_examples and not busy and t.objective == 'span_corruption' and files['train_file']
            and report.vocab_size):
        # examples, from every row's tokens (the loader's count; a resume's state keeps them)
        kept = kept_counts(t, report.resume)
        report.train_examples, epoch_steps, report.counts_kept = problem(
            'train_file', lambda: span_steps(t, files['train_file'], world_size, kept)) or (0, 0, False)
        report.total_steps = min(epoch_steps, t.max_steps) if t.max_steps else epoch_steps
        if report.total_steps == 0:
            report.problems.append(too_few_for_a_step(
                t, f'span-corruption examples ({report.train_examples} from {report.train_rows} rows)', world_size))
        report.notes += run_length_notes(cfg, epoch_steps, start)
    # a place in use explains the rest (no state saved yet, ...). Without ``locks`` (a rank of a run of several,
    # whose main process may be taking the locks now) only when the run stops anyway: every rank then found a
    # problem by the same checks, so no main process of this run holds them
    if locks or report.problems:
        report.problems += in_use
    return report


def kept_counts(t, saved) -> dict | None:
    """The span-corruption token counts a resume's state kept (its data position's ``row_tokens``),
    for the loader to take if they are for these files; None for a fresh run, a state without
    them, or --allow_data_change=True (the data said to have changed: counted again)."""
    if saved is None or t.allow_data_change:
        return None
    return saved.parts['data_position'].get('row_tokens')


def too_few_for_a_step(t, unit: str, world_size: int) -> Problem:
    return Problem('batch_size_per_gpu', f'train_file: its {unit} are fewer than one optimizer step '
                   f'needs ({t.batch_size_per_gpu} x {world_size} processes x {t.gradient_accumulation_steps} '
                   f'accumulation)', 'lower --batch_size_per_gpu or --gradient_accumulation_steps')


# a step interval given as a flag and longer than the run never comes round: what the run does instead,
# and how many of them a run is given in the suggested value (about)
NEVER_COMES_ROUND = {
    'logging_steps': ('only its last step is logged (the loss of the whole run in one line)', 20),
    'eval_steps': ('it evaluates only at the end of each epoch and at its last step, as with --eval_steps=0', 4),
    'save_steps': ('it saves its state only at its end or when a signal stops it (a crash before then loses every '
                   'step)', 4),
}


def run_length_notes(cfg: ResolvedConfig, epoch_steps: int, start: int = 0) -> list[str]:
    """The notes that need the run's length, ``epoch_steps`` (the optimizer steps of its --epochs,
    before --max_steps cuts them): a warmup as long as the run (warmup_notes), and each flag given
    that the run's length keeps from ever taking effect -- a step interval that no step of the run
    reaches (a resume's, from ``start``, the step of its state: the intervals count the run's
    steps, not the resume's), a --max_steps beyond its epochs -- with what the run does instead.
    Said by the dry run and at the run's start, as unused_flags are."""
    t = cfg.train
    total = min(epoch_steps, t.max_steps) if t.max_steps else epoch_steps
    if not total:  # fewer rows than a step: a problem, said as one
        return []
    notes = warmup_notes(t, total)
    given = cfg.flags_given()
    for name, (instead, times) in NEVER_COMES_ROUND.items():
        value = getattr(t, name)
        if name not in given or value <= 0 or start >= total or total // value > start // value:
            continue  # a multiple of the interval among the steps the run (or the resume) takes
        if name == 'eval_steps' and total < max(1, epoch_steps // t.epochs):  # --max_steps ends it in its first epoch
            instead = 'it evaluates only at its last step (it ends before its first epoch does)'
        if start:
            notes.append(f'--{name}={value} never comes round in the steps this resume takes ({start + 1} to '
                         f'{total}; it counts the run\'s steps): {instead}; e.g. '
                         f'--{name}={max(1, (total - start) // times)}')
        else:
            notes.append(f'--{name}={value} is more than the run\'s {total} optimizer steps, so it never comes round: '
                         f'{instead}; e.g. --{name}={max(1, total // times)}')
    if 'max_steps' in given and t.max_steps > epoch_steps:
        per_epoch = max(1, epoch_steps // t.epochs)
        notes.append(f'--max_steps={t.max_steps} is more than the {epoch_steps} optimizer steps of --epochs={t.epochs}, '
                     f'so it never comes round: the run ends with its epochs; '
                     f'--epochs={-(-t.max_steps // per_epoch)} trains for at least that many steps')
    return notes


# what an evaluation does with fewer validation rows than a flag asks for
MORE_THAN_VALIDATION = {
    'max_eval_rows': 'the validation loss is taken over all {rows}',
    'bleu_samples': 'BLEU-4 is scored on those {rows} (the eval line says on how many rows)',
    'show_samples': 'it shows {rows}',
}


def validation_size_notes(cfg: ResolvedConfig, rows: int) -> list[str]:
    """Each evaluation flag given above the validation file's rows, with what the run does instead."""
    given = cfg.flags_given()
    return [f'--{name}={getattr(cfg.train, name)} is more than the validation file\'s {rows} row'
            f'{"s" if rows != 1 else ""}: {said.format(rows=rows)}'
            for name, said in MORE_THAN_VALIDATION.items() if name in given and getattr(cfg.train, name) > rows]


def warmup_notes(t, total_steps: int) -> list[str]:
    """A warmup as long as the run, with the flags that fix it: its learning rate never reaches
    learn_rate (one step of one: nothing is learned, the first step's rate is 0). A long warmup
    that ends before the run does is not noted: in bench/bench_recipe.py a third of the run learned
    as well as 5% at 1e-2, and a third, a half and three quarters far better than 5% at 3e-2
    (bench/RECIPE_NOTES.md)."""
    warmup = warmup_steps_of(t.warmup_steps, t.warmup_ratio, total_steps)
    if not total_steps or warmup < total_steps:
        return []
    given = f'warmup_ratio={t.warmup_ratio}' if t.warmup_ratio else f'warmup_steps={t.warmup_steps}'
    fixes = []  # only what gives a shorter warmup on this run
    if warmup_steps_of(0, 0.33, total_steps) < warmup:
        fixes.append('--warmup_ratio=0.33' + ('' if t.warmup_ratio else ' (a share of any run)'))
    if not t.warmup_ratio and total_steps // 3 < warmup:
        fixes.append(f'--warmup_steps={total_steps // 3}')
    if not fixes:
        fixes.append('--warmup_ratio=0 --warmup_steps=0')
    fix = ('its one step is taken at rate 0 and learns nothing: ' if total_steps == 1 else 'e.g. ') + ' or '.join(fixes)
    steps = f'{warmup} optimizer step{"s" if warmup != 1 else ""}'
    return [f'{given} warms up for {steps}, all of the run\'s {total_steps}: the learning rate never reaches '
            f'learn_rate={t.learn_rate}; {fix}']


def resume_refusals(saved_cfg: dict, t) -> list[Problem]:
    """A problem for each REFUSED_ON_RESUME field this run changes from the saved run's train config
    (``saved_cfg``); a field the saved config lacks (saved before it existed) reads as its default."""
    defaults = {f.name: f.default for f in dataclasses.fields(t)}
    found = []
    for name, (kept, why) in REFUSED_ON_RESUME.items():
        before = saved_cfg.get(name, defaults[name])
        if kept(before) != kept(getattr(t, name)):
            said = f'{name}={before}' if name in saved_cfg else \
                f'{name}={before} (it was saved before --{name} existed: read as its default)'
            found.append(Problem(name, f'--{name}={getattr(t, name)} but the saved run trained with {said} ({why})',
                                 f'resume with --{name}={before}, or start a new run without --is_keep_training'))
    return found


def learn_rate_notes(t) -> list[str]:
    """A learning rate (and --aux_learn_rate) outside the range bench/bench_recipe.py measured good
    for the optimizer."""
    name = t.optimizer + ('+scale' if t.optimizer == 'adafactor' and t.adafactor_scale_parameter else '')
    notes = []
    low, best, high = GOOD_LEARN_RATES[name]
    if not low <= t.learn_rate <= high:
        scaling = {'adafactor': ' without parameter scaling',
                   'adafactor+scale': ' with parameter scaling'}.get(name, '')
        notes.append(f'learn_rate={t.learn_rate:g} is outside {low:g} to {high:g}, the range that learned well per '
                     f'step for {t.optimizer}{scaling} in bench/bench_recipe.py (best {best:g}; measured on tiny T5s '
                     f'and a held-out task, 400 steps: bench/RECIPE_NOTES.md); a much larger model or a much longer '
                     f'run may want less, but check e.g. --learn_rate={best:g}')
    low, best, high = GOOD_AUX_LEARN_RATES  # measured beside scaled Adafactor only: judged there only
    if name == 'adafactor+scale' and t.aux_learn_rate and not low <= t.aux_learn_rate <= high:
        notes.append(f'aux_learn_rate={t.aux_learn_rate:g} is outside {low:g} to {high:g}, the range that learned '
                     f'well per step in bench/bench_recipe.py (best {best:g}, beside scaled Adafactor at 3e-2; tiny '
                     f'T5s: bench/RECIPE_NOTES.md); check e.g. --aux_learn_rate={best:g}')
    return notes


def _check_init_from(cfg: ResolvedConfig, vocab_size: int) -> None:
    """The warm start's weights: this run's shape and tokenizer, every tensor there and readable
    (loaded into a model on the meta device: no memory for the model itself)."""
    import torch

    from model.net.chat_model import build_model, load_weights_into
    from model.net.model_source import check_same_tokenizer, describe_model_source, weights_path
    from model.net.sizing import shape_differences, shape_fix_flags

    t = cfg.train
    source = describe_model_source(t.init_from, t.tokenizer_dir, what='--init_from')
    diff = shape_differences(source.shape, model_shape(cfg.model, vocab_size))
    if diff:
        said = '; '.join(f'{k} {a} in {source.path}, {b} in this run' for k, (a, b) in diff.items())
        raise UserError(f'--init_from: the model shape differs ({said}); warm-start a run of the same shape: '
                        f'{shape_fix_flags(diff)}')
    check_same_tokenizer(source, t.tokenizer_dir, '--init_from')
    with torch.device('meta'):
        model = build_model(cfg.model, vocab_size)
    with warnings.catch_warnings():  # torch says, per tensor, that copying into meta is a no-op: it is meant
        warnings.filterwarnings('ignore', message='.*copying from a non-meta parameter')
        load_weights_into(model, weights_path(t.init_from))


def shared_place_problems(t) -> list[Problem]:
    """The run's places that are no place for one run's files (:func:`shared_folder`), each said
    first: it explains what else is found there (an input inside it, a foreign file)."""
    found = []
    places = {'output_dir': (t.output_dir, t.output_dir), 'train_state_dir': (t.train_state_dir, t.train_state_dir),
              'model_file': (model_folder(t), t.model_file), 'log_dir': (t.log_dir, t.log_dir)}
    said = shared_folder(t.output_dir)  # the states and step files in output_dir for the same reason: said once
    for name, (path, given) in places.items():
        shared = shared_folder(path)
        if shared and not (name != 'output_dir' and shared == said and ownership.same_or_inside(path, t.output_dir)):
            example = os.path.join(PROJECT_ROOT, 'model_save', 'my_run', *(('chat_small_t5.{}.bin',)
                                                                          if name == 'model_file' else ()))
            where = f'{name}: {given}' + (f' writes into {path}, which' if path != given else '')
            found.append(Problem(name, f'{where} is {shared}: the run\'s files would lie among everything else '
                                 f'there', f'give the run a folder of its own, e.g. --{name}={example}', first=True))
    return found


def layout_problems(t) -> list[Problem]:
    """Places of one run that would undo each other: its states, step files or logs inside a folder
    of output_dir that the run replaces whole (best/, final/: what was in it would block the new
    model at the run's end, or be lost), or previous_runs/ itself (which earlier runs are moved
    into; a run's own folder inside it -- a state folder moved there, resumed -- is fine). By
    path, links followed, whether or not the folders exist yet."""
    found = []
    places = {'train_state_dir': (t.train_state_dir, t.train_state_dir), 'model_file': (model_folder(t), t.model_file),
              'log_dir': (t.log_dir, t.log_dir)}
    for name, (path, given) in places.items():
        for folder in model_files.run_folders(t.output_dir):
            leaf = os.path.basename(folder)
            same = os.path.realpath(path) == os.path.realpath(folder)
            if leaf == model_files.PREVIOUS_RUNS and same:
                found.append(Problem(name, f'{name}: {given} is output_dir\'s {leaf}/, which earlier runs are '
                                     f'moved into', f'choose a --{name} outside it (or a folder inside it)'))
            elif leaf != model_files.PREVIOUS_RUNS and ownership.same_or_inside(path, folder):
                where = f'is output_dir\'s {leaf}/' if same and path == given else f'lies in {folder}'
                found.append(Problem(name, f'{name}: {given} {where}, which is replaced whole by a model folder '
                                     f'at the end of the run', f'choose a --{name} outside it'))
    return found


# the toolkit's own folders: its code, tests and history (model_save/, data/ and logs/ are the user's; bench/
# writes its runs into its out/)
TOOLKIT_FOLDERS = ('.git', '.ci', 'configs', 'model', 'scripts', 'tests')


def shared_folder(path: str) -> str | None:
    """What a folder holds besides a run, said, when it is no place for one run's saves: the
    filesystem's root, the home folder, the toolkit's folder or one holding it or the home
    folder, a copy of the toolkit (a folder with train_low_mem.py and model/), or inside the code
    of either; None for any other (links followed: a link to such a folder is that folder)."""
    real = os.path.realpath(path)
    home = os.path.realpath(os.path.expanduser('~'))
    toolkit = os.path.realpath(PROJECT_ROOT)
    if real == os.path.dirname(real):
        return 'the filesystem\'s root'
    if real == home:
        return 'the home folder'
    root = toolkit if ownership.same_or_inside(real, toolkit) else _checkout_around(real)
    what = 'the toolkit' if root == toolkit else 'a copy of the toolkit'
    if real == root:
        return ("the toolkit's own folder" if root == toolkit else what) + ' (its code)'
    if root and os.path.relpath(real, root).split(os.sep)[0] in TOOLKIT_FOLDERS:
        return f'inside {what}\'s {os.path.relpath(real, root).split(os.sep)[0]}/ folder' + (
            f' ({root})' if root != toolkit else '')
    if ownership.same_or_inside(toolkit, real) or ownership.same_or_inside(home, real):
        return f'a folder that holds {"the toolkit" if ownership.same_or_inside(toolkit, real) else "the home folder"}'
    return None


def _checkout_around(real: str) -> str | None:
    """The nearest folder at or above real that holds a copy of the toolkit's code (train_low_mem.py
    and model/), or None."""
    folder = real
    while True:
        if os.path.isfile(os.path.join(folder, 'train_low_mem.py')) and os.path.isdir(os.path.join(folder, 'model')):
            return folder
        parent = os.path.dirname(folder)
        if parent == folder:
            return None
        folder = parent


def model_folder(t) -> str:
    """The folder the model_file pattern writes into."""
    return model_files.model_folder(t.model_file)


def _check_data(spec, name: str, objective: str = 'pairs') -> list[str]:
    """The files of spec: readable, of the kind the objective trains on, with a usable row."""
    files = resolve_parquet_files(spec)
    kind = files_kind(files, name)
    if objective == 'span_corruption' and kind != 'text':
        raise UserError(f'{name}: {spec} holds prompt/response pairs; --objective=span_corruption trains on raw '
                        f'text: give files with a text column (python prepare_data.py convert IN OUT.parquet '
                        f'--text_col=...), or train these pairs with --objective=pairs')
    if objective == 'pairs' and kind != 'pairs':
        raise UserError(f'{name}: {spec} holds raw text (a text column); --objective=pairs trains prompt/response '
                        f'pairs: pretrain on this text with --objective=span_corruption, or give pairs')
    check_usable_rows(files, name, shown=spec)
    return files


def span_steps(t, files: list[str], world_size: int, kept: dict | None = None) -> tuple[int, int, bool]:
    """(examples of epoch 0, optimizer steps of the run's epochs (before --max_steps), whether the kept counts were taken) under
    span corruption: the loader's own
    count, from every row's tokens (the Rust tokenizer; no torch model), or from the counts a
    resume's state kept (``kept``: its data position's ``row_tokens``) when they are for these files."""
    from tokenizers import Tokenizer

    from model.data.loader import LoaderSettings, StreamingLoader

    tok = Tokenizer.from_file(os.path.join(t.tokenizer_dir, 'tokenizer.json'))
    loader = StreamingLoader(files, tok, LoaderSettings.of(t, train=True), 0, world_size, saved_counts=kept)
    return loader.num_positions, loader.total_steps(t.epochs), loader.dataset.counts_taken


LOG_ROOM = 1 << 20  # a run's log grows by ~100 bytes a logged step: a MiB is the least that makes sense


def _existing(path: str) -> str:
    folder = path
    while not os.path.isdir(folder):
        folder = os.path.dirname(os.path.abspath(folder))
    return folder


def _free_bytes(path: str) -> int:
    return shutil.disk_usage(_existing(path)).free


def save_bytes(t, parameters: int, aux_parameters: int = 0) -> tuple[int, int]:
    """(one training state, one exported model) on disk, about: a state is the fp32 weights, the
    optimizer's moments and a copy of the tokenizer; a step file is the fp32 weights (a model
    folder, best/ or final/, adds the tokenizer)."""
    tokenizer = sum(os.path.getsize(os.path.join(root, name))
                    for root, _, names in os.walk(t.tokenizer_dir) for name in names)
    return state_bytes(parameters, t.optimizer, aux_parameters) + tokenizer, 4 * parameters + tokenizer


def _check_disk(t, report: Report) -> None:
    """Room for the log; for the first saves (a problem): a state, a step file and a model folder
    (best/ at the first evaluation, else final/); and for everything a run's saves hold at once (a
    note): the states kept plus the one being written, the step files kept plus the one being
    written and the best one, best/ and final/ -- each on the disk it goes to."""
    log_free = _free_bytes(t.log_dir)
    if log_free < LOG_ROOM:
        report.problems.append(Problem('log_dir', f'log_dir: {human_bytes(log_free)} free on the disk of {t.log_dir}',
                                       'free space or choose another --log_dir'))
    state, model = save_bytes(t, report.parameters, report.aux_parameters)
    weights = 4 * report.parameters
    if t.keep_latest_n_ckp:
        step_files, kept = t.keep_latest_n_ckp + 2, f'{t.keep_latest_n_ckp + 2} step files'
    elif report.total_steps:  # 0 keeps them all
        step_files = report.total_steps // t.save_steps + 2
        kept = f'{step_files} step files: --keep_latest_n_ckp=0 keeps every one'
    else:  # span corruption: the steps are counted later
        step_files, kept = 2, 'at least 2 step files: --keep_latest_n_ckp=0 keeps every one'
    places = ('output_dir', t.output_dir), ('train_state_dir', t.train_state_dir), ('model_file', model_folder(t))
    first = {'output_dir': (model, 'a model folder'), 'train_state_dir': (state, 'a state'),
             'model_file': (weights, 'a step file')}
    whole = {'output_dir': (2 * model, 'best/ and final/'),
             'train_state_dir': ((contract.STATES_KEPT + 1) * state,
                                 f'{contract.STATES_KEPT + 1} states of ~{human_bytes(state)}'),
             'model_file': (step_files * weights, kept)}
    for saves, first_saves in ((first, True), (whole, False)):
        disks: dict[int, list] = {}  # a disk's places, in the order of `places`: the first names it
        for name, path in places:
            disks.setdefault(os.stat(_existing(path)).st_dev, []).append((name, path, *saves[name]))
        short = False
        for items in disks.values():
            name, path = items[0][:2]
            need, what = sum(i[2] for i in items), ' and '.join(i[3] for i in items)
            free = _free_bytes(path)
            if free >= need:
                continue
            if first_saves:
                short = True
                report.problems.append(Problem(name, f'{name}: {human_bytes(free)} free on the disk of {path}, the '
                                               f'first saves of this model there ({what}) need about '
                                               f'{human_bytes(need)}', 'free space or choose another disk'))
            else:
                report.notes.append(f'{human_bytes(free)} free on the disk of {path}; this run\'s saves hold up to '
                                    f'~{human_bytes(need)} there at once ({what}): the disk may fill up')
        if short:
            return


def check_states(cfg: ResolvedConfig, resume: bool, report: Report, deep: bool = True) -> None:
    """The saved states: for a resume, the one it loads (``report.resume``) and whether it fits
    this run; for a fresh run, whether what an earlier one left can be moved aside. A run of
    several processes has each check them by size (``deep=False``: the same verdict on every
    rank), then the main process alone deeply (:func:`judge_states_on_main`)."""
    t = cfg.train
    if resume:
        _check_resume(cfg, report, deep)
        return
    folders = previous_runs.state_folders(t.train_state_dir, t.model_file, t.output_dir)  # output_dir's too, if it held states
    for folder in folders:
        resume_it = '--is_keep_training=True' + ('' if folder == t.train_state_dir else
                                                 f' --train_state_dir={shlex.quote(folder)}')
        judged = contract.inspect(folder, resume=False, deep=deep, resume_flags=resume_it)
        report.states_damaged = report.states_damaged or judged.all_damaged
        for message in judged.problems:
            report.problems.append(Problem('train_state_dir', message,
                                           damaged_states_fix(t, folder) if judged.all_damaged else ''))
        places = contract.saved_places(folder)
        home = contract.run_home(places) if places else None  # where that run's models are now
        if home and contract.states_of_output([folder], t.output_dir, t.model_file) is None:  # not this place's run
            # another run's states (a state folder two runs share): moved into this run's archive, that run's own
            # resume would then continue this one's states over its models
            report.problems.append(Problem(
                'train_state_dir', f'train_state_dir: {folder} holds the states of another run, whose models are in '
                f'{home[0]}; a fresh run here would move them into '
                f'{os.path.join(t.output_dir, model_files.PREVIOUS_RUNS)}/, away from that run',
                f'give this run a --train_state_dir of its own (that run resumes with --is_keep_training=True '
                f'{_flags(output_dir=home[0], model_file=home[1], train_state_dir=folder)})'))
    if deep and report.ready:
        previous = previous_runs.previous_run_artifacts(t.train_state_dir, t.model_file, t.output_dir)
        report.previous_items = len(previous)
        if previous:
            with_states = [f for f in folders if ckpt.list_complete_states(f)]
            own = contract.states_of_output(with_states, t.output_dir, t.model_file)  # the run whose models are here
            elsewhere = _states_elsewhere(cfg, flags_only=True) if own is None else ''
            if own is not None:
                resume = '; to continue it instead: --is_keep_training=True' + (
                    '' if own == t.train_state_dir else f' --train_state_dir={shlex.quote(own)}')
            elif elsewhere:
                resume = f'; to continue it instead: --is_keep_training=True {elsewhere}'
            elif damaged := contract.moved_as_damaged(t.train_state_dir, t.output_dir, t.model_file):
                resume = f' (its states are in {damaged}, moved there as damaged: it cannot be continued)'
            else:
                resume = (f' (no state of the run whose models are here in {", ".join(with_states or folders)}: '
                          f'it cannot be continued from there)')
            cut = previous_runs.unfinished_archive(t.output_dir, previous)
            report.states_moved_to = _with_the_runs_states(t, cut)
            into = (f'{cut}/, where an earlier move of them was cut short' if cut else
                    f'{os.path.join(t.output_dir, model_files.PREVIOUS_RUNS)}/<time>/')
            report.notes.append(f'a previous run saved {len(previous)} item(s) here; a fresh run moves them to '
                                f'{into}{resume}')
        report.notes += previous_runs.predictions_left_beside(t.model_file, t.output_dir)


def judge_states_on_main(cfg: ResolvedConfig, resume: bool, fingerprint: dict) -> tuple[contract.SavedState | None,
                                                                                        list[str]]:
    """The states judged deeply (checksums, torch files) by the main process of a run of several:
    (the state a resume loads, notes); the first problem is raised as a UserError, which the
    run's collectives raise on every rank."""
    report = Report(fingerprint=fingerprint)
    check_states(cfg, resume, report, deep=True)
    report.raise_first()
    return report.resume, report.notes


def _states_elsewhere(cfg: ResolvedConfig, flags_only: bool = False) -> str:
    """The fix for a resume that finds no state where train_state_dir now follows --output_dir, when
    the run's states are where it pointed before that rule (the preset's or default's place,
    saved by a run with this output_dir); else ''. ``flags_only``: the two flags that resume it."""
    from config import place_before_output_dir

    t = cfg.train
    if cfg.sources.get('train_state_dir') != 'from --output_dir':
        return ''
    before = place_before_output_dir(cfg.preset, 'train_state_dir')
    if contract.states_of_output([before], t.output_dir, t.model_file) is None:  # none there, or another output_dir's
        return ''
    pattern = contract.saved_places(before)['model_file']
    flags = f'{shlex.quote(f"--train_state_dir={before}")} {shlex.quote(f"--model_file={pattern}")}'
    return flags if flags_only else (f'this run\'s states are in {before} (a run given --output_dir now keeps its '
                                     f'states and step files there unless told otherwise): resume with {flags}')


def _flags(**places) -> str:
    return ' '.join(shlex.quote(f'--{name}={value}') for name, value in places.items())


def _run_home(places: dict | None) -> dict | None:
    """{output_dir, model_file} where the models of the run whose state this resumes are now
    (places: contract.places_of its state)."""
    home = contract.run_home(places) if places else None
    return dict(zip(('output_dir', 'model_file'), home)) if home else None


def _other_runs_models(t, saved: contract.SavedState, home: dict | None) -> list[Problem]:
    """A resume that would replace or prune models another run wrote (output_dir's model folders,
    the model_file pattern's files): refused, with this run's own places where they still hold it."""
    run_id = contract.run_id_of(saved.run)
    others = model_files.other_runs_models(t.output_dir, t.model_file, run_id)
    if not others:
        return []
    home = home or {}
    moved = {k: v for k, v in home.items() if v != getattr(t, k)}  # this run's places that are not its own
    runs = sorted({run or 'a run from before runs had ids' for _, run in others})
    folders = {os.path.realpath(p) for p in model_files.model_folders(t.output_dir)}
    name = 'output_dir' if any(os.path.realpath(p) in folders for p, _ in others) else 'model_file'
    shown = ', '.join(p for p, _ in others[:4]) + (f' and {len(others) - 4} more' if len(others) > 4 else '')
    one = len(others) == 1
    fix = (f'resume with {_flags(**moved)}, where this run\'s models are' if moved else
           f'move {"it" if one else "them"} out of the way (or give this resume the --output_dir and --model_file that '
           f'hold this run\'s models)')
    return [Problem(name, f'{name}: {shown} {"is" if one else "are"} the model{"" if one else "s"} of another run '
                    f'({", ".join(runs)}), not of the run this resumes ({run_id or "from before runs had ids"}, '
                    f'{saved.path}); the resume would replace or prune {"it" if one else "them"}', fix)]


def _with_the_runs_states(t, archive: str | None) -> str | None:
    """archive (where a fresh run's move of the earlier run here was cut short), if every state of
    that run it was moving is already whole there -- then that move, finished, loses nothing; else
    None (some are elsewhere: behind a link, on storage not mounted here)."""
    return archive if archive and previous_runs.states_all_moved(archive, t.output_dir) else None


def _cut_move(t) -> str:
    """For a resume that finds no state where a fresh run's move of the earlier run here was cut
    short (its states among what moved, its models not yet): how to finish it; else ''."""
    previous = previous_runs.previous_run_artifacts(t.train_state_dir, t.model_file, t.output_dir)
    cut = _with_the_runs_states(t, previous_runs.unfinished_archive(t.output_dir, previous) if previous else None)
    return (f'a fresh run here was moving the earlier run into {cut} and was cut short, its states already there: '
            f'start without --is_keep_training to finish that move (nothing is lost: the earlier run then continues '
            f'from {cut} with the flags the log prints)') if cut else ''


def _moved_aside(t) -> str:
    """For a resume that finds no state: how the run a fresh run here moved aside last continues
    (a fresh run stopped or killed before its first save leaves none of its own); else ''."""
    from model.state.checkpoint import moved_run_advice

    archives = os.path.join(t.output_dir, model_files.PREVIOUS_RUNS)
    newest = sorted(os.listdir(archives))[-1:] if ownership.is_real_dir(archives) else []
    archive = os.path.join(archives, newest[0]) if newest else ''
    if not ownership.is_real_dir(archive):
        return ''
    here = os.path.basename(os.path.normpath(t.train_state_dir))

    def moved_from_here(name: str) -> bool:  # saved in this train_state_dir, or in one of its name (a copied run's)
        saved_in = (contract.saved_places(os.path.join(archive, name)) or {}).get('train_state_dir')
        return bool(saved_in) and (os.path.realpath(saved_in) == os.path.realpath(t.train_state_dir)
                                   or os.path.basename(os.path.normpath(saved_in)) == here)

    flags = moved_run_advice(archive, t.output_dir, t.model_file)[1] if any(
        map(moved_from_here, os.listdir(archive))) else None
    return (f'start without --is_keep_training (or check --train_state_dir); or continue the newest earlier run '
            f'moved aside from here, to {archive}, with {flags}') if flags else ''


def _moved_as_damaged(t) -> str:
    """For a resume that finds no state where the way on from damaged states (damaged_states_fix)
    moved this run's states out: that they cannot be resumed, and the same way on; else ''."""
    aside = contract.moved_as_damaged(t.train_state_dir, t.output_dir, t.model_file)
    if not aside:
        return ''
    return (f'this run\'s states were moved to {aside} as damaged: none of them can be resumed; '
            f'{_start_afresh(t, " without --is_keep_training")}')


def damaged_states_fix(t, folder: str, start: str = '') -> str:
    """What to do when every saved state in folder is damaged: move them away (a fresh run moves
    aside only states wholly as saved), then start afresh, or keep the run's newest weights -- a
    step file or a model folder it exported -- as a warm start (optimizer, schedule and data
    position start anew)."""
    aside = shlex.quote(contract.damaged_aside(folder, t.output_dir))  # out of output_dir: the next run looks there
    if any(ownership.same_or_inside(place, folder) for place in (t.output_dir, model_folder(t), t.log_dir)):
        # the states lie among the run's models (train_state_dir = output_dir): only the states go
        move = f'move its states away yourself (e.g. mkdir -p {aside} && mv {shlex.quote(folder)}/state-* {aside}/)'
    else:
        move = f'move it away yourself (e.g. mv {shlex.quote(folder)} {aside})'
    return f'{move}, then {_start_afresh(t, start)}'


def _start_afresh(t, start: str) -> str:
    """Start afresh, or from the run's newest weights (a step file, else a model folder it
    exported) as a warm start."""
    steps = sorted(model_files.owned_model_files(t.model_file), key=lambda tag_path: int(tag_path[0]))
    folders = [f for f in model_files.model_folders(t.output_dir) if os.path.isdir(f)]
    newest = steps[-1][1] if steps else (folders[-1] if folders else None)
    keep = (f', or keep the weights of {newest} (a new optimizer, schedule and data order, from step 0): '
            f'--init_from={shlex.quote(newest)}' if newest else '')
    return f'start afresh{start}{keep}'


def _check_resume(cfg: ResolvedConfig, report: Report, deep: bool) -> None:
    t = cfg.train
    states = contract.inspect(t.train_state_dir, resume=True, deep=deep)
    report.resume = saved = states.resume
    report.notes += states.notes
    report.states_damaged = states.all_damaged
    fresh = ('start without --is_keep_training (or check --train_state_dir)' if not states.all_damaged else
             damaged_states_fix(t, t.train_state_dir, ' without --is_keep_training'))
    for message in states.problems:
        report.problems.append(Problem('is_keep_training', message,
                                       _states_elsewhere(cfg) or _cut_move(t) or _moved_aside(t)
                                       or _moved_as_damaged(t) or fresh))
    if saved is None:  # none, or by sizes only: the main process compares what the state holds
        return
    places = contract.places_of(saved.config, saved.run) or {}
    home = _run_home(places)
    others = _other_runs_models(t, saved, home)
    report.problems += others
    if (home and os.path.realpath(home['output_dir']) != os.path.realpath(t.output_dir) and not others
            and model_files.holds_run(t.output_dir, t.model_file, contract.run_id_of(saved.run))  # a copy of them
            and not contract.copied_states(t.train_state_dir, places.get('train_state_dir'), t.output_dir)):
        # its models elsewhere, its states outside this output_dir: a copy of its outputs would go on apart from them
        report.problems.append(Problem('output_dir', f'output_dir: the run whose state this resumes ({saved.path}) has '
                                       f'its models in {home["output_dir"]}; resumed with --output_dir={t.output_dir} '
                                       f'it would go on apart from them (a copy of its outputs?)',
                                       f'resume with {_flags(**home)}, or move {home["output_dir"]} away first to '
                                       f'continue here'))
    runs = contract.runs_of_states(t.train_state_dir)
    if len(runs) > 1:  # its saves would sit among another run's states, and a resume could take either's
        said = '; '.join(f'run {run or "from before runs had ids"}: '
                         f'{", ".join(os.path.basename(p) for p in paths)}' for run, paths in runs.items())
        report.problems.append(Problem('train_state_dir', f'train_state_dir: {t.train_state_dir} holds the states of '
                                       f'more than one run ({said}); this resume would continue the newest, '
                                       f'{saved.path}, among the other\'s',
                                       'move each run\'s states into a folder of their own, then resume with '
                                       '--train_state_dir=<that folder>'))
    saved_cfg = saved.config.get('train', {})
    refusals = resume_refusals(saved_cfg, t)
    report.problems += refusals
    refused = {p.name for p in refusals}
    # what is refused below is not applied: only the changes the resume makes are named
    # nor a field that does nothing with the run's other settings (said as such: config.UNUSED_WHEN)
    idle = {name for name, unused in UNUSED_WHEN.items() if unused(t, True)}
    changed = contract.changed_fields(saved.config, cfg, {*refused, *contract.fixed_fields(saved.fingerprint), *idle})
    if changed:
        report.notes.append(f'changed since the save, applied from step {saved.step} on: {"; ".join(changed)}')
    if not report.fingerprint:
        return
    try:
        report.notes += contract.compare_fingerprints(saved.fingerprint, report.fingerprint, t.allow_data_change,
                                                      saved.path)
    except UserError as e:
        report.problems.append(Problem('is_keep_training', e.message, e.fix))
