"""What a run's state holds, and saving and loading it on every rank through the engine.

The engine's parts -- model, optimizer, grad scaler, RNG of every rank, and the registered
objects (the learning-rate schedule and the data position) -- go through accelerate's
``save_state`` / ``load_state``, which knows how DDP, FSDP (sharded states) and DeepSpeed
store them. Around it the toolkit keeps its own guarantees (model/state/states.py): a
temporary folder, checksums and a completion marker, the newest state that loads, nothing
that unpickles more than tensors. Weights are exported from the engine's gathered state dict.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from dataclasses import dataclass

from model.state import model_files, states as state_files
from model.data.tokenizer import save_tokenizer_copy

logger = logging.getLogger('chat_trainer')

@dataclass
class TrainState:
    """Run state (never written onto the config); saved with every checkpoint."""

    global_step: int = 0  # optimizer steps done
    best_val_loss: float = math.inf
    best_step: int = -1
    samples_seen: int = 0  # real rows trained on, all ranks
    tokens_seen: int = 0  # label tokens trained on, all ranks
    last_eval_step: int = -1
    eval_pending: bool = False  # the evaluation at global_step was cut by a stop: a resume performs it first


class DataPosition:
    """The loader's position, registered with accelerate as a checkpointed object. A stop
    saves the position from before the step it did not take (``pending``)."""

    def __init__(self, loader):
        self.loader, self.pending = loader, None

    def state_dict(self) -> dict:
        return dict(self.pending or self.loader.state_dict())

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)


class Checkpointer:
    """Saves and loads the parts of a run; exports weights (step files, best/, final/)."""

    def __init__(self, cfg, accelerator, collectives, model, optimizer, scheduler, train_loader, tokenizer,
                 fingerprint: dict):
        self.cfg, self.train_cfg = cfg, cfg.train
        self.accelerator, self.collectives = accelerator, collectives
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.train_loader, self.tokenizer, self.fingerprint = train_loader, tokenizer, fingerprint
        self.data_position = DataPosition(train_loader)
        # the schedule is not prepared (accelerate would step it once per process): register it
        accelerator.register_for_checkpointing(scheduler, self.data_position)
        self.last_saved_step = -1

    # --- saving ---

    def save_all_ranks(self, state: TrainState, data_state: dict | None = None) -> str:
        """The full state, then the step's weights file and keep-N pruning."""
        t, step = self.train_cfg, state.global_step
        self.data_position.pending = data_state
        jsons = {'train_state': dataclasses.asdict(state), 'config': self.cfg.to_dict(),
                 'fingerprint': self.fingerprint,
                 'run': {'world_size': self.collectives.world, 'engine': str(self.accelerator.distributed_type),
                         'saved_at': time.strftime('%Y-%m-%d %H:%M:%S')}}

        def write_main(folder):
            for name, obj in jsons.items():
                state_files.write_json(os.path.join(folder, f'{name}.json'), obj)
            save_tokenizer_copy(self.tokenizer, os.path.join(folder, state_files.TOKENIZER_COPY))

        try:
            path = state_files.save_state(
                t.train_state_dir, step, is_main=self.collectives.is_main, all_ok=self.collectives.ok_all_ranks,
                write_all_ranks=lambda folder: self.accelerator.save_state(folder, safe_serialization=True),
                write_main=write_main)
        finally:
            self.data_position.pending = None
        self.last_saved_step = step
        self.export_weights_all_ranks(step, step)
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
        t = self.train_cfg
        self.collectives.on_main_all_ranks(lambda: model_files.save_weights_file(
            state_dict, t.model_file.format(tag), step=step, tag=tag, model_shape=self.fingerprint['model_shape'],
            tokenizer=self.fingerprint['tokenizer'], max_seq_len=t.max_seq_len))

    def save_best_all_ranks(self, step: int) -> None:
        """model_file.format('best') and the Hugging Face folder output_dir/best."""
        self.export_weights_all_ranks('best', step)
        self.export_folder_all_ranks('best', step)

    def export_folder_all_ranks(self, name: str, step: int) -> None:
        state_dict = self.full_state_dict_all_ranks()
        self.collectives.on_main_all_ranks(lambda: model_files.save_model_folder(
            self.accelerator.unwrap_model(self.model), state_dict, self.tokenizer,
            os.path.join(self.train_cfg.output_dir, name), tag=name, step=step, max_seq_len=self.train_cfg.max_seq_len))

    def archive_previous_run_all_ranks(self, stamp: str) -> None:
        t = self.train_cfg
        archive = self.collectives.on_main_all_ranks(
            lambda: state_files.archive_previous_run(t.train_state_dir, t.model_file, t.output_dir, stamp))
        if archive:
            logger.warning('a previous run left a state or models here; moved them to %s (nothing is '
                           'deleted). To continue that run instead, pass --is_keep_training=True', archive)

    # --- loading ---

    def load(self) -> TrainState:
        """The newest state that loads, into every part; returns the run state."""
        t = self.train_cfg
        saved = state_files.load_state(t.train_state_dir, self._load_engine_state)
        for note in state_files.compare_fingerprints(saved['fingerprint'], self.fingerprint,
                                                     t.allow_data_change, saved['path']):
            logger.warning(note)
        self._apply_changed_hyperparameters(saved['config'])
        state = TrainState(**saved['train_state'])
        self.last_saved_step = state.global_step
        saved_world = saved['run'].get('world_size')
        if saved_world != self.collectives.world:
            logger.warning('resuming on %d process(es), saved on %s: the data position is kept exactly '
                           '(no row repeated or skipped); ranks without a saved RNG state start from the seed',
                           self.collectives.world, saved_world)
        position = self.data_position.state_dict()
        logger.info('resumed from %s: step %d, epoch %d, %d rows into the epoch', saved['path'],
                    state.global_step, position.get('epoch', 0), position.get('rows_consumed', 0))
        return state

    def _load_engine_state(self, folder: str) -> None:
        """accelerate's load_state: model (saved unwrapped, so DDP states load on any number of
        processes), optimizer, grad scaler, RNG, the schedule and the data position."""
        self.accelerator.load_state(folder)

    def _apply_changed_hyperparameters(self, saved: dict) -> None:
        """The loaded optimizer and schedule carry the saved learning rate and weight decay; this
        run's values win (the schedule's shape comes from this run's config already). Every
        changed field is logged: none is silently ignored."""
        t = self.train_cfg
        for group in self.optimizer.param_groups:
            group['initial_lr'] = t.learn_rate
            group['weight_decay'] = t.weight_decay
        # through the schedule's own state dict (its public contract): the base and the current rate
        schedule = self.scheduler.state_dict()
        step = schedule['last_epoch']
        lrs = [t.learn_rate * f(step) for f in self.scheduler.lr_lambdas]
        schedule.update(base_lrs=[t.learn_rate] * len(lrs), _last_lr=lrs)
        self.scheduler.load_state_dict(schedule)
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group['lr'] = lr
        changed = [f'{k} {saved[part][k]!r} -> {v!r}'
                   for part, now in (('train', t), ('model', self.cfg.model))
                   for k, v in dataclasses.asdict(now).items() if k in saved.get(part, {}) and saved[part][k] != v]
        if changed:
            logger.warning('changed since the save, applied from step %d on: %s', step, '; '.join(changed))
