"""A run's saves and exports: its state through the contract (model/state/contract.py), weights
files (step files, best), model folders (best/, final/), and an earlier run moved aside.

Weights are exported from the engine's gathered state dict, so FSDP and ZeRO-3 shards export as
one model; every method named ``*_all_ranks`` is reached by every rank at the same step.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
from dataclasses import dataclass

from model.errors import NotOurs
from model.faults import fault_point
from model.state import contract, model_files, previous_runs, states as state_files
from model.state.contract import SavedState, StateParts, TrainState

logger = logging.getLogger('chat_trainer')


class DataPosition:
    """The loader's position: the ``data_position`` part of a state. A stop saves the position
    from before the step it did not take (:meth:`as_of`)."""

    def __init__(self, loader):
        self.loader, self.pending = loader, None

    @contextlib.contextmanager
    def as_of(self, position: dict | None):
        """Saved as ``position`` (None: the loader's own) inside the block."""
        self.pending = position
        try:
            yield
        finally:
            self.pending = None

    def state_dict(self) -> dict:
        return dict(self.pending or self.loader.state_dict())

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)


@dataclass(frozen=True)
class SaveSettings:
    """The checkpointer's view of the config, built once (:meth:`of`)."""

    train_state_dir: str
    model_file: str  # pattern of the step / best weights files
    output_dir: str  # best/ and final/ go here
    keep_latest_n_ckp: int
    max_seq_len: int
    config: dict  # the whole config, as each state records it
    fingerprint: dict  # what a resume must find unchanged (contract.fingerprint)
    run_id: str | None = None  # the run's id (contract.new_run_id), in every state and model it saves

    @property
    def objective(self) -> str:
        """What the models it exports were trained on (recorded in each: generate and chat say so)."""
        return self.config['train'].get('objective', 'pairs')

    @classmethod
    def of(cls, cfg, fingerprint: dict, run_id: str | None = None) -> 'SaveSettings':
        t = cfg.train
        return cls(train_state_dir=t.train_state_dir, model_file=t.model_file, output_dir=t.output_dir,
                   keep_latest_n_ckp=t.keep_latest_n_ckp, max_seq_len=t.max_seq_len, config=cfg.to_dict(),
                   fingerprint=fingerprint, run_id=run_id)


