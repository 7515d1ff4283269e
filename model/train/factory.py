"""A training run's parts, built from the config in one visible order.

:func:`build_run` is the only place that knows the order, and why it is so:

1. the engine (accelerate: processes, device, precision) and the run's collectives;
2. the lock of the output places (main; every rank stops if another run holds them);
3. the log file, then the start-up notes; a stop from here on ends the run before anything moves;
4. the tokenizer, the loaders, the model (drawn, warm-started, or left for the resume to fill),
   the optimizer and the schedule, prepared by the engine;
5. the state's parts (model/state/contract.py), the checkpointer and the evaluator;
6. a fresh run moves an earlier run's artifacts aside; a resume loads the state the start-up
   checks judged and applies the hyperparameters changed since. With several processes every rank
   checks the states by size before the engine starts (the same verdict everywhere), and the main
   process alone judges them deeply once it can share the result (step 3): a problem only it
   sees stops every rank at once, and every rank loads the state it chose.

Each component takes its own typed view of the config (``LoaderSettings.of``, ``EvalSettings.of``),
built here once. The Trainer (model/train/trainer.py) receives the result and only runs the loop.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from config import ResolvedConfig
from model import stopping
from model.errors import UserError
from model.faults import fault_point
from model.state import contract, locks, markers, states as state_files, writes
from model.state.checkpoint import Checkpointer, DataPosition, SaveSettings, apply_changed_hyperparameters
from model.state.contract import SavedState, StateParts, TrainState
from model.stopping import STOP

logger = logging.getLogger('chat_trainer')

SCHEDULES = {'cosine': 'cosine', 'linear': 'linear', 'constant': 'constant_with_warmup'}


@dataclass
class Run:
    """Everything the loop works with."""

    cfg: ResolvedConfig
    accelerator: object
    collectives: object
    lock: object
    log_file: str
    tokenizer: object
    train_loader: object
    model: object
    optimizer: object
    scheduler: object
    decoder_inputs: object  # labels -> decoder inputs (pad-started, -100 -> pad)
    total_steps: int
    state: TrainState  # the run's counters
    data_position: DataPosition
    checkpointer: Checkpointer
    evaluator: object


def build_optimizer(train_cfg, model):
    t = train_cfg
    groups = param_groups(model, t)
    if t.optimizer == 'adafactor':
        from model.train.adafactor import Adafactor  # transformers' arithmetic, weights of one shape at once

        return Adafactor(groups, lr=t.learn_rate, scale_parameter=t.adafactor_scale_parameter,
                         weight_decay=t.weight_decay)
    import torch

    return torch.optim.AdamW(groups, lr=t.learn_rate, weight_decay=t.weight_decay)


def param_groups(model, train_cfg) -> list:
    """The weights as the optimizer takes them: one group at --learn_rate, or with --aux_learn_rate
    two -- the layers' matrices (--optimizer at --learn_rate) and the rest, the embedding, the layer
    norms and the relative position biases (Adam at --aux_learn_rate, never weight-decayed). A group
    names the config field of its rate (``rate_field``): a resume that changes it applies it to that
    group (checkpoint.apply_changed_hyperparameters). One group is what states saved before the
    field hold, so they load as they did."""
    from model.net.chat_model import layer_matrices

    t = train_cfg
    weights = list(model.parameters())
    if not t.aux_learn_rate:
        return weights
    matrices = {id(p) for p in layer_matrices(model)}
    layers = [p for p in weights if id(p) in matrices]
    aux = [p for p in weights if id(p) not in matrices]
    # not decayed (decayed=False: a resume's --weight_decay leaves it at 0): decay would pull the norms'
    # scales toward 0, at the aux group's higher rate
    if t.optimizer == 'adafactor':
        from model.train.adafactor import adam_group

        aux_group = adam_group(aux, t.aux_learn_rate, 0.0, rate_field='aux_learn_rate', decayed=False)
    else:  # AdamW already: the same arithmetic at its own rate
        aux_group = dict(params=aux, lr=t.aux_learn_rate, weight_decay=0.0, rate_field='aux_learn_rate', decayed=False)
    return [dict(params=layers, rate_field='learn_rate'), aux_group]


def build_scheduler(train_cfg, optimizer, total_steps: int):
    """Linear warmup over warmup_steps (or warmup_ratio of the run's steps), then lr_schedule
    (transformers' schedules)."""
    from transformers import get_scheduler

    from model.net.sizing import warmup_steps_of

    warmup = warmup_steps_of(train_cfg.warmup_steps, train_cfg.warmup_ratio, total_steps)
    return get_scheduler(SCHEDULES[train_cfg.lr_schedule], optimizer, num_warmup_steps=warmup,
                         num_training_steps=max(total_steps, 1))


def build_engine(t):
    """accelerate's Accelerator for this run, and its collectives; a precision warning or None."""
    from accelerate import Accelerator

    from model.train.run_support import Collectives, resolve_precision

    use_cpu = os.environ.get('ACCELERATE_USE_CPU', '').lower() in ('1', 'true', 'yes')
    precision, warning = resolve_precision(t.mixed_precision, use_cpu)
    trackers = {} if t.log_with == 'none' else {'log_with': t.log_with, 'project_dir': t.log_dir}
    # an accelerate config file's value would override the flag silently (and DeepSpeed reads it)
    os.environ['ACCELERATE_GRADIENT_ACCUMULATION_STEPS'] = str(t.gradient_accumulation_steps)
    accelerator = Accelerator(mixed_precision=precision, cpu=use_cpu,
                              gradient_accumulation_steps=t.gradient_accumulation_steps, **trackers)
    return accelerator, Collectives(accelerator), warning


def stop_at_start_up_all_ranks(collectives) -> None:
    """A stop before the run state is loaded or anything moved: nothing new to save."""
    signum = collectives.stop_signal_all_ranks(STOP.signum)
    if not signum:
        return
    STOP.follow(signum)
    seconds = STOP.seconds_since_signal()
    logger.warning('rank %d: stopped by %s during start-up, %.1f s after the signal: nothing was '
                   'trained, saved or moved', collectives.accelerator.process_index, STOP.said(), seconds)
    raise STOP.stopped(f'during start-up, {seconds:.1f} s after the signal: nothing was trained, saved or moved')


def build_run(cfg: ResolvedConfig, resume: bool, notes: list[str], fingerprint: dict,
              saved: SavedState | None) -> Run:
    """The run's parts (see the module's text for the order). ``saved``: the state a resume loads,
    as the start-up checks judged it (one process; with several, the main process judges again)."""
    from model.train.preflight import judge_states_on_main, model_folder
    from model.train.run_support import setup_logging_all_ranks

    t = cfg.train
    accelerator, collectives, warning = build_engine(t)
    places = [t.train_state_dir, t.output_dir, model_folder(t)]
    # the folders a fresh run makes for its places (main): taken back if it does not get to train (below)
    made = collectives.on_main_all_ranks(lambda: [] if resume else make_places(places))
    # one run per output place: main takes the locks, every rank stops if that failed (the lock files it
    # made in folders it made go with them)
    try:
        lock = collectives.on_main_all_ranks(lambda: locks.PlaceLock(places, 'training run').acquire(
            take_back=tuple(folder for folder, _ in made)))
    except BaseException:
        writes.remove_made(made or [])
        raise
    try:
        # the state folder is marked the toolkit's as soon as its lock is taken: before the log folder
        # (which may lie in it) or anything else of the run is made there
        collectives.on_main_all_ranks(lambda: state_files.ensure_state_dir(t.train_state_dir))
        log_file = setup_logging_all_ranks(t.log_dir, collectives)
        if warning:
            logger.warning(warning)
        logger.info('run: %d process(es), device %s, precision %s, log %s', collectives.world,
                    accelerator.device, accelerator.mixed_precision, log_file)
        logger.info('outputs: %s', t.output_dir)  # plot finds a run's newest log by it (presets share log_dir)
        for note in notes if collectives.is_main else ():  # the same on every rank: said once
            logger.warning('%s', note)
        stamp = os.path.basename(log_file).removeprefix('chat_trainer_low_mem_').removesuffix('.log')
        fault_point('start-up')
        stop_at_start_up_all_ranks(collectives)
        if collectives.world > 1:  # judged deeply once, by the main process: its verdict for every rank
            saved, deep_notes = collectives.on_main_all_ranks(
                lambda: judge_states_on_main(cfg, resume, fingerprint)) or (None, [])
            for note in deep_notes:
                if note not in notes:  # the main process's: every rank's notes said nothing of the states
                    logger.warning('%s', note)
        if resume:  # every rank loads the main process's verdict (its data position's counts: before the loaders)
            saved = collectives.broadcast_from_main_all_ranks(saved)
        if t.log_with != 'none':
            init_trackers(cfg, accelerator, stamp)
        # the run's id: a resume keeps its state's (None: saved before ids were kept), a fresh run makes one
        if resume:
            run_id = contract.run_id_of(saved.run) if saved else None
        else:
            run_id = collectives.broadcast_from_main_all_ranks(contract.new_run_id(stamp))
        if run_id:  # plot joins the logs of one run's starts (a first and its resumes) by it
            logger.info('run id: %s', run_id)
        run = _build_parts(cfg, resume, accelerator, collectives, lock, log_file, fingerprint, saved, run_id)
        stop_at_start_up_all_ranks(collectives)  # again before anything is moved or loaded: a stop changes nothing
        if not resume:
            with stopping.critical():
                run.checkpointer.archive_previous_run_all_ranks(stamp)
            fault_point('moved-aside')
        if resume:
            with stopping.critical():
                run.checkpointer.end_cut_copies_all_ranks()
            run.checkpointer.load_all_ranks(saved, run.state, run.data_position)
            apply_changed_hyperparameters(cfg, run.optimizer, run.scheduler)
        return run
    except BaseException:
        if lock is not None:  # main
            take_back_made_folders(lock, made, t.train_state_dir)
        raise


def make_places(places: list[str]) -> list:
    """The folders of the places made (writes.make_folders), outermost first; if one cannot be made,
    those made for the places before it go again."""
    made: list = []
    try:
        for place in places:
            made += writes.make_folders(os.path.realpath(place))
    except BaseException:
        writes.remove_made(made)
        raise
    return made


def take_back_made_folders(lock, made: list, state_dir: str) -> None:
    """A fresh run that stops or is refused before its first step (span corruption's examples are
    counted only here) leaves no folder it made that holds nothing else: from such a folder its
    lock file and the state folder's marker go, then the folder, while still the one it made
    (model/state/writes.py). A folder holding anything more -- the run's log, a user's file put
    there since -- stays whole, marker and all: the same command starts there again."""
    state_dir, emptied = os.path.realpath(state_dir), set()  # as made (make_folders was given realpaths)
    for folder, identity in reversed(made):  # innermost first: a made folder inside one counts as gone
        if not writes.still_made(folder, identity):  # never a link, nor a folder made there since
            continue
        own = {markers.LOCK_FILE} | ({markers.MARKER_FILE} if folder == state_dir else set())
        try:
            left = {n for n in os.listdir(folder) if os.path.join(folder, n) not in emptied}
        except OSError:
            continue
        if left <= own:
            emptied.add(folder)
    if state_dir in emptied:
        state_files.unmark_state_dir(state_dir)
    lock.release(remove_in=tuple(emptied))
    writes.remove_made(made)


def _build_parts(cfg, resume, accelerator, collectives, lock, log_file, fingerprint, saved=None,
                 run_id=None) -> Run:
    from accelerate.utils import set_seed

    from model.data.files import resolve_parquet_files
    from model.data.loader import LoaderSettings, StreamingLoader
    from model.data.tokenizer import load_tokenizer, save_tokenizer_copy
    from model.net.chat_model import build_model, load_weights_into
    from model.net.model_source import weights_path
    from model.train.evaluation import EvalSettings, Evaluator
    from model.train.preflight import kept_counts

    t = cfg.train
    set_seed(t.seed)
    tokenizer = load_tokenizer(t.tokenizer_dir)
    world, rank, pin = collectives.world, accelerator.process_index, accelerator.device.type == 'cuda'
    train_files, valid_files = resolve_parquet_files(t.train_file), resolve_parquet_files(t.validation_file)
    # span corruption counts every row's tokens once: each rank a share, summed (collectives.combine_counts);
    # a stop breaks a rank's count off (model/data/span_stream.py), and every rank leaves at the sum
    def sum_counts_or_stop(counts, error):
        total = collectives.combine_counts(counts, error)
        stop_at_start_up_all_ranks(collectives)
        return total
    count = sum_counts_or_stop if t.objective == 'span_corruption' else None
    width = cfg.model.d_model  # packing weighs attention against positions by the model's width
    # a resume takes the token counts its state kept (span corruption), if they are for these files
    counted = kept_counts(t, saved if resume else None)
    train_loader = StreamingLoader(train_files, tokenizer, LoaderSettings.of(t, True, pin, width), rank, world,
                                   combine_counts=count, saved_counts=counted)
    if counted is not None and world > 1 and not collectives.ok_all_ranks(train_loader.dataset.counts_taken):
        train_loader.dataset.drop_taken_counts()  # a rank sees other files (its own copy?): all count, together
        logger.warning('data: not every process could take the saved token counts (this one: %s; do they all see '
                       'the same files?): every process counts them again',
                       train_loader.counts_not_taken or 'taken')
    elif resume and t.allow_data_change and t.objective == 'span_corruption':
        logger.info('data: --allow_data_change=True: token counts a saved state kept are not used; counting again')
    valid_loader = StreamingLoader(valid_files, tokenizer, LoaderSettings.of(t, False, pin, width), rank,
                                   world, combine_counts=count)
    # rows (pairs) or examples (span corruption) per global step, every epoch counted
    epoch_steps = train_loader.total_steps(t.epochs)
    valid_loader.num_positions  # counted now, by every rank together (later calls read the count)
    if epoch_steps == 0:  # pairs: said by the start-up checks; span corruption's examples are known only now
        raise UserError(f'train_file: its {train_loader.num_positions} span-corruption examples are fewer than one '
                        f'optimizer step needs ({t.batch_size_per_gpu} x {world} processes x '
                        f'{t.gradient_accumulation_steps} accumulation)',
                        'lower --batch_size_per_gpu or --gradient_accumulation_steps')
    total_steps = min(epoch_steps, t.max_steps) if t.max_steps else epoch_steps
    if t.objective == 'span_corruption' and collectives.is_main:  # the start-up checks could not count the steps
        from model.train.preflight import run_length_notes

        for note in run_length_notes(cfg, epoch_steps, saved.step if resume and saved is not None else 0):
            logger.warning('%s', note)
    # a resume (accelerate's strict load) or a warm start (load_weights_into: every tensor, or one
    # line) loads every weight next: nothing to draw
    model = build_model(cfg.model, len(tokenizer), initialize=not (resume or t.init_from))
    if t.init_from and not resume:  # warm start: these weights, a fresh optimizer, schedule and data position
        load_weights_into(model, weights_path(t.init_from))
        logger.info('warm start: weights from %s', t.init_from)
    decoder_inputs = model.prepare_decoder_input_ids_from_labels
    if t.gradient_checkpointing:  # recompute activations in the backward pass: less memory, more compute
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False})
        model.config.use_cache = False
    optimizer = build_optimizer(t, model)
    # the scheduler is not prepared: accelerate would step it once per process
    scheduler = build_scheduler(t, optimizer, total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    state, data_position = TrainState(), DataPosition(train_loader)
    parts = StateParts(accelerator, collectives,
                       {'schedule': scheduler, 'data_position': data_position, 'counters': state},
                       write_tokenizer=lambda folder: save_tokenizer_copy(tokenizer, folder))
    checkpointer = Checkpointer(SaveSettings.of(cfg, fingerprint, run_id), collectives, model, tokenizer, parts)
    evaluator = Evaluator(EvalSettings.of(t), collectives, tokenizer, valid_loader, valid_files, decoder_inputs)
    return Run(cfg, accelerator, collectives, lock, log_file, tokenizer, train_loader, model, optimizer, scheduler,
               decoder_inputs, total_steps, state, data_position, checkpointer, evaluator)


def init_trackers(cfg, accelerator, stamp: str) -> None:
    """accelerate's trackers (TensorBoard under log_dir/tensorboard/<run>, or wandb), with the
    config as hyperparameters."""
    t = cfg.train
    flat = {f'{part}/{k}': v for part, values in cfg.to_dict().items() if isinstance(values, dict)
            for k, v in values.items()}
    name = f'tensorboard/{stamp}' if t.log_with == 'tensorboard' else 'chat_small_t5'
    accelerator.init_trackers(name, config=flat)
    logger.info('curves also go to %s (%s)', t.log_with,
                os.path.join(t.log_dir, name) if t.log_with == 'tensorboard' else name)


