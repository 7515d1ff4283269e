"""The training loop: accelerate (DDP, mixed precision, accumulation), exact resume, safe stops.

Numerics: the loss of one optimizer step is the sum of token losses over the whole global
batch (all ranks, all micro-steps) divided by its label-token count. Each micro-step
backpropagates ``sum * world * accumulation / tokens``: accelerate divides by the
accumulation steps and DDP averages over ranks, so the gradient is exactly d(sum)/d(w) /
tokens, whatever the split. The token count is known before the first backward because a
step's micro-batches are drawn first, and it is summed over ranks on a CPU (gloo) group: no
host-device sync in the hot path. Non-finite losses are recorded on the device and read only
when logging, evaluating or saving, so nothing with NaN weights is saved.

Collectives: methods named ``*_all_ranks`` are reached by every rank at the same step; the
conditions before them (``should_*``) depend on the global step only, never on a rank.

Stops (SIGTERM / SIGINT, model/stopping.py): a run is polled, from its start to its end. A
signal is recorded; the ranks vote on it at every step (with the step's token count), before
every validation batch, and at start-up and before the final save; generation asks it after
every token. A stop finishes the step in progress (or the save), drops a cut evaluation --
remembered in the state as pending, so the resumed run performs it first and logs the same
evaluations as an uninterrupted one -- saves the state of the last completed step if it is not
saved yet, and raises Stopped, which the face turns into one line and exit 130/143.
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import logging
import os
import time
from dataclasses import dataclass, field

import torch

from config import ResolvedConfig
from model import stopping
from model.errors import NotOurs
from model.data.tokenizer import LABEL_PAD_ID
from model.faults import fault_point
from model.net.chat_model import token_loss_sum
from model.stopping import STOP, Stopped, shared_signal
from model.train import preflight
from model.train.factory import Run, build_run

logger = logging.getLogger('chat_trainer')

EXIT_OK, EXIT_DIVERGED = 0, 1


class Diverged(Exception):
    pass


@dataclass
class LogInterval:
    """What the steps since the last log line add up to, on this rank."""

    loss_sum: torch.Tensor  # on the device: read only when logging
    label_tokens: int = 0
    input_tokens: int = 0
    positions: int = 0  # input and label positions computed, padding included
    rows: int = 0
    skipped: int = 0
    steps: int = 0
    grad_norm: torch.Tensor = field(default_factory=lambda: torch.zeros(()))
    lr: float = 0.0  # the learning rate the interval's last optimizer step used
    aux_lr: float | None = None  # and the --aux_learn_rate group's (None: one group)
    start: float = field(default_factory=time.time)


@dataclass(frozen=True)
class LoopSettings:
    """The loop's view of the config, built once (:meth:`of`)."""

    accumulation: int  # micro-batches per optimizer step
    epochs: int
    max_grad_norm: float  # 0: no clipping
    logging_steps: int
    eval_steps: int  # 0: only at each epoch's end
    save_steps: int
    stop_grace_s: int
    learn_rate: float
    aux_learn_rate: float
    train_state_dir: str
    output_dir: str
    model_file: str  # its 'best' export is read back at the end (say_best_exports)

    @classmethod
    def of(cls, t) -> 'LoopSettings':
        return cls(accumulation=t.gradient_accumulation_steps, epochs=t.epochs, max_grad_norm=t.max_grad_norm,
                   logging_steps=t.logging_steps, eval_steps=t.eval_steps, save_steps=t.save_steps,
                   stop_grace_s=t.stop_grace_s, learn_rate=t.learn_rate, aux_learn_rate=t.aux_learn_rate,
                   train_state_dir=t.train_state_dir, output_dir=t.output_dir, model_file=t.model_file)


def stop_outlasts_grace(grace: int, save_seconds: float, step_seconds: float) -> str | None:
    """A stop finishes the step in progress, then saves: the warning when that takes longer than
    the cluster waits between SIGTERM and SIGKILL, else None."""
    if save_seconds + step_seconds <= grace:
        return None
    return (f'a save took {save_seconds:.0f} s and a step {step_seconds:.1f} s: a stop (the step, then a save) needs '
            f'more than stop_grace_s={grace} s, the time your cluster leaves between SIGTERM and SIGKILL, so it '
            f'could be killed before its save is complete. Have the signal sent earlier (SLURM: #SBATCH '
            f'--signal=B:TERM@<seconds>, or the cluster\'s GraceTime / KillWait) and pass that as --stop_grace_s, '
            f'or save more often (--save_steps) so that a killed stop loses less')