class Checkpointer:
    """Saves and loads the run's state (``parts``); exports weights (step files, best/, final/)."""

    def __init__(self, settings: SaveSettings, collectives, model, tokenizer, parts: StateParts):
        self.settings, self.collectives, self.accelerator = settings, collectives, collectives.accelerator
        self.model, self.tokenizer, self.parts = model, tokenizer, parts
        self.last_saved_step, self.last_saved_path = -1, None  # the newest state of this run: saved or resumed
        self.moved_run = ''  # where a fresh run moved an earlier one, and how that one continues

    # --- saving ---

    def save_all_ranks(self, step: int) -> str:
        """The full state, then the step's weights file and keep-N pruning."""
        t = self.settings
        describe = contract.describe_run(t.config, t.fingerprint, self.collectives.world,
                                         str(self.accelerator.distributed_type), t.run_id)
        path = self.parts.save_all_ranks(t.train_state_dir, step, describe)
        self.last_saved_step, self.last_saved_path = step, path
        fault_point('state-saved', step)  # a stop here: the resume writes the step file (_restore_step_file_all_ranks)
        self.export_step_file_all_ranks(step)
        self.collectives.on_main_all_ranks(lambda: model_files.prune_model_files(t.model_file, t.keep_latest_n_ckp))
        logger.info('saved state at step %d -> %s', step, path)
        return path

    def full_state_dict_all_ranks(self) -> dict:
        """The whole model's weights on the main process (gathered from the shards under FSDP or
        ZeRO-3: every rank takes part)."""
        return self.accelerator.get_state_dict(self.model)

    def export_weights_all_ranks(self, tag, step: int) -> None:
        """model_file.format(tag): the gathered weights as safetensors, with the model shape."""
        state_dict = self.full_state_dict_all_ranks()
        t = self.settings
        path = t.model_file.format(tag)
        self.collectives.on_main_all_ranks(lambda: _replacing(path, lambda: model_files.save_weights_file(
            state_dict, path, step=step, tag=tag, model_shape=t.fingerprint['model_shape'],
            tokenizer=t.fingerprint['tokenizer'], max_seq_len=t.max_seq_len, run_id=t.run_id,
            objective=t.objective)))

    def export_step_file_all_ranks(self, step: int) -> None:
        """model_file.format(step), the step's weights beside its state: a user's file or link put at
        that name is never replaced (NotOurs), and no reason to end the run -- the state holds the
        very weights -- said, the run goes on."""
        try:
            self.export_weights_all_ranks(step, step)
        except NotOurs as e:
            if self.collectives.is_main:
                logger.warning('%s; the weights of step %d are not exported there, training goes on: the state %s '
                               'holds them', e.message, step, self.last_saved_path)

    def save_best_all_ranks(self, step: int) -> None:
        """model_file.format('best') and the Hugging Face folder output_dir/best: each written
        where it may be, a refusal of either (a user's file there: NotOurs) raised after both."""
        refused = []
        for export in (self.export_weights_all_ranks, self.export_folder_all_ranks):
            try:
                export('best', step)
            except NotOurs as e:
                refused.append(e.message)
        if refused:
            raise NotOurs('; '.join(refused))

    def export_folder_all_ranks(self, name: str, step: int) -> None:
        state_dict = self.full_state_dict_all_ranks()
        path = os.path.join(self.settings.output_dir, name)
        self.collectives.on_main_all_ranks(lambda: _replacing(path, lambda: model_files.save_model_folder(
            self.accelerator.unwrap_model(self.model), state_dict, self.tokenizer, path, tag=name, step=step,
            max_seq_len=self.settings.max_seq_len, run_id=self.settings.run_id, objective=self.settings.objective)))

    def export_final_all_ranks(self, step: int) -> str | None:
        """output_dir/final, the run's last model; returns where that model is. A user's file put
        in final/ meanwhile is never replaced (NotOurs), and no reason to fail a run that trained to
        its end: the last model is then the weights file of the step's state (written with it, or
        now), said; None where that is refused too (the state holds it)."""
        t = self.settings
        final = os.path.join(t.output_dir, 'final')
        try:
            self.export_folder_all_ranks('final', step)
            return final
        except NotOurs as e:
            blocked = e.message
        step_file = t.model_file.format(step)
        record = model_files.model_record(step_file) or {}
        written = self.collectives.broadcast_from_main_all_ranks(
            self.collectives.is_main and record.get('step') == step and record.get(model_files.RUN_ID) == t.run_id
            and model_files.model_identity(step_file) is not None)
        try:
            if not written:
                self.export_weights_all_ranks(step, step)
        except NotOurs as e:
            if self.collectives.is_main:
                logger.warning('%s; %s: the last model (step %d) is exported nowhere else; the state %s holds it',
                               blocked, e.message, step, self.last_saved_path)
            return None
        if self.collectives.is_main:
            logger.warning('%s; the last model (step %d) is in %s, the weights file of its state, instead (a later '
                           'run writes final/ once yours is moved away)', blocked, step, step_file)
        return step_file

    def archive_previous_run_all_ranks(self, stamp: str) -> None:
        t = self.settings
        archive = self.collectives.on_main_all_ranks(
            lambda: previous_runs.archive_previous_run(t.train_state_dir, t.model_file, t.output_dir, stamp))
        advice, flags = (moved_run_advice(archive, t.output_dir, t.model_file, t.train_state_dir) if archive else
                         ('', None))
        if archive:
            logger.warning('a previous run left a state or models here; moved them to %s (nothing is deleted). '
                           'This run starts afresh; %s', archive, advice)
        # every rank's last line may be the one a user sees
        self.moved_run = self.collectives.broadcast_from_main_all_ranks(
            (f'the earlier run it moved aside continues with {flags}' if flags else
             f'the earlier run it moved aside is in {archive}') if archive else '')

    def end_cut_copies_all_ranks(self) -> None:
        """A resume where a fresh run's move was cut: its copy in progress ended (previous_runs.end_cut_copies)."""
        self.collectives.on_main_all_ranks(lambda: previous_runs.end_cut_copies(self.settings.output_dir))

    # --- loading ---

    def load_all_ranks(self, saved: SavedState, state: TrainState, data_position: DataPosition) -> None:
        """The state judged at start-up, into every part (``state`` is the counters part)."""
        self.parts.load_all_ranks(saved)
        self.last_saved_step, self.last_saved_path = state.global_step, saved.path
        self._restore_step_file_all_ranks(state.global_step)
        saved_world = saved.run.get('world_size')
        if saved_world != self.collectives.world and self.collectives.is_main:
            logger.warning('resuming on %d process(es), saved on %s: the data position is kept exactly '
                           '(no row repeated or skipped); ranks without a saved RNG state start from the seed',
                           self.collectives.world, saved_world)
        position = data_position.state_dict()
        unit = 'examples' if position.get('objective') == 'span_corruption' else 'rows'
        logger.info('resumed from %s: step %d, epoch %d, %d %s into the epoch', saved.path,
                    state.global_step, position.get('epoch', 0), position.get('rows_consumed', 0), unit)


    def _restore_step_file_all_ranks(self, step: int) -> None:
        """The step file of the state resumed from, written again when a kill came between that
        state and its export (save_all_ranks writes the state first): the state holds the very
        weights it would have had. Every state has one; without this it was missing for good."""
        path = self.settings.model_file.format(step)
        missing = self.collectives.broadcast_from_main_all_ranks(
            step > 0 and self.collectives.is_main and not os.path.lexists(path))
        if missing:
            if self.collectives.is_main:
                logger.info('%s, the step file of the state resumed from, is missing (a stop between the state '
                            'and its export): written again from the state', path)
            self.export_step_file_all_ranks(step)


