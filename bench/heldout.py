"""What the learning benchmarks share (bench_train.py, bench_recipe.py): a held-out scorer that
judges any T5 the same way, a clock that leaves the scoring out, and this toolkit's trainer run on
a task (bench/tasks.py) with the scorer in place of its own evaluation.

The scorer: the token-weighted validation loss (the toolkit's one loss rule,
model/net/chat_model.token_loss_sum) on the first ``loss_rows`` held-out rows, and the exact match
(model/use/scoring.exact_match: whitespace-stripped answer == reference) of greedy answers
(model/net/chat_model.answer, no repetition rule) to the first ``em_prompts`` distinct held-out
prompts.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# the base of every run: the demo preset's batch and length, fp32 on the CPU
BASE = dict(batch_size_per_gpu=64, gradient_accumulation_steps=1, max_seq_len=32, mixed_precision='no',
            lr_schedule='cosine', weight_decay=0.0, max_grad_norm=1.0)
SIZES = {  # d_model 128: the demo preset's shape (1.5M parameters); d_model 256: about 4x the compute
    'd128': dict(d_model=128, num_heads=4, d_kv=32, d_ff=512, num_layers=3, num_decoder_layers=3),
    'd256': dict(d_model=256, num_heads=4, d_kv=64, d_ff=1024, num_layers=3, num_decoder_layers=3),
}


_CHILDREN: set = set()  # the bench child processes running now (from any thread)
_STOPPING = threading.Event()
_MADE: dict = {}  # the temporary training folders this process made and has not removed: path -> its token
TEMP_MARK = '.bench-temp'  # in each: the token it was made with


def temp_folder(prefix: str) -> str:
    """A new temporary folder for one training run (removed by :func:`remove_folder`, or at a stop),
    marked with a token of its own."""
    stops = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stops)  # a stop waits until the folder is made, marked and known
    try:
        path, token = tempfile.mkdtemp(prefix=prefix), os.urandom(16).hex()
        fd = os.open(os.path.join(path, TEMP_MARK), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, 'w') as f:
            f.write(token)
        _MADE[path] = token
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, stops)
    return path


def remove_folder(path: str) -> None:
    """Removes a folder :func:`temp_folder` made in this process while it is still that folder: a real
    one (never a link) holding its token. Any other path -- a user's folder, a link, the made one's
    name taken since by another folder -- is left as it is."""
    token = _MADE.pop(path, None)
    with contextlib.suppress(OSError):
        if token is None or not stat.S_ISDIR(os.lstat(path).st_mode):
            return
        fd = os.open(os.path.join(path, TEMP_MARK), os.O_RDONLY | os.O_NOFOLLOW)
        with os.fdopen(fd) as f:
            if f.read(64) == token:
                shutil.rmtree(path, ignore_errors=True)


def stop_on_sigterm(child: bool = False) -> None:
    """SIGTERM (and Ctrl-C's SIGINT) stop this bench process. A bench stops its running children
    the same way and starts no new one (a bench running them from a thread pool would otherwise
    wait for each queued run), then ends as an exception does. A child (one training run) removes
    the temporary folders it made and exits at once, 128 + the signal: no `finally` block of the
    training code, nor its exit, is waited for."""
    def stop(signum, frame):
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})  # a second one (a launcher's,
        # the bench's to its child) must not cut this stop short: the removal below, or the wait for the children
        _STOPPING.set()
        for proc in list(_CHILDREN):
            with contextlib.suppress(OSError):
                proc.send_signal(signal.SIGTERM)
        if child:
            for path in list(_MADE):
                remove_folder(path)
            os._exit(128 + signum)
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)


def run_child(cmd: list[str], env: dict) -> subprocess.CompletedProcess:
    """A bench child process (one training run) run to its end, its output captured, with a
    temporary folder of its own as TMPDIR, removed once the child has ended however it ended (its
    training folders, a library's cache: nothing of it stays). Stopped while it runs (Ctrl-C,
    SIGTERM: :func:`stop_on_sigterm`), the child is stopped with SIGTERM and waited for before the
    stop goes on; none starts after."""
    if _STOPPING.is_set():
        raise RuntimeError('the bench is stopping')
    box = temp_folder('bench-child-')
    proc = None
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=dict(env, TMPDIR=box), cwd=ROOT)
        _CHILDREN.add(proc)
        try:
            out, err = proc.communicate()
        except BaseException:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
            raise
    finally:
        _CHILDREN.discard(proc)
        remove_folder(box)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def out_place_problem(path: str, example: str = os.path.join('bench', 'out')) -> str | None:
    """Why a bench cannot keep its output in the folder ``path`` (made if missing), with the fix;
    None where it can. Refused before any work: a file; a place under a file or not writable; a
    place that holds much else or the toolkit's code (the training runs' rule,
    model/train/preflight.shared_folder) or the benches' own code in bench/ (bench/out is theirs)."""
    from model.train.preflight import shared_folder

    real = os.path.realpath(path)  # a link to a folder still to make: made there (new_log)
    if os.path.exists(real) and not os.path.isdir(real):
        return f'is a file, not a folder; give a folder, e.g. {example}'
    bench = os.path.join(os.path.realpath(ROOT), 'bench')
    own = os.path.join(bench, 'out')
    code = shared_folder(real) or ('inside the toolkit\'s bench/ folder (its code)' if
                                   os.path.commonpath([real, bench]) == bench and os.path.commonpath([real, own]) != own
                                   else None)
    if code:
        return f'is {code}: the bench\'s files would lie among everything else there; give a folder of its own, ' \
               f'e.g. {example}'
    existing = real
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return f'cannot be made: {existing} is a file, not a folder; give a folder, e.g. {example}'
    if not os.access(existing, os.W_OK | os.X_OK):
        return f'cannot be written: {existing} is not writable for this user; give a folder you can write'
    return None