class Trainer:
    """The loop: setup (a :class:`Run` from model/train/factory.py), ``train()``, one step,
    and ``maybe_*`` hooks whose conditions depend on the global step only."""

    def __init__(self, run: Run):
        self.run, self.settings = run, LoopSettings.of(run.cfg.train)
        self.accelerator, self.collectives = run.accelerator, run.collectives
        self.world, self.rank = self.collectives.world, self.accelerator.process_index
        self.lock, self.log_file = run.lock, run.log_file
        self.model, self.optimizer, self.scheduler = run.model, run.optimizer, run.scheduler
        self.train_loader, self.decoder_inputs, self.total_steps = run.train_loader, run.decoder_inputs, run.total_steps
        self.state, self.data_position = run.state, run.data_position
        self.checkpointer, self.evaluator = run.checkpointer, run.evaluator
        self._saved_pending = self.state.eval_pending  # as in the newest saved state
        self._seconds_per_step = 0.0
        self._grace_warned = False
        self.nonfinite_step = torch.tensor(-1, device=self.accelerator.device)
        self.interval = self._new_interval()
        self._rows_unfolded = self._tokens_unfolded = 0  # this rank's, not yet in the run state

    # --- the loop ---

    def train(self) -> int:
        from tqdm import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        t, state = self.settings, self.state
        stopping.STOP.polled_now(stopping.IN_TRAINING)
        logger.info('training: %d rows%s, %d optimizer steps (%d per epoch), epoch %d, step %d',
                    self.train_loader.num_rows, '' if self.train_loader.settings.objective == 'pairs' else
                    f' ({self.train_loader.num_positions} span-corruption examples an epoch)',
                    self.total_steps, self.train_loader.steps_per_epoch(),
                    self.train_loader.epoch, state.global_step)
        if state.global_step >= self.total_steps:  # a resume of a finished run, or of one past a shorter run's end
            logger.warning('nothing left to train: the state resumed is at step %d, %s', state.global_step,
                           'this run\'s last' if state.global_step == self.total_steps else
                           f'past this run\'s {self.total_steps} steps (--max_steps, --epochs): its weights are exported '
                           'as they are')
        bar = tqdm(total=self.total_steps, initial=state.global_step, disable=not self.collectives.is_main,
                   dynamic_ncols=True, mininterval=1.0, desc='train')
        self._run_start, self._run_start_step = time.time(), state.global_step
        # the console through the bar on main; elsewhere tqdm's handler would drop the WARNING level
        redirect = logging_redirect_tqdm() if self.collectives.is_main else contextlib.nullcontext()
        batches = None
        try:
            with redirect:
                if state.eval_pending:  # cut by the stop that ended the run this one resumes
                    self.evaluate_all_ranks()
                batches = iter(self.train_loader)
                while state.global_step < self.total_steps:
                    position = self.train_loader.state_dict()
                    micro = list(itertools.islice(batches, t.accumulation))
                    if not micro:  # epoch done: the loader moved to the next epoch
                        self.evaluate_all_ranks()
                        if self.train_loader.epoch >= t.epochs:
                            break
                        batches = iter(self.train_loader)
                        continue
                    label_tokens = [int((b['labels'] != LABEL_PAD_ID).sum()) for b in micro]
                    global_tokens, signals, stopped = self.collectives.sum_all_ranks(
                        [sum(label_tokens), STOP.signum, bool(STOP.signum)])
                    if stopped:  # a rank that got no signal itself stops as for SIGTERM, saying whose it was
                        STOP.follow(shared_signal(signals, stopped))
                        raise self.stop_all_ranks(position)
                    self.train_step(micro, label_tokens, global_tokens)
                    state.global_step += 1
                    bar.update(1)
                    self.maybe_log()
                    self.maybe_evaluate()
                    self.maybe_save()
                self.finish_all_ranks()
        except Diverged as e:
            logger.error('%s', e)
            return EXIT_DIVERGED
        finally:
            if batches is not None:
                batches.close()  # DataLoader workers end here, not when the interpreter exits
            bar.close()
        return EXIT_OK

    def train_step(self, micro: list[dict], label_tokens: list[int], global_tokens: float) -> None:
        scale = self.world * len(micro) / max(global_tokens, 1.0)
        model, dev, interval = self.model, self.accelerator.device, self.interval
        for batch, n_labels in zip(micro, label_tokens):
            fault_point('train-step', self.state.global_step + 1)
            with self.accelerator.accumulate(model):
                loss_sum = token_loss_sum(model, batch, dev, self.decoder_inputs)
                self.accelerator.backward(loss_sum * scale)
                if self.accelerator.sync_gradients:
                    grad_norm = self.accelerator.clip_grad_norm_(model.parameters(),
                                                                 self.settings.max_grad_norm or float('inf'))
                    self.optimizer.step()
                    rates = self.scheduler.get_last_lr()  # this step's rates, before the next ones are set
                    interval.lr, interval.aux_lr = rates[0], (rates[1] if len(rates) > 1 else None)
                    self.scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
            interval.loss_sum += loss_sum.detach()
            interval.label_tokens += n_labels
            interval.input_tokens += int(batch['attention_mask'].sum())
            interval.positions += batch['input_ids'].numel() + batch['labels'].numel()
            interval.rows += batch['num_rows']
            interval.skipped += batch['num_skipped']
            self._rows_unfolded += batch['num_rows']
            self._tokens_unfolded += n_labels
        interval.steps += 1
        finite = torch.isfinite(loss_sum.detach())
        if self.accelerator.scaler is None:  # with fp16's scaler an inf norm only skips the step
            finite &= torch.isfinite(torch.as_tensor(grad_norm, device=dev))
        self.nonfinite_step = torch.where((self.nonfinite_step < 0) & ~finite,
                                          torch.tensor(self.state.global_step + 1, device=dev), self.nonfinite_step)
        interval.grad_norm = grad_norm

    def _new_interval(self) -> LogInterval:
        return LogInterval(loss_sum=torch.zeros((), device=self.accelerator.device, dtype=torch.float64))

    # --- maybe_*: each condition lives here, once, and depends on the global step only ---

    def should_log(self) -> bool:
        return self.state.global_step % self.settings.logging_steps == 0 or self.state.global_step == self.total_steps

    def should_evaluate(self) -> bool:
        return bool(self.settings.eval_steps) and self.state.global_step % self.settings.eval_steps == 0

    def should_save(self) -> bool:
        return self.state.global_step % self.settings.save_steps == 0

    def maybe_log(self) -> None:
        if self.should_log():
            self.log_all_ranks()

    def maybe_evaluate(self) -> None:
        if self.should_evaluate():
            self.evaluate_all_ranks()

    def maybe_save(self) -> None:
        if self.should_save():
            self.save_all_ranks()

    # --- collectives: every rank calls these at the same step ---

    def check_finite_all_ranks(self) -> None:
        """Every rank stops if any rank saw a non-finite loss or gradient."""
        own = int(self.nonfinite_step)
        count, step_sum = self.collectives.sum_all_ranks([float(own >= 0), float(max(own, 0))])
        if count:
            bad = own if own >= 0 else int(step_sum / count)
            last = self.checkpointer.last_saved_path
            raise Diverged(f'loss became NaN/inf at optimizer step {bad}; training stopped and nothing '
                           f'after the last good state was saved ({last or "no state saved yet"}). '
                           f'Try a lower --learn_rate (now {self.settings.learn_rate})'
                           + (f', a lower --aux_learn_rate (now {self.settings.aux_learn_rate})'
                              if self.settings.aux_learn_rate else '') + ' or --max_grad_norm')

    def fold_counts_all_ranks(self) -> None:
        """Add the rows and label tokens trained on since the last fold to the run state."""
        rows, tokens = self.collectives.sum_all_ranks([self._rows_unfolded, self._tokens_unfolded])
        self.state.samples_seen += int(rows)
        self.state.tokens_seen += int(tokens)
        self._rows_unfolded = self._tokens_unfolded = 0

    def log_all_ranks(self) -> None:
        self.check_finite_all_ranks()
        interval, state = self.interval, self.state
        loss_sum, label_tokens, input_tokens, positions, rows, skipped = self.collectives.sum_all_ranks(
            [float(interval.loss_sum), interval.label_tokens, interval.input_tokens, interval.positions, interval.rows,
             interval.skipped])
        elapsed = max(time.time() - interval.start, 1e-9)
        self._seconds_per_step = elapsed / max(interval.steps, 1)
        self.fold_counts_all_ranks()
        done = state.global_step - self._run_start_step
        eta = (time.time() - self._run_start) / max(done, 1) * (self.total_steps - state.global_step)
        figures = {'train/loss': loss_sum / max(label_tokens, 1), 'train/lr': interval.lr,
                   'train/grad_norm': float(interval.grad_norm), 'train/samples_per_s': rows / elapsed,
                   'train/tokens_per_s': (label_tokens + input_tokens) / elapsed,
                   'train/filled': (label_tokens + input_tokens) / max(positions, 1)}  # the rest is padding
        aux = f' | aux_lr {interval.aux_lr:.3e}' if interval.aux_lr is not None else ''
        logger.info('step %d/%d | epoch %d | loss %.4f | lr %.3e%s | grad_norm %.3f | %.1f samples/s | '
                    '%.0f tokens/s | %.0f%% filled | eta %s%s', state.global_step, self.total_steps,
                    self.train_loader.epoch, figures['train/loss'], figures['train/lr'], aux,
                    *list(figures.values())[2:-1], 100 * figures['train/filled'],
                    datetime.timedelta(seconds=int(eta)), f' | skipped {int(skipped)} empty rows' if skipped else '')
        if interval.aux_lr is not None:
            figures['train/aux_lr'] = interval.aux_lr
        self.accelerator.log(figures, step=state.global_step)
        self.interval = self._new_interval()

    def evaluate_all_ranks(self) -> None:
        state = self.state
        if state.last_eval_step == state.global_step:
            return
        self.check_finite_all_ranks()
        result = self.evaluator.evaluate_all_ranks(self.model, state.global_step)
        if result is None:  # cut by a stop: nothing of it is logged or exported
            state.eval_pending = True
            logger.warning('the evaluation at step %d was cut by the stop: dropped; a resumed run performs it first',
                           state.global_step)
            return
        state.eval_pending = False
        logger.info(result.describe(state.global_step))
        figures = {'eval/loss': result.loss, 'eval/perplexity': result.perplexity}
        if result.bleu is not None:
            figures['eval/bleu4'] = result.bleu
        self.accelerator.log(figures, step=state.global_step)
        state.last_eval_step = state.global_step
        if result.loss < state.best_val_loss:
            state.best_val_loss, state.best_step = result.loss, state.global_step
            try:
                with stopping.critical():
                    self.checkpointer.save_best_all_ranks(state.global_step)
            except NotOurs as e:  # a user's file put in best/ meanwhile: never replaced, and no reason to end the run
                if self.collectives.is_main:
                    logger.warning('%s; the best model so far (step %d) is not exported there, training goes on: '
                                   'the next better evaluation exports it once that is cleared, and final/ holds the '
                                   'last model', e, state.global_step)

    def say_best_exports(self, final: str | None) -> None:
        """Where the best step's model is not (a file not the toolkit's blocked an export, in this
        process or the one before a resume): each export read back, by the step its marker records;
        ``final``: where the last model is (None: only in the state)."""
        from model.state.model_files import model_record

        best = self.state.best_step
        for path in (self.settings.model_file.format('best'), os.path.join(self.settings.output_dir, 'best')):
            step = (model_record(path) or {}).get('step')
            if best > 0 and step != best:
                logger.warning('%s does not hold the best model (step %d)%s: a file that is not this toolkit\'s '
                               'blocked its export; %s holds the last model', path, best,
                               f', but step {step}\'s' if isinstance(step, int) else '',
                               final or f'the state {self.checkpointer.last_saved_path}')

    def needs_save(self) -> bool:
        """The run state differs from the newest saved one (a step, or a pending evaluation done)."""
        return self.state.global_step > 0 and (self.checkpointer.last_saved_step != self.state.global_step or
                                               self._saved_pending != self.state.eval_pending)

    def save_all_ranks(self, data_state: dict | None = None) -> str:
        self.check_finite_all_ranks()
        self.fold_counts_all_ranks()
        start = time.perf_counter()
        with stopping.critical(), self.data_position.as_of(data_state):
            path = self.checkpointer.save_all_ranks(self.state.global_step)
        self._saved_pending = self.state.eval_pending
        warning = None if self._grace_warned else stop_outlasts_grace(
            self.settings.stop_grace_s, time.perf_counter() - start, self._seconds_per_step)
        if warning:  # once
            self._grace_warned = True
            logger.warning('%s', warning)
        return path

    def poll_stop_all_ranks(self) -> None:
        signum = self.collectives.stop_signal_all_ranks(STOP.signum)
        if signum:
            STOP.follow(signum)
            raise self.stop_all_ranks(None)

    def stop_all_ranks(self, position: dict | None) -> Stopped:
        """Save the last completed step (at the data position from before the step not taken),
        unless it is saved already; the Stopped to raise."""
        name, step = STOP.said(), self.state.global_step
        if self.needs_save():
            logger.warning('%s: saving state at step %d', name, step)
            path = self.save_all_ranks(data_state=position)
            kept = f'the state at step {step} saved in {path}'
        elif step:
            kept = f'the state at step {step} is saved in {self.checkpointer.last_saved_path}'
        else:
            kept = 'no step was taken, nothing to save'
        pending = '; its evaluation was cut and is pending' if self.state.eval_pending else ''
        seconds = STOP.seconds_since_signal()
        logger.warning('rank %d: stopped by %s at step %d: %s%s; %.1f s after the signal; exit code %d',
                       self.rank, name, step, kept, pending, seconds, 128 + STOP.signum)
        # nothing of this run to continue: how the earlier run it moved aside continues, if it moved one
        resume = '; continue with --is_keep_training=True' if step else \
            f'; {self.checkpointer.moved_run}' if self.checkpointer.moved_run else ''
        return STOP.stopped(f'{kept}{pending}{resume} ({seconds:.1f} s after the signal)')

    def finish_all_ranks(self) -> None:
        self.evaluate_all_ranks()
        self.poll_stop_all_ranks()  # a stop during the last evaluation: saved with it pending, no final export
        if self.needs_save():
            self.save_all_ranks()
        with stopping.critical():  # a user's file in final/ (never replaced): the last model goes to its step file
            final = self.checkpointer.export_final_all_ranks(self.state.global_step)
            stopping.STOP.finish()  # written: a stop from here on (a job's end, a scancel) exits 0, not 143
        logger.info('done: %d optimizer steps, best validation loss %.4f at step %d; final model in %s',
                    self.state.global_step, self.state.best_val_loss, self.state.best_step,
                    final or f'the state {self.checkpointer.last_saved_path}')
        if self.collectives.is_main:
            self.say_best_exports(final)
        fault_point('done')