def _replacing(model_path: str, write) -> None:
    """write() the model at model_path; then name the predictions `test` wrote beside it of the
    model it replaced: they describe that one, not this (each records the model it scored)."""
    stale = previous_runs.predictions_scoring(model_path) if os.path.lexists(model_path) else []
    write()
    for path in stale:
        logger.warning('%s scored the model that was at %s until this save replaced it: it does not describe the model '
                       'there now (its record names the one it scored); run `test` again to score the new one', path,
                       model_path)


def moved_run_advice(archive: str, output_dir: str, model_file: str, train_state_dir: str | None = None
                     ) -> tuple[str, str | None]:
    """How to continue the run whose models a fresh run moved into archive: resumed where it now
    is, with the states of that run only (a state folder's newest state names the output_dir it
    was saved for), its models and states apart from the new run's; or, its states moved aside as
    damaged (contract.moved_as_damaged, with the fresh run's train_state_dir), where they are. (the
    advice, the flags that resume it -- None without a state of that run among what moved)."""
    folders = sorted(os.path.join(archive, n) for n in os.listdir(archive)
                     if state_files.list_complete_states(os.path.join(archive, n)))
    pattern = model_files.join_model_file(archive, *model_files.split_model_file(model_file)[1:])
    own = contract.states_of_output(folders, archive, pattern, saved_for=output_dir)
    others = [f for f in folders if f != own]
    flags = [f'--output_dir={archive}', f'--model_file={pattern}']
    also = ''.join(f'; also moved: {f}, the states of a run whose output_dir was '
                   f'{(contract.saved_places(f) or {}).get("output_dir", "not known")}' for f in others)
    damaged = own is None and train_state_dir is not None and contract.moved_as_damaged(
        train_state_dir, output_dir, model_file, models_at=(archive, pattern))
    if damaged:  # the way on from damaged states was followed: nothing to resume
        return (f'the earlier run\'s states are in {damaged}, moved there as damaged: it cannot be continued (its '
                f'models are in {archive}; remove {damaged} once you no longer need it){also}'), None
    if own is None:
        return (f'no state of the run whose models were here was among what was moved{also}; if it kept its '
                f'states in another --train_state_dir, resume it with that and: '
                f'{" ".join(shlex.quote(f) for f in ["--is_keep_training=True", *flags])}'), None
    resume = ' '.join(shlex.quote(f) for f in ['--is_keep_training=True', *flags, f'--train_state_dir={own}'])
    return (f'to continue that one instead, stop this run and run its command again with these flags in place of '
            f'its own (its models and states together, apart from this run\'s): {resume}{also}'), resume


def apply_changed_hyperparameters(cfg, optimizer, scheduler) -> None:
    """The loaded optimizer and schedule carry the saved learning rates and weight decay; this
    run's values win (the schedule's shape comes from this run's config already). A param group
    takes its rate from the config field it names (``rate_field``, model/train/factory.param_groups;
    learn_rate where it names none). The start-up checks name every field changed since the save
    (contract.changed_fields): none is silently ignored."""
    t = cfg.train
    rates = [getattr(t, group.get('rate_field', 'learn_rate')) for group in optimizer.param_groups]
    for group, rate in zip(optimizer.param_groups, rates):
        group['initial_lr'] = rate
        group['weight_decay'] = t.weight_decay if group.get('decayed', True) else 0.0
    # through the schedule's own state dict (its public contract): the base and the current rate
    schedule = scheduler.state_dict()
    step = schedule['last_epoch']
    lrs = [rate * f(step) for rate, f in zip(rates, scheduler.lr_lambdas)]
    schedule.update(base_lrs=rates, _last_lr=lrs)
    scheduler.load_state_dict(schedule)
    for group, lr in zip(optimizer.param_groups, lrs):
        group['lr'] = lr