def refuse_flag(flag: str, path: str, why: str):
    """A flag argparse let through and the bench cannot use (a bad output place, --report), said as argparse
    says a bad flag, in one line on stderr, exit 2."""
    print(f'{os.path.basename(sys.argv[0])}: error: --{flag}={path} {why}', file=sys.stderr)
    raise SystemExit(2)


def check_common_flags(ap, args) -> None:
    """What argparse lets through and a learning bench cannot use: one line, exit 2 (an empty --out_dir,
    an unset variable, would write into the current folder; a negative --steps ran the default; a
    --out_dir that is a file, unwritable or the toolkit's code, :func:`out_place_problem`)."""
    if getattr(args, 'out_dir', None) == '':
        ap.error('--out_dir is empty: give a folder (the default is bench/out)')
    if getattr(args, 'out_dir', None) and not getattr(args, 'child', None):
        why = out_place_problem(args.out_dir)
        if why:
            refuse_flag('out_dir', args.out_dir, why)
    for flag, least in (('steps', 0), ('seeds', None)):  # numbers, comma-separated where a bench takes several
        given = getattr(args, flag, None)
        if given is None:
            continue
        try:
            numbers = [int(x) for x in str(given).split(',')]
        except ValueError:
            numbers = None
        if numbers is None or (least is not None and min(numbers) < least):
            ap.error(f'--{flag}={given}: give ' + ('a number of optimizer steps (0 or more)' if flag == 'steps'
                                                    else 'whole numbers') + ', comma-separated')
    if getattr(args, 'eval_every', 1) < 1:
        ap.error(f'--eval_every={args.eval_every}: give a number of steps, 1 or more')


def new_log(out_dir: str, prefix: str, quick: bool):
    """A new file for a run's printed output, never an earlier run's: (the open file, its name less
    .txt, for the run's other files) -- prefix_<time>[_quick][-N].txt in out_dir."""
    stem = os.path.join(out_dir, f'{prefix}_{time.strftime("%Y%m%d_%H%M%S")}' + ('_quick' if quick else ''))
    try:
        os.makedirs(os.path.realpath(out_dir), exist_ok=True)  # a link to a folder still to make: made there
        for n in range(1000):
            name = f'{stem}-{n}' if n else stem
            try:
                return open(name + '.txt', 'x', encoding='utf-8'), name
            except FileExistsError:  # two runs in one second
                continue
        raise FileExistsError(errno.EEXIST, f'{stem}.txt and 999 more exist')
    except OSError as e:  # a place out_place_problem could not foresee (/proc, a full disk): one line
        refuse_flag('out_dir', out_dir, f'cannot be written ({e.strerror or e}); give another folder')


