"""The training loop: accelerate (DDP, mixed precision, accumulation), exact resume, safe stops.

Numerics: the loss of one optimizer step is the sum of token losses over the
whole global batch (all ranks, all micro-steps) divided by its label-token
count. Each micro-step backpropagates ``sum * world * accumulation / tokens``:
accelerate divides by the accumulation steps and DDP averages over ranks, so
the gradient is exactly d(sum)/d(w) / tokens, whatever the split. The token
count is known before the first backward because a step's micro-batches are
drawn first, and it is summed over ranks on a CPU (gloo) group: no host-device
sync in the hot path. Non-finite losses are recorded on the device and read
only when logging, evaluating or saving, so nothing with NaN weights is saved.
"""

from __future__ import annotations

import dataclasses
import datetime
import itertools
import logging
import math
import os
import signal
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from config import ResolvedConfig, UserError
from model import checkpoint as ckpt
from model import ownership, preflight
from model.chat_model import answer, build_model
from model.files import iter_usable_rows, resolve_parquet_files
from model.sizing import model_shape, total_optimizer_steps
from model.tokenizer import LABEL_PAD_ID, PAD_ID, load_tokenizer, save_tokenizer_copy, tokenizer_fingerprint

logger = logging.getLogger('chat_trainer')

EXIT_OK, EXIT_DIVERGED = 0, 1


@dataclass
class TrainState:
    """Run state (never written onto the config); saved with every checkpoint."""

    global_step: int = 0  # optimizer steps done
    best_val_loss: float = math.inf
    best_step: int = -1
    samples_seen: int = 0  # real rows trained on, all ranks
    tokens_seen: int = 0  # label tokens trained on, all ranks
    last_eval_step: int = -1


class Diverged(Exception):
    pass


# --- precision --------------------------------------------------------------

def cpu_supports_bf16() -> bool:
    probe = getattr(torch.cpu, '_is_avx512_bf16_supported', None)
    amx = getattr(torch.cpu, '_is_amx_tile_supported', None)
    return bool((probe and probe()) or (amx and amx()))


def resolve_precision(requested: str, use_cpu: bool) -> tuple[str, str | None]:
    """(precision to use, warning or None). Never a precision the device emulates slowly."""
    on_cuda = torch.cuda.is_available() and not use_cpu
    if requested == 'bf16':
        if on_cuda and torch.cuda.is_bf16_supported():
            return 'bf16', None
        if not on_cuda and cpu_supports_bf16():
            return 'bf16', None
        where = 'this GPU' if on_cuda else 'this CPU (no AVX512-BF16/AMX)'
        return 'no', (f'mixed_precision=bf16 is not supported natively on {where}; training in fp32 '
                      f'instead (bf16 autocast ran ~20x slower than fp32 on such a CPU: bench/bench_precision.py)')
    if requested == 'fp16' and not on_cuda:
        return 'no', 'mixed_precision=fp16 needs a CUDA GPU; training in fp32 on the CPU'
    return requested, None


# --- logging ----------------------------------------------------------------

class _TqdmHandler(logging.StreamHandler):
    def emit(self, record):
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging must never kill training
            self.handleError(record)


