"""What a run's state holds, and saving and loading it on every rank (model/state_files.py
holds the files' mechanics: atomic folders, manifests, markers, weights files)."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from dataclasses import dataclass

from model import state_files
from model.tokenizer import save_tokenizer_copy

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


class Checkpointer:
    """Saves and loads the parts of a run: model, optimizer, schedule, grad scaler, RNG of every
    rank, data position, run state, config, fingerprints, tokenizer; and exports weights."""

    def __init__(self, cfg, accelerator, collectives, model, optimizer, scheduler, train_loader, tokenizer,
                 fingerprint: dict):
        self.cfg, self.train_cfg = cfg, cfg.train
        self.accelerator, self.collectives = accelerator, collectives
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.train_loader, self.tokenizer, self.fingerprint = train_loader, tokenizer, fingerprint
        self.last_saved_step = -1

    # --- saving ---

    def save_all_ranks(self, state: TrainState, data_state: dict | None = None) -> str:
        """The full state, then the step's weights file and keep-N pruning."""
        t, step = self.train_cfg, state.global_step
        model = self.accelerator.unwrap_model(self.model)
        tensors = {'model': model.state_dict(), 'optimizer': self.optimizer.state_dict(),
                   'scheduler': self.scheduler.state_dict()}
        if self.accelerator.scaler is not None:
            tensors['scaler'] = self.accelerator.scaler.state_dict()
        jsons = {'train_state': dataclasses.asdict(state),
                 'data_state': data_state or self.train_loader.state_dict(),
                 'config': self.cfg.to_dict(), 'fingerprint': self.fingerprint,
                 'run': {'world_size': self.collectives.world, 'saved_at': time.strftime('%Y-%m-%d %H:%M:%S')}}
        path = state_files.save_state(
            t.train_state_dir, step, is_main=self.collectives.is_main, rank=self.accelerator.process_index,
            all_ok=self.collectives.ok_all_ranks, tensors=tensors, jsons=jsons,
            save_tokenizer=lambda folder: save_tokenizer_copy(self.tokenizer, folder))
        self.last_saved_step = step

        def step_file():
            self._save_weights(step, step)
            state_files.prune_model_files(t.model_file, t.keep_latest_n_ckp)

        self.collectives.on_main_all_ranks(step_file)
        logger.info('saved state at step %d -> %s', step, path)
        return path

    def save_best_all_ranks(self, step: int) -> None:
        """model_file.format('best') and the Hugging Face folder output_dir/best."""
        self.collectives.on_main_all_ranks(lambda: (self._save_weights('best', step),
                                                    self._save_folder('best', step)))

    def save_final_all_ranks(self, step: int) -> None:
        self.collectives.on_main_all_ranks(lambda: self._save_folder('final', step))

    def _save_weights(self, tag, step: int) -> None:
        state_files.save_weights_file(self.accelerator.unwrap_model(self.model),
                                      self.train_cfg.model_file.format(tag), step=step, tag=tag)

    def _save_folder(self, name: str, step: int) -> None:
        state_files.save_model_folder(self.accelerator.unwrap_model(self.model), self.tokenizer,
                                      os.path.join(self.train_cfg.output_dir, name), tag=name, step=step,
                                      max_seq_len=self.train_cfg.max_seq_len)

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
        saved = state_files.load_state(t.train_state_dir, self.accelerator.process_index)
        for note in state_files.compare_fingerprints(saved['fingerprint'], self.fingerprint,
                                                     t.allow_data_change, saved['path']):
            logger.warning(note)
        self.accelerator.unwrap_model(self.model).load_state_dict(saved['model'])
        self.optimizer.load_state_dict(saved['optimizer'])
        self.scheduler.load_state_dict(saved['scheduler'])
        self._apply_changed_hyperparameters(saved['config'])
        if 'scaler' in saved and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(saved['scaler'])
        state = TrainState(**saved['train_state'])
        self.last_saved_step = state.global_step
        self.train_loader.load_state_dict(saved['data_state'])
        state_files.set_rng_state(saved['rng'])
        if saved['run'].get('world_size') != self.collectives.world:
            logger.warning('resuming on %d process(es), saved on %s: the data position is kept exactly '
                           '(no row repeated or skipped), dropout RNG streams restart from rank 0\'s',
                           self.collectives.world, saved['run'].get('world_size'))
        logger.info('resumed from %s: step %d, epoch %d, %d rows into the epoch', saved['path'],
                    state.global_step, saved['data_state'].get('epoch', 0),
                    saved['data_state'].get('rows_consumed', 0))
        return state

    def _apply_changed_hyperparameters(self, saved: dict) -> None:
        """The loaded optimizer and schedule carry the saved learning rate and weight decay; this
        run's values win (the schedule's shape comes from this run's config already). Every
        changed field is logged: none is silently ignored."""
        t = self.train_cfg
        for group in self.optimizer.param_groups:
            group['initial_lr'] = t.learn_rate
            group['weight_decay'] = t.weight_decay
        self.scheduler.base_lrs = [t.learn_rate] * len(self.optimizer.param_groups)
        step = self.scheduler.last_epoch
        for group, base, f in zip(self.optimizer.param_groups, self.scheduler.base_lrs, self.scheduler.lr_lambdas):
            group['lr'] = base * f(step)
        self.scheduler._last_lr = [g['lr'] for g in self.optimizer.param_groups]
        changed = [f'{k} {saved[part][k]!r} -> {v!r}'
                   for part, now in (('train', t), ('model', self.cfg.model))
                   for k, v in dataclasses.asdict(now).items() if k in saved.get(part, {}) and saved[part][k] != v]
        if changed:
            logger.warning('changed since the save, applied from step %d on: %s', step, '; '.join(changed))
