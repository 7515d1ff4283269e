"""`train_low_mem.py plot`: training loss, learning rate and validation loss of a run, drawn
from its log file (no tracker needed). matplotlib is imported only here, only when asked."""

from __future__ import annotations

import glob
import json
import os
import re
from dataclasses import dataclass, field

from model.errors import UserError
from model.state import markers, ownership, writes
from model.data import read_guard
from model.data.read_guard import ReadGuard, iter_bounded_lines
from model.state.markers import PLOT

STEP_RE = re.compile(r'step (\d+)/\d+ \| epoch \d+ \| loss ([0-9.eE+-]+|nan|inf) \| lr ([0-9.eE+-]+)'
                     r'(?: \| aux_lr ([0-9.eE+-]+))?')
EVAL_RE = re.compile(r'eval at step (\d+)(?: \([0-9.]+ s\))?: validation loss ([0-9.eE+-]+|nan|inf)(?:.*?BLEU-4 ([0-9.]+))?')


@dataclass
class Curves:
    step: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    eval_step: list[int] = field(default_factory=list)
    eval_loss: list[float] = field(default_factory=list)
    bleu_step: list[int] = field(default_factory=list)
    bleu: list[float] = field(default_factory=list)
    aux_step: list[int] = field(default_factory=list)  # --aux_learn_rate's rate, where the run had one
    aux_lr: list[float] = field(default_factory=list)


RESUMED_RE = re.compile(r'\] INFO resumed from .*: step (\d+), epoch \d+')


def read_curves(log_files: str | list[str]) -> Curves:
    """The figures of a run's log, or of the logs of its starts (oldest first: a first start and
    its resumes). A resume's repeated steps keep their last value, and the points an earlier log
    has past the step a later one resumed from (work lost to a kill) are dropped. A line longer
    than MAX_LOG_LINE_BYTES is skipped unread (the trainer's lines are far shorter)."""
    train, evals, bleus = {}, {}, {}
    for log_file in [log_files] if isinstance(log_files, str) else log_files:
        with ReadGuard(log_file, fix='give the log file a training run wrote'), open(log_file, 'rb') as f:
            for raw, whole in iter_bounded_lines(f, read_guard.MAX_LOG_LINE_BYTES):
                if whole and raw.endswith(b'\n'):  # not a last line cut mid-write (a kill, a full disk):
                    _read_line(raw.decode('utf-8', errors='replace'), train, evals, bleus)  # its numbers may be cut
    curves = Curves()
    for s in sorted(train):
        curves.step.append(s)
        curves.loss.append(train[s][0])
        curves.lr.append(train[s][1])
        if train[s][2] is not None:
            curves.aux_step.append(s)
            curves.aux_lr.append(train[s][2])
    for s in sorted(evals):
        curves.eval_step.append(s)
        curves.eval_loss.append(evals[s])
    for s in sorted(bleus):
        curves.bleu_step.append(s)
        curves.bleu.append(bleus[s])
    return curves


def _read_line(line: str, train: dict, evals: dict, bleus: dict) -> None:
    m = STEP_RE.search(line)
    if m:
        train[int(m.group(1))] = (float(m.group(2)), float(m.group(3)), float(m.group(4)) if m.group(4) else None)
        return
    m = EVAL_RE.search(line)
    if m:
        evals[int(m.group(1))] = float(m.group(2))
        if m.group(3):
            bleus[int(m.group(1))] = float(m.group(3))
        return
    m = RESUMED_RE.search(line)
    if m:  # what an earlier start logged past this step was lost to its kill: this start's figures replace it
        step = int(m.group(1))
        for figures in (train, evals, bleus):
            for s in [s for s in figures if s > step]:
                del figures[s]


OUTPUTS_RE = re.compile(r'\] INFO outputs: (.*)$')


RUN_ID_RE = re.compile(r'\] INFO run id: (\S+)$')
NOTHING_LEFT_RE = re.compile(r'\] WARNING (nothing left to train): ')
HEAD_LINES = 400  # a start's head: its outputs, notes, the state judged, its run id, up to the loop's first line


def outputs_of_log(log_file: str) -> str | None:
    """The output_dir a run's log names (None: a log from before logs named it, or unreadable)."""
    start = start_of_log(log_file)
    return start.outputs if start else None


