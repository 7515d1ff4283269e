"""The process a training run lives in: its collectives, precision and log file.

Collectives: every method named ``*_all_ranks`` must be called by every rank at the same
point, outside any condition a rank could take alone. They run on a CPU (gloo) group, so
counting tokens or voting on a stop never waits for the device. (Signals: model/stopping.py.)
"""

from __future__ import annotations

import datetime
import itertools
import logging
import os
import sys

import torch

from model.errors import NotOurs, UserError


class Collectives:
    """Sums and votes across ranks on a CPU group (identity on one process)."""

    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.world = accelerator.num_processes
        self.is_main = accelerator.is_main_process
        self.cpu_group = None
        if self.world > 1:
            import torch.distributed as dist

            self.cpu_group = dist.new_group(backend='gloo')  # flags and counts without device syncs

    def sum_all_ranks(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return list(values)
        import torch.distributed as dist

        buf = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(buf, group=self.cpu_group)
        return buf.tolist()

    def combine_counts(self, counts, error: Exception | None):
        """The element-wise sum of every rank's share of counts (numpy int64); a rank's error is
        raised on every rank (the others quietly) before any waits for the sum."""
        if not self.ok_all_ranks(error is None):
            raise error if error is not None else UserError('')
        if self.world == 1:
            return counts
        import numpy as np
        import torch.distributed as dist

        buf = torch.from_numpy(np.ascontiguousarray(counts, dtype=np.int64))
        dist.all_reduce(buf, group=self.cpu_group)
        return buf.numpy()

    def stop_signal_all_ranks(self, signum: int) -> int:
        """The stop signal of any rank (the largest number), 0 while no rank has one: every rank
        learns of a stop at the same point, so they leave together."""
        if self.world == 1:
            return int(signum)
        import torch.distributed as dist

        buf = torch.tensor([int(signum)], dtype=torch.int64)
        dist.all_reduce(buf, op=dist.ReduceOp.MAX, group=self.cpu_group)
        return int(buf.item())

    def ok_all_ranks(self, ok: bool) -> bool:
        """True when every rank says ok."""
        return self.sum_all_ranks([0.0 if ok else 1.0])[0] == 0

    def on_main_all_ranks(self, fn):
        """fn() on the main process; if it raises, every rank raises (the others quietly), so
        no rank is left waiting at the next collective. Returns fn's result on main."""
        result, error = None, None
        if self.is_main:
            try:
                result = fn()
            except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
                error = e
        failed, not_ours = self.sum_all_ranks([0.0 if error is None else 1.0, float(isinstance(error, NotOurs))])
        if failed:  # of the same kind everywhere: a caller that handles one kind does so on every rank
            raise error if error is not None else (NotOurs('') if not_ours else UserError(''))
        return result

    def broadcast_from_main_all_ranks(self, value):
        if self.world == 1:
            return value
        from accelerate.utils import broadcast_object_list

        box = [value]
        broadcast_object_list(box)
        return box[0]


# --------------------------------------------------------------------------- precision


def cpu_supports_bf16(cpuinfo: str = '/proc/cpuinfo') -> bool:
    """The CPU computes bf16 natively (AVX512-BF16 or AMX-BF16, as the kernel lists its flags);
    elsewhere bf16 autocast is emulated, ~20x slower than fp32. Unknown (no such file): no."""
    try:
        with open(cpuinfo, encoding='utf-8', errors='replace') as f:
            for line in f:
                if line.startswith('flags'):
                    return bool({'avx512_bf16', 'amx_bf16'} & set(line.split(':', 1)[-1].split()))
    except OSError:
        pass
    return False


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


# --------------------------------------------------------------------------- logging


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


class LogFile(logging.FileHandler):
    """The run's log file. A write that fails (the disk filled up) is said once, in one line on
    the console, and the file is given up: the run goes on logging to the console (its next save
    says in one line if the same disk is full), rather than a traceback per logged line."""

    failed = False

    def emit(self, record) -> None:
        if not self.failed:
            super().emit(record)

    def flush(self) -> None:
        if self.failed:
            return
        try:
            super().flush()
        except OSError:
            self.handleError(None)

    def close(self) -> None:
        try:
            super().close()
        except OSError:  # the buffer's last write, on a disk already said to be full
            if not self.failed:
                self.handleError(None)

    def handleError(self, record) -> None:
        if self.failed:
            return
        self.failed = True
        error = sys.exc_info()[1]
        reason = getattr(error, 'strerror', None) or str(error) or type(error).__name__
        print(f'warning: cannot write the log file {self.baseFilename} ({reason}); logging to the console only '
              f'from here on', file=sys.stderr, flush=True)


def setup_logging_all_ranks(log_dir: str, collectives: Collectives) -> str:
    """One log file per run; every rank appends to it (non-main ranks: warnings and errors).
    The console handler goes through tqdm while a progress bar runs (logging_redirect_tqdm)."""
    name = collectives.broadcast_from_main_all_ranks(new_log_file(log_dir) if collectives.is_main else None)
    rank = collectives.accelerator.process_index
    fmt = logging.Formatter(f'%(asctime)s [rank {rank}] %(levelname)s %(message)s', '%Y-%m-%d %H:%M:%S')
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(logging.INFO)
    file_handler = LogFile(name, mode='a', encoding='utf-8')
    console = logging.StreamHandler()
    for handler in (file_handler, console):
        handler.setFormatter(fmt)
        if not collectives.is_main:
            handler.setLevel(logging.WARNING)
        root.addHandler(handler)
    for noisy in ('httpx', 'urllib3', 'filelock', 'accelerate'):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # accelerate saves T5's tied embedding once and says so at every save; that is intended
    logging.getLogger('accelerate.utils.other').setLevel(logging.ERROR)
    import transformers

    transformers.utils.logging.disable_progress_bar()  # 'Writing model shards' bars amid the log
    return name