def run_training(cfg: ResolvedConfig, resume: bool = False) -> int:
    """Entry point of `train_low_mem.py train`: returns the process exit code, or raises
    Stopped after a stop saved what it could.

    Every check that can be made at start-up runs first (the same as --dry_run=True), before
    anything is moved, created or trained (with several processes, the saved states by size on
    every rank, then deeply by the main process alone: model/train/factory.py). From then on
    signals are polled (model/stopping.py).
    """
    world = int(os.environ.get('WORLD_SIZE', '1'))
    # span corruption's examples are counted by the run's loaders, split across the ranks (not here)
    # one process also asks the locks (a place in use explains the rest, e.g. no state saved yet); with several,
    # a rank's probe could meet the main process taking the lock: build_run's acquire says it for them
    report = preflight.check_train(cfg, resume, world, locks=world == 1, deep=world == 1, count_examples=False)
    report.raise_first()
    with stopping.polling('the run is starting: stopping at its next safe point, before any step is trained'):
        trainer = Trainer(build_run(cfg, resume, report.notes, report.fingerprint, report.resume))
        try:
            code = trainer.train()
        finally:
            if trainer.lock is not None:
                trainer.lock.release()
    if STOP.signum:
        logger.warning('%s came after the last step was saved: the run is complete', STOP.said())
    trainer.accelerator.end_training()
    return code