def run_id_of_log(log_file: str) -> str | None:
    """The run id a log names: a first start and each of its resumes log the same (None: a log from
    before logs named it, a start stopped before it, or unreadable)."""
    start = start_of_log(log_file)
    return start.run_id if start else None


def _header_value(log_file: str, pattern: re.Pattern, lines: int) -> str | None:
    if not os.path.isfile(log_file):  # a FIFO named like a log would block the open
        return None
    try:
        with open(log_file, 'rb') as f:
            for i, (raw, whole) in enumerate(iter_bounded_lines(f, read_guard.MAX_LOG_LINE_BYTES)):
                m = pattern.search(raw.decode('utf-8', errors='replace').rstrip('\n')) if whole else None
                if m or i >= lines:
                    return m.group(1) if m else None
    except OSError:
        return None
    return None


def _mtime(path: str) -> float:
    try:
        return os.path.getmtime(path)
    except OSError:  # a link to nothing, or gone since the listing: not a log to draw
        return -1.0


TIME_RE = re.compile(r'^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) \[rank \d+\] ')
TRAINING_RE = re.compile(r'\] INFO training: ')


@dataclass(frozen=True)
class Start:
    """What the head of one start's log says of it (up to the loop's first line)."""
    run_id: str | None
    outputs: str | None
    began: str  # its first line's time, as logged: the order of a run's starts
    resumed: int  # the step it resumed from; -1: a first start


def start_of_log(log_file: str) -> Start | None:
    """The head of a log, read up to its loop's first line (None: not a regular file, unreadable)."""
    if not os.path.isfile(log_file):
        return None
    found = {'began': '', 'run_id': None, 'outputs': None, 'resumed': -1}
    try:
        with open(log_file, 'rb') as f:
            for i, (raw, whole) in enumerate(iter_bounded_lines(f, read_guard.MAX_LOG_LINE_BYTES)):
                if not whole:
                    continue
                line = raw.decode('utf-8', errors='replace').rstrip('\n')
                for key, pattern, cast in (('began', TIME_RE, str), ('run_id', RUN_ID_RE, str),
                                           ('outputs', OUTPUTS_RE, str), ('resumed', RESUMED_RE, int)):
                    m = pattern.search(line)
                    if m and found[key] in ('', None, -1):
                        found[key] = cast(m.group(1))
                if TRAINING_RE.search(line) or i >= HEAD_LINES:
                    break
    except OSError:
        return None
    return Start(**found)


def run_logs(log_dir: str, log_file: str) -> list[str]:
    """The logs in log_dir (named chat_trainer_low_mem_*.log) of the run log_file is one start of --
    those naming its run id and its output_dir: its first start and every resume (a preempted,
    requeued run has one per start) -- in the order of the step each resumed from (a first
    start: before all), then of the time its first line logged: never the files' times, which a
    copy or a touch changes, nor the clocks alone, which a requeue onto another node or a
    daylight-saving change may set back; a copy of one start's log beside it, or a link to it,
    counts once.
    [log_file] alone when it names no run id."""
    me = start_of_log(log_file)
    if me is None or me.run_id is None:
        return [log_file]

    def same_outputs(outputs):
        return (outputs is None) == (me.outputs is None) and (
            outputs is None or os.path.realpath(outputs) == os.path.realpath(me.outputs))

    starts: dict = {}
    for path in [log_file, *sorted(glob.glob(os.path.join(log_dir, 'chat_trainer_low_mem_*.log')))]:
        start = me if path == log_file else start_of_log(path)
        if start is None or start.run_id != me.run_id or not same_outputs(start.outputs):
            continue
        key = (start.resumed, start.began)  # a run's starts resume from later and later steps, whatever the clocks
        if key not in starts or _preferred(path) < _preferred(starts[key]):
            starts[key] = path
    return [starts[key] for key in sorted(starts)]


def _preferred(path: str) -> tuple:
    """Of two logs of one start (a copy, a link): not a link, then the older file (a copy is newer
    than its original), then the longer."""
    try:
        return os.path.islink(path), _mtime(path), -os.path.getsize(path), path
    except OSError:
        return True, 0.0, 0, path