def new_log_file(log_dir: str) -> str:
    """A log file of this run's own: never one another run writes to (the name is taken with
    O_EXCL, a second run in the same second gets a suffix)."""
    os.makedirs(log_dir, exist_ok=True)
    stamp = datetime.datetime.now().strftime('%Y%m%d-%H%M%S')
    for suffix in itertools.count():
        name = os.path.join(log_dir, f'chat_trainer_low_mem_{stamp}{f"-{suffix}" if suffix else ""}.log')
        try:
            os.close(os.open(name, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            return name
        except FileExistsError:
            continue
    raise AssertionError('unreachable')


def setup_logging(log_dir: str, accelerator) -> str:
    """One log file per run; every rank appends to it (non-main ranks: warnings and errors)."""
    from accelerate.utils import broadcast_object_list

    name = [None]
    if accelerator.is_main_process:
        name[0] = new_log_file(log_dir)
    if accelerator.num_processes > 1:
        broadcast_object_list(name)
    rank = accelerator.process_index
    fmt = logging.Formatter(f'%(asctime)s [rank {rank}] %(levelname)s %(message)s', '%Y-%m-%d %H:%M:%S')
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(logging.INFO)
    fh = logging.FileHandler(name[0], mode='a', encoding='utf-8')
    fh.setFormatter(fmt)
    console = _TqdmHandler()
    console.setFormatter(fmt)
    if not accelerator.is_main_process:
        fh.setLevel(logging.WARNING)
        console.setLevel(logging.WARNING)
    root.addHandler(fh)
    root.addHandler(console)
    for noisy in ('httpx', 'urllib3', 'filelock'):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    import transformers

    transformers.utils.logging.disable_progress_bar()  # 'Writing model shards' bars amid the log
    return name[0]


# --- signals ----------------------------------------------------------------

class StopSignals:
    """First SIGINT/SIGTERM: ask for a stop at the next step boundary. A second SIGINT more
    than REPEAT_S later (a person pressing Ctrl-C again): abort now. Copies that arrive
    together -- a terminal signals the whole process group and a launcher forwards the same
    signal to its ranks -- count as one."""

    REPEAT_S = 2.0

    def __init__(self):
        self.signum = 0
        self._first = 0.0
        self._old = {}

    def __enter__(self):
        for s in (signal.SIGINT, signal.SIGTERM):
            self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum:
            if signum == signal.SIGINT and time.monotonic() - self._first > self.REPEAT_S:
                os.write(2, b'second SIGINT: aborting without saving (the last complete state is kept)\n')
                os._exit(130)
            return
        self.signum, self._first = signum, time.monotonic()
        os.write(2, f'{signal.Signals(signum).name}: stopping at the next step boundary and saving '
                    f'(Ctrl-C again aborts at once)\n'.encode())

    def __exit__(self, *exc):
        for s, h in self._old.items():
            # after a stop the process is on its way out with 128+signal: a launcher's
            # repeated SIGTERM (torchrun sends one when the first rank exits) must not
            # turn that exit code into a death by signal
            signal.signal(s, signal.SIG_IGN if self.signum and s == signal.SIGTERM else h)
        return False


# --- helpers ----------------------------------------------------------------

def build_optimizer(train_cfg, model):
    if train_cfg.optimizer == 'adafactor':
        from transformers.optimization import Adafactor

        return Adafactor(model.parameters(), lr=train_cfg.learn_rate, relative_step=False,
                         scale_parameter=False, warmup_init=False, weight_decay=train_cfg.weight_decay)
    return torch.optim.AdamW(model.parameters(), lr=train_cfg.learn_rate,
                             weight_decay=train_cfg.weight_decay)


def lr_lambda(warmup: int, total: int, kind: str):
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if kind == 'constant' or total <= warmup:
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1 + math.cos(math.pi * progress)) if kind == 'cosine' else 1.0 - progress
    return f


def shift_right(labels: torch.Tensor) -> torch.Tensor:
    """Decoder inputs: start token (pad, 0) then the labels, padding as pad."""
    dec = labels.new_full(labels.shape, PAD_ID)
    dec[:, 1:] = labels[:, :-1]
    return dec.masked_fill_(dec == LABEL_PAD_ID, PAD_ID)


# --- the trainer ------------------------------------------------------------

class Trainer:
    def __init__(self, cfg: ResolvedConfig, resume: bool = False, notes: list[str] = ()):
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        self.cfg, self.t = cfg, cfg.train
        use_cpu = os.environ.get('ACCELERATE_USE_CPU', '').lower() in ('1', 'true', 'yes')
        precision, warning = resolve_precision(self.t.mixed_precision, use_cpu)
        self.acc = Accelerator(mixed_precision=precision, cpu=use_cpu,
                               gradient_accumulation_steps=self.t.gradient_accumulation_steps)
        self.world, self.rank = self.acc.num_processes, self.acc.process_index
        self.cpu_group = None
        if self.world > 1:
            import torch.distributed as dist

            self.cpu_group = dist.new_group(backend='gloo')  # flags and counts without device syncs
        self.lock = self.lock_outputs_all_ranks()
        self.log_file = setup_logging(self.t.log_dir, self.acc)
        if warning:
            logger.warning(warning)
        logger.info('run: %d process(es), device %s, precision %s, log %s', self.world,
                    self.acc.device, precision, self.log_file)
        for note in notes:
            logger.warning('%s', note)
        if not resume:
            self._archive_previous_run()
        self.on_main_all_ranks(lambda: ckpt.ensure_state_dir(self.t.train_state_dir))
        set_seed(self.t.seed)
        self.tokenizer = load_tokenizer(self.t.tokenizer_dir)
        self.train_files = resolve_parquet_files(self.t.train_file)
        self.valid_files = resolve_parquet_files(self.t.validation_file)
        self.train_loader = self._build_loader(self.train_files, train=True)
        self.valid_loader = self._build_loader(self.valid_files, train=False)
        self.total_steps = total_optimizer_steps(
            self.train_loader.num_rows, self.t.batch_size_per_gpu, self.world,
            self.t.gradient_accumulation_steps, self.t.epochs, self.t.max_steps)

        model = build_model(cfg.model, len(self.tokenizer))
        optimizer = build_optimizer(self.t, model)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda(self.t.warmup_steps, self.total_steps, self.t.lr_schedule))
        # the scheduler is not prepared: accelerate would step it once per process
        self.model, self.optimizer = self.acc.prepare(model, optimizer)
        self.state = TrainState()
        self._last_save_step = -1
        self._uncounted = [0, 0]  # rows, label tokens on this rank not yet in the state
        self._sample_rows = None  # validation rows answered for BLEU, read at the first eval
        self.fingerprint = {'model_shape': model_shape(cfg.model, len(self.tokenizer)),
                            'data': ckpt.data_fingerprint(self.train_files),
                            'tokenizer': tokenizer_fingerprint(self.t.tokenizer_dir)}
        if resume:
            self._load()
        self.nonfinite_step = torch.tensor(-1, device=self.acc.device)
        self._interval = self._new_interval()
        if self.t.warmup_steps >= self.total_steps:
            logger.warning('warmup_steps=%d >= the run\'s %d optimizer steps: the learning rate never '
                           'reaches learn_rate', self.t.warmup_steps, self.total_steps)

    def lock_outputs_all_ranks(self) -> ownership.PlaceLock | None:
        """Collective: one run per output place. Main takes the locks; every rank stops if it failed."""
        places = [self.t.train_state_dir, self.t.output_dir]
        return self.on_main_all_ranks(lambda: ownership.PlaceLock(places, 'training run').acquire())

    def on_main_all_ranks(self, fn):
        """Collective: fn() on the main process; if it raises, every rank raises (the others
        quietly), so no rank is left waiting at the next collective."""
        result, error = None, None
        if self.acc.is_main_process:
            try:
                result = fn()
            except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
                error = e
        if not self.all_ok(error is None):
            raise error if error is not None else UserError('')
        return result

    def all_ok(self, ok: bool) -> bool:
        """Collective: True when every rank says ok."""
        return self.all_sum([0.0 if ok else 1.0])[0] == 0

    def _archive_previous_run(self) -> None:
        stamp = os.path.basename(self.log_file).removeprefix('chat_trainer_low_mem_').removesuffix('.log')
        archive = self.on_main_all_ranks(lambda: ckpt.archive_previous_run(
            self.t.train_state_dir, self.t.model_file, self.t.output_dir, stamp))
        if archive:
            logger.warning('a previous run left a state or models here; moved them to %s (nothing is '
                           'deleted). To continue that run instead, pass --is_keep_training=True', archive)

    def _build_loader(self, files, train: bool):
        from model.dataset import StreamingLoader

        t = self.t
        return StreamingLoader(
            files, self.tokenizer, max_seq_len=t.max_seq_len, batch_size=t.batch_size_per_gpu,
            rank=self.rank, world_size=self.world,
            accumulation=t.gradient_accumulation_steps if train else 1, shuffle=train, seed=t.seed,
            shuffle_window_rows=t.shuffle_window_rows, group_by_length=t.group_by_length and train,
            length_group_batches=t.length_group_batches, drop_last=train,
            num_workers=t.num_workers if train else 0)

    # --- collectives on the CPU group ---
    def all_sum(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return values
        import torch.distributed as dist

        buf = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(buf, group=self.cpu_group)
        return buf.tolist()

    def barrier(self):
        self.acc.wait_for_everyone()

    # --- the loop ---
    def train(self) -> int:
        t, state = self.t, self.state
        logger.info('training: %d rows, %d optimizer steps (%d per epoch), epoch %d, step %d',
                    self.train_loader.num_rows, self.total_steps, self.train_loader.steps_per_epoch(),
                    self.train_loader.epoch, state.global_step)
        from tqdm import tqdm

        bar = tqdm(total=self.total_steps, initial=state.global_step, disable=not self.acc.is_main_process,
                   dynamic_ncols=True, mininterval=1.0, desc='train')
        self._run_start, self._run_start_step = time.time(), state.global_step
        try:
            with StopSignals() as stop:
                batches = iter(self.train_loader)
                while state.global_step < self.total_steps:
                    position = self.train_loader.state_dict()
                    micro = list(itertools.islice(batches, t.gradient_accumulation_steps))
                    if not micro:  # epoch done: the loader moved to the next epoch
                        self.evaluate()
                        if self.train_loader.epoch >= t.epochs:
                            break
                        batches = iter(self.train_loader)
                        continue
                    label_tokens = [int((b['labels'] != LABEL_PAD_ID).sum()) for b in micro]
                    global_tokens, stop_requested = self.all_sum([sum(label_tokens), stop.signum])
                    if stop_requested:  # a rank that got no signal itself stops as for SIGTERM
                        return self._stop(stop.signum or signal.SIGTERM, position)
                    self.train_step(micro, label_tokens, global_tokens)
                    state.global_step += 1
                    bar.update(1)
                    self.maybe_log()
                    self.maybe_evaluate()
                    self.maybe_save()
                self.finish()
        except Diverged as e:
            logger.error('%s', e)
            return EXIT_DIVERGED
        finally:
            bar.close()
        return EXIT_OK

    def train_step(self, micro: list[dict], label_tokens: list[int], global_tokens: float) -> None:
        scale = self.world * len(micro) / max(global_tokens, 1.0)
        model, dev = self.model, self.acc.device
        for batch, n_labels in zip(micro, label_tokens):
            labels = batch['labels']
            inputs = {'input_ids': batch['input_ids'].to(dev, non_blocking=True),
                      'attention_mask': batch['attention_mask'].to(dev, non_blocking=True),
                      'decoder_input_ids': shift_right(labels).to(dev, non_blocking=True)}
            labels = labels.to(dev, non_blocking=True)
            with self.acc.accumulate(model):
                logits = model(**inputs).logits
                loss_sum = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(),
                                           ignore_index=LABEL_PAD_ID, reduction='sum')
                self.acc.backward(loss_sum * scale)
                if self.acc.sync_gradients:
                    max_norm = self.t.max_grad_norm or float('inf')
                    grad_norm = self.acc.clip_grad_norm_(model.parameters(), max_norm)
                    self.optimizer.step()
                    self.scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
            iv = self._interval
            iv['loss_sum'] += loss_sum.detach()
            iv['label_tokens'] += n_labels
            iv['input_tokens'] += int(batch['attention_mask'].sum())
            iv['rows'] += batch['num_rows']
            self._uncounted[0] += batch['num_rows']
            self._uncounted[1] += n_labels
            iv['skipped'] += batch['num_skipped']
        finite = torch.isfinite(loss_sum.detach())
        if self.acc.scaler is None:  # with fp16's scaler an inf norm only skips the step
            finite &= torch.isfinite(torch.as_tensor(grad_norm, device=dev))
        self.nonfinite_step = torch.where((self.nonfinite_step < 0) & ~finite,
                                          torch.tensor(self.state.global_step + 1, device=dev),
                                          self.nonfinite_step)
        iv['grad_norm'] = grad_norm

    def _new_interval(self) -> dict:
        return {'loss_sum': torch.zeros((), device=self.acc.device, dtype=torch.float64),
                'label_tokens': 0, 'input_tokens': 0, 'rows': 0, 'skipped': 0,
                'grad_norm': torch.zeros(()), 'start': time.time()}

    def check_finite(self) -> None:
        """Collective: every rank stops if any rank saw a non-finite loss or gradient."""
        own = int(self.nonfinite_step)
        count, step_sum = self.all_sum([float(own >= 0), float(max(own, 0))])
        if count:
            bad = own if own >= 0 else int(step_sum / count)
            last = ckpt.latest_state(self.t.train_state_dir)
            raise Diverged(f'loss became NaN/inf at optimizer step {bad}; training stopped and nothing '
                           f'after the last good state was saved ({last or "no state saved yet"}). '
                           f'Try a lower --learn_rate (now {self.t.learn_rate}) or --max_grad_norm')

    # --- maybe_* : each condition lives here, once ---
    def should_log(self) -> bool:
        return self.state.global_step % self.t.logging_steps == 0 or self.state.global_step == self.total_steps

    def maybe_log(self) -> None:
        if not self.should_log():
            return
        self.check_finite()
        iv, state = self._interval, self.state
        loss_sum = float(iv['loss_sum'])
        tot = self.all_sum([loss_sum, iv['label_tokens'], iv['input_tokens'], iv['rows'], iv['skipped']])
        loss = tot[0] / max(tot[1], 1)
        elapsed = max(time.time() - iv['start'], 1e-9)
        self._fold_counts()
        done = state.global_step - self._run_start_step
        eta = (time.time() - self._run_start) / max(done, 1) * (self.total_steps - state.global_step)
        logger.info('step %d/%d | epoch %d | loss %.4f | lr %.3e | grad_norm %.3f | %.1f samples/s | '
                    '%.0f tokens/s | eta %s%s', state.global_step, self.total_steps,
                    self.train_loader.epoch, loss, self.scheduler.get_last_lr()[0], float(iv['grad_norm']),
                    tot[3] / elapsed, (tot[1] + tot[2]) / elapsed,
                    datetime.timedelta(seconds=int(eta)),
                    f' | skipped {int(tot[4])} empty rows' if tot[4] else '')
        self._interval = self._new_interval()

    def _fold_counts(self) -> None:
        """Collective: add the rows and label tokens trained on since the last fold to the state."""
        rows, tokens = self.all_sum(self._uncounted)
        self.state.samples_seen += int(rows)
        self.state.tokens_seen += int(tokens)
        self._uncounted = [0, 0]

    def should_evaluate(self) -> bool:
        return bool(self.t.eval_steps) and self.state.global_step % self.t.eval_steps == 0

    def maybe_evaluate(self) -> None:
        if self.should_evaluate():
            self.evaluate()

    def should_save(self) -> bool:
        return self.state.global_step % self.t.save_steps == 0

    def maybe_save(self) -> None:
        if self.should_save():
            self.save()

    # --- evaluation ---
    @torch.no_grad()
    def validation_loss(self) -> float:
        model = self.acc.unwrap_model(self.model)
        model.eval()
        dev = self.acc.device
        loss_sum, tokens = torch.zeros((), device=dev, dtype=torch.float64), 0
        global_batch = self.t.batch_size_per_gpu * self.world
        self.valid_loader.load_state_dict({"epoch": 0, "rows_consumed": 0})  # rewind
        for i, batch in enumerate(self.valid_loader):
            if self.t.max_eval_rows and i * global_batch >= self.t.max_eval_rows:
                break
            labels = batch['labels'].to(dev)
            with self.acc.autocast():
                logits = model(input_ids=batch['input_ids'].to(dev),
                               attention_mask=batch['attention_mask'].to(dev),
                               decoder_input_ids=shift_right(batch['labels']).to(dev)).logits
            loss_sum += F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(),
                                        ignore_index=LABEL_PAD_ID, reduction='sum')
            tokens += int((batch['labels'] != LABEL_PAD_ID).sum())
        model.train()
        total, count = self.all_sum([float(loss_sum), tokens])
        return total / max(count, 1)

    def evaluate(self) -> None:
        state = self.state
        if state.last_eval_step == state.global_step:
            return
        self.check_finite()
        val_loss = self.validation_loss()
        msg = f'eval at step {state.global_step}: validation loss {val_loss:.4f} (ppl {math.exp(min(val_loss, 50)):.2f})'
        if self.acc.is_main_process:
            msg += self._bleu_and_samples()
        logger.info(msg)
        state.last_eval_step = state.global_step
        if val_loss < state.best_val_loss:
            state.best_val_loss, state.best_step = val_loss, state.global_step
            self.on_main_all_ranks(lambda: self.save_model('best'))
        self.barrier()

    def _bleu_and_samples(self) -> str:
        n = max(self.t.bleu_samples, self.t.show_samples)
        if not n:
            return ''
        import sacrebleu

        if self._sample_rows is None:
            self._sample_rows = list(iter_usable_rows(self.valid_files, n))
        rows = self._sample_rows
        model = self.acc.unwrap_model(self.model)
        with self.acc.autocast():
            hyps = answer(model, self.tokenizer, [p for p, _ in rows], max_new_tokens=self.t.max_seq_len,
                          max_seq_len=self.t.max_seq_len)
        out = ''
        if self.t.bleu_samples:
            k = min(self.t.bleu_samples, len(rows))
            bleu = sacrebleu.corpus_bleu(hyps[:k], [[r for _, r in rows[:k]]], tokenize='zh')
            out += f' | BLEU-4 {bleu.score:.2f} on {k} rows'
        for (p, r), h in list(zip(rows, hyps))[:self.t.show_samples]:
            out += f'\n    prompt: {p[:80]}\n    target: {r[:80]}\n    answer: {h[:80]}'
        return out

    # --- saving ---
    def save_model(self, tag) -> None:
        """model_file.format(tag) as safetensors; 'best' also as a Hugging Face folder (main only)."""
        model = self.acc.unwrap_model(self.model)
        ckpt.save_weights_file(model, self.t.model_file.format(tag), step=self.state.global_step, tag=tag)
        if tag == 'best':
            self.save_hf('best')

    def save_hf(self, name: str) -> None:
        ckpt.save_model_folder(self.acc.unwrap_model(self.model), self.tokenizer,
                               os.path.join(self.t.output_dir, name), tag=name, step=self.state.global_step,
                               max_seq_len=self.t.max_seq_len)

    def save(self, data_state: dict | None = None) -> str:
        """Full state (collective), plus the step's model file and keep-N pruning."""
        self.check_finite()
        self._fold_counts()
        step = self.state.global_step
        model = self.acc.unwrap_model(self.model)
        tensors = {'model': model.state_dict(), 'optimizer': self.optimizer.state_dict(),
                   'scheduler': self.scheduler.state_dict()}
        if self.acc.scaler is not None:
            tensors['scaler'] = self.acc.scaler.state_dict()
        jsons = {'train_state': dataclasses.asdict(self.state),
                 'data_state': data_state or self.train_loader.state_dict(),
                 'config': self.cfg.to_dict(), 'fingerprint': self.fingerprint,
                 'run': {'world_size': self.world, 'saved_at': time.strftime('%Y-%m-%d %H:%M:%S')}}
        path = ckpt.save_state(self.t.train_state_dir, step, is_main=self.acc.is_main_process,
                               rank=self.rank, all_ok=self.all_ok, tensors=tensors, jsons=jsons,
                               save_tokenizer=lambda folder: save_tokenizer_copy(self.tokenizer, folder))
        self._last_save_step = step

        def step_file():
            self.save_model(step)
            ckpt.prune_model_files(self.t.model_file, self.t.keep_latest_n_ckp)

        self.on_main_all_ranks(step_file)
        logger.info('saved state at step %d -> %s', step, path)
        return path

    def _load(self) -> None:
        saved = ckpt.load_state(self.t.train_state_dir, self.rank)
        for note in ckpt.compare_fingerprints(saved['fingerprint'], self.fingerprint,
                                              self.t.allow_data_change, saved['path']):
            logger.warning(note)
        self.acc.unwrap_model(self.model).load_state_dict(saved['model'])
        self.optimizer.load_state_dict(saved['optimizer'])
        self.scheduler.load_state_dict(saved['scheduler'])
        self._apply_changed_hyperparameters(saved['config']['train'])
        if 'scaler' in saved and self.acc.scaler is not None:
            self.acc.scaler.load_state_dict(saved['scaler'])
        self.state = TrainState(**saved['train_state'])
        self._last_save_step = self.state.global_step
        self.train_loader.load_state_dict(saved['data_state'])
        ckpt.set_rng_state(saved['rng'])
        if saved['run'].get('world_size') != self.world:
            logger.warning('resuming on %d process(es), saved on %s: the data position is kept exactly '
                           '(no row repeated or skipped), dropout RNG streams restart from rank 0\'s',
                           self.world, saved['run'].get('world_size'))
        logger.info('resumed from %s: step %d, epoch %d, %d rows into the epoch', saved['path'],
                    self.state.global_step, saved['data_state'].get('epoch', 0),
                    saved['data_state'].get('rows_consumed', 0))

    def _apply_changed_hyperparameters(self, saved: dict) -> None:
        """The loaded optimizer and schedule carry the saved learning rate and weight decay; this
        run's values win (the schedule's shape comes from this run's config already). Every
        changed field is logged: none is silently ignored."""
        for group in self.optimizer.param_groups:
            group['initial_lr'] = self.t.learn_rate
            group['weight_decay'] = self.t.weight_decay
        self.scheduler.base_lrs = [self.t.learn_rate] * len(self.optimizer.param_groups)
        step = self.scheduler.last_epoch
        for group, base, f in zip(self.optimizer.param_groups, self.scheduler.base_lrs, self.scheduler.lr_lambdas):
            group['lr'] = base * f(step)
        self.scheduler._last_lr = [g['lr'] for g in self.optimizer.param_groups]
        changed = [f'{k} {saved[k]!r} -> {v!r}' for k, v in dataclasses.asdict(self.t).items()
                   if k in saved and saved[k] != v]
        if changed:
            logger.warning('changed since the save, applied from step %d on: %s', step, '; '.join(changed))

    def _stop(self, signum: int, position: dict) -> int:
        logger.warning('%s received: saving state at step %d', signal.Signals(int(signum)).name,
                       self.state.global_step)
        if self.state.global_step > 0 and self._last_save_step != self.state.global_step:
            self.save(data_state=position)
        logger.warning('rank %d: stopped by %s at step %d after saving; exit code %d', self.rank,
                       signal.Signals(int(signum)).name, self.state.global_step, 128 + int(signum))
        return 128 + int(signum)

    def finish(self) -> None:
        self.evaluate()
        if self._last_save_step != self.state.global_step:
            self.save()
        self.on_main_all_ranks(lambda: self.save_hf('final'))
        logger.info('done: %d optimizer steps, best validation loss %.4f at step %d; final model in %s',
                    self.state.global_step, self.state.best_val_loss, self.state.best_step,
                    os.path.join(self.t.output_dir, 'final'))


def run_training(cfg: ResolvedConfig, resume: bool = False) -> int:
    """Entry point of `train_low_mem.py train`: returns the process exit code.

    Every check that can be made at start-up runs first (the same as --dry_run=True), before
    anything is moved, created or trained.
    """
    report = preflight.check_train(cfg, resume, int(os.environ.get('WORLD_SIZE', '1')), locks=False)
    report.raise_first()
    trainer = Trainer(cfg, resume=resume, notes=report.notes)
    try:
        code = trainer.train()
    finally:
        if trainer.lock is not None:
            trainer.lock.release()
    trainer.acc.end_training()
    return code