class HeldOutScorer:
    """Validation loss and exact match of any T5 on a task's held-out rows (one function for all)."""

    def __init__(self, valid_file: str, tok_dir: str, max_seq_len: int, loss_rows: int = 512, em_prompts: int = 256):
        from model.data.batches import TokenEncoder, make_batches, to_torch
        from model.data.files import iter_usable_rows
        from model.data.tokenizer import load_tokenizer

        self.tokenizer, self.max_seq_len = load_tokenizer(tok_dir), max_seq_len
        rows = list(iter_usable_rows(valid_file, 10**9))
        loss_rows_ = rows[:loss_rows]
        encoder = TokenEncoder(self.tokenizer, max_seq_len)
        self.batches = [to_torch(b) for b in make_batches(
            [([p for p, _ in loss_rows_[i:i + 64]], [r for _, r in loss_rows_[i:i + 64]], None, 0)
             for i in range(0, len(loss_rows_), 64)], encoder)]
        distinct = dict(rows)  # prompt -> its (one) answer, in first-seen order
        self.prompts = list(distinct)[:em_prompts]
        self.references = [distinct[p] for p in self.prompts]

    def __call__(self, model) -> dict:
        import torch

        from model.data.tokenizer import LABEL_PAD_ID
        from model.net.chat_model import answer, token_loss_sum
        from model.use.scoring import exact_match

        was = model.training
        model.eval()
        device = next(model.parameters()).device
        total, tokens = 0.0, 0
        with torch.no_grad():
            for b in self.batches:
                total += float(token_loss_sum(model, b, device))
                tokens += int((b['labels'] != LABEL_PAD_ID).sum())
            answers = answer(model, self.tokenizer, self.prompts, max_new_tokens=self.max_seq_len,
                             max_seq_len=self.max_seq_len)
        model.train(was)
        em = sum(exact_match(a, r) for a, r in zip(answers, self.references)) / max(len(self.prompts), 1)
        return {'loss': total / max(tokens, 1), 'em': em}


class Clock:
    """Training time with the scoring taken out."""

    def __init__(self):
        self.start, self.paused = time.perf_counter(), 0.0

    def restart(self) -> None:
        self.start, self.paused = time.perf_counter(), 0.0

    def train_seconds(self) -> float:
        return time.perf_counter() - self.start - self.paused

    def score(self, fn):
        t = time.perf_counter()
        try:
            return fn()
        finally:
            self.paused += time.perf_counter() - t


def run_toolkit(paths: dict, fields: dict, max_steps: int, eval_every: int, scorer: HeldOutScorer,
                budget_s: float = 0.0) -> dict:
    """This toolkit's trainer (preflight -> build_run -> Trainer, as `train` runs it) for max_steps
    optimizer steps with ``fields`` over the task's files; the scorer judges it every eval_every
    steps and at the end, outside the training time. budget_s > 0: stop at the first evaluation
    past that much training time. Returns {'curve': [(step, train_s, loss, em)], 'steps', 'batch'}."""
    work = temp_folder('bench-ours-')
    try:
        return _run_toolkit(work, paths, fields, max_steps, eval_every, scorer, budget_s)
    finally:
        remove_folder(work)  # the run's own new folder: its checkpoints, logs


def _run_toolkit(work, paths, fields, max_steps, eval_every, scorer, budget_s) -> dict:
    from config import resolve_config
    from model.train import preflight
    from model.train.evaluation import EvalResult
    from model.train.factory import build_run
    from model.train.trainer import Trainer

    overrides = {**fields, 'train_file': paths['train'], 'validation_file': paths['valid'], 'tokenizer_dir': paths['tok'],
                 'output_dir': work, 'train_state_dir': f'{work}/state', 'model_file': f'{work}/m.{{}}.bin',
                 'log_dir': f'{work}/logs', 'save_steps': 10**6, 'logging_steps': eval_every, 'eval_steps': eval_every,
                 'epochs': 1000, 'max_steps': max_steps, 'bleu_samples': 0, 'show_samples': 0, 'max_eval_rows': 1}
    cfg = resolve_config(overrides=overrides)
    report = preflight.check_train(cfg, False, 1)
    report.raise_first()
    trainer = Trainer(build_run(cfg, False, report.notes, report.fingerprint, report.resume))
    clock, curve = Clock(), []

    def evaluate(model, step):
        scores = scorer(trainer.accelerator.unwrap_model(model))
        curve.append((step, clock.train_seconds(), scores['loss'], scores['em']))
        if budget_s and clock.train_seconds() >= budget_s:
            trainer.total_steps = step  # the loop ends after this step; finish() evaluates no more
        return EvalResult(loss=scores['loss'])

    trainer.evaluator.evaluate_all_ranks = evaluate
    evaluate_with_best_save = trainer.evaluate_all_ranks  # the best model's export is not training either
    trainer.evaluate_all_ranks = lambda: clock.score(evaluate_with_best_save)
    try:
        clock.restart()
        trainer.train()
    finally:
        trainer.lock.release()
    return {'curve': curve, 'steps': trainer.state.global_step, 'batch': cfg.train.batch_size_per_gpu}