def newest_log(log_dir: str, output_dir: str = '') -> tuple[str, str]:
    """The newest log in log_dir of the run whose outputs go to output_dir (logs of every preset
    share one log_dir; a log from before logs named their output_dir counts as any run's), and a
    note when there is none and the newest of all is taken instead."""
    dated = [(_mtime(p), p) for p in glob.glob(os.path.join(log_dir, 'chat_trainer_low_mem_*.log'))]
    logs = [p for t, p in sorted(dated, reverse=True) if t >= 0 and os.path.isfile(p)]  # no FIFO, folder, ...
    if not logs:
        raise UserError(f'no chat_trainer_low_mem_*.log in {log_dir}; give --log_file=PATH')
    if not output_dir:
        return logs[0], ''
    want = os.path.realpath(output_dir)
    for log in logs:
        said = outputs_of_log(log)
        if said is None or os.path.realpath(said) == want:
            return log, ''
    return logs[0], (f'note: no log in {log_dir} is of a run with output_dir {output_dir}; the newest is drawn, '
                     f'of {outputs_of_log(logs[0])} (give the --preset or --output_dir of the run, or --log_file)')


def plot_log(log_files: str | list[str], out: str) -> Curves:
    """Three panels (training loss, learning rate, validation loss) as a PNG the toolkit marks, from
    a log or the logs of one run's starts (oldest first, :func:`run_logs`)."""
    logs = [log_files] if isinstance(log_files, str) else list(log_files)
    log_file = logs[-1]
    for log in logs:
        if not os.path.isfile(log):
            what = 'not a regular file (a folder, a FIFO or a device)' if os.path.exists(log) else 'no such file'
            raise UserError(f'--log_file={log}: {what}; give a training run\'s log')
    curves = read_curves(logs)
    if not curves.step:
        why = ('its start had nothing left to train' if _header_value(log_file, NOTHING_LEFT_RE, HEAD_LINES) else
               'its run stopped before its first logged step (one every --logging_steps)' if outputs_of_log(log_file)
               else 'is it a chat_trainer_low_mem log?')
        what = 'this log' if len(logs) == 1 else f'this log nor the {len(logs) - 1} earlier one(s) of its run'
        raise UserError(f'{log_file}: no training step lines in {what} ({why}); give --log_file= another run\'s log')
    out = ownership.resolve_place(out, '--out', file=True)
    if not out.lower().endswith('.png') or os.path.basename(out).lower() == '.png':
        raise UserError(f'--out={out}: the plot is a PNG; give a file path ending in .png')
    ownership.check_not_an_input(out, [log_file], '--out')
    ownership.check_replaceable(out, PLOT, '--out', folder=False)
    ownership.check_writable(out, '--out')
    try:
        import matplotlib
    except ImportError:
        raise UserError("plot needs matplotlib: pip install 'chat-small-t5[plot]' (or pip install matplotlib)") from None
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(8, 9), sharex=True)
    axes[0].plot(curves.step, curves.loss, color='tab:blue', label='training loss')
    axes[0].set_ylabel('training loss')
    axes[1].plot(curves.step, curves.lr, color='tab:orange', label='learning rate')
    if curves.aux_lr:
        axes[1].plot(curves.aux_step, curves.aux_lr, '--', color='tab:purple', label='aux learning rate')
    axes[1].set_ylabel('learning rate')
    axes[1].ticklabel_format(axis='y', style='sci', scilimits=(-3, 3))
    axes[2].plot(curves.eval_step, curves.eval_loss, 'o-', color='tab:green', label='validation loss')
    axes[2].set_ylabel('validation loss')
    axes[2].set_xlabel('optimizer step')
    if curves.bleu:
        twin = axes[2].twinx()
        twin.plot(curves.bleu_step, curves.bleu, 's--', color='tab:red', label='BLEU-4')
        twin.set_ylabel('BLEU-4')
        twin.legend(loc='upper right')
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(loc='upper left' if ax is axes[2] else 'upper right')
    fig.suptitle(os.path.basename(log_file) + (f' and {len(logs) - 1} earlier start(s) of the run' if len(logs) > 1
                                               else ''))
    fig.tight_layout()
    marker = json.dumps(markers.file_marker_info(PLOT, log_file=os.path.abspath(log_file)))
    with writes.atomic_file(out, PLOT, '--out', last=True) as tmp:  # the command's one output
        fig.savefig(tmp, format='png', dpi=110, metadata={'Software': 'chat_small_t5', markers.MARKER_KEY: marker})
    plt.close(fig)
    return curves
