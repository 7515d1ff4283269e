"""Resume start-up on a state of the guide's model shape (CPU): how long `train
--is_keep_training=True` takes from its start to the line "resumed from ..." and to its first step.

    .venv/bin/python bench/bench_resume.py              # tokenizer, one saved state, 3 resumes (~5 min)
    .venv/bin/python bench/bench_resume.py --runs=5 --dir=/tmp/resume   # keep the folder

The model is config.py's T5ModelConfig (d_model 768, 10+10 layers, d_ff 3072) with a tokenizer of
--vocab pieces trained on ../shared/data/real_train_3k.parquet; the state is saved after one
optimizer step (AdamW: weights, two moments, schedule, RNG, data position). Each resume runs on a
fresh copy of that state folder and is killed once its first step is logged. The figures are
medians of --runs; the machine's load is printed first: benchmark alone.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), 'shared', 'data')


def run_flags(d: str, run: str, max_seq_len: int) -> list[str]:
    return [f'--train_file={SHARED}/real_train_3k.parquet', f'--validation_file={SHARED}/real_valid_1k.parquet',
            f'--tokenizer_dir={d}/tok', f'--output_dir={run}', f'--train_state_dir={run}/state',
            f'--model_file={run}/chat_small_t5.{{}}.bin', f'--log_dir={run}/logs', f'--max_seq_len={max_seq_len}',
            '--batch_size_per_gpu=2', '--optimizer=adamw', '--mixed_precision=no', '--max_eval_rows=4',
            '--bleu_samples=0', '--show_samples=0', '--warmup_steps=0']


STAMP = '.bench_resume'  # in a --dir this benchmark made: only such a folder's work it removes


def claim_work_dir(path: str) -> str:
    """--dir, made here or made by this benchmark before (it holds the stamp); a folder holding
    anything else, or a link planted for the copies it removes, is refused: nothing of a user's
    is ever removed."""
    from heldout import out_place_problem, refuse_flag

    d = os.path.realpath(path)
    why = out_place_problem(path, os.path.join('bench', 'out', 'resume'))
    if why:
        refuse_flag('dir', path, why)
    if os.path.isdir(d) and os.listdir(d) and not os.path.isfile(os.path.join(d, STAMP)):
        refuse_flag('dir', path, 'holds files this benchmark did not make; give a new or empty folder')
    try:
        os.makedirs(d, exist_ok=True)
        open(os.path.join(d, STAMP), 'a').close()
    except OSError as e:  # a place out_place_problem could not foresee (/proc, a full disk)
        refuse_flag('dir', path, f'cannot be written ({e.strerror or e}); give another folder')
    for name in ('resume', 'saved', 'tok'):
        if os.path.islink(os.path.join(d, name)):
            refuse_flag('dir', path, f'holds {name}, a link this benchmark did not make; remove it')
    return d


def timed_resume(d: str, pristine: str, max_seq_len: int) -> tuple[float, float]:
    """(seconds to 'resumed from', seconds to the first step's line) of one resume."""
    run = os.path.join(d, 'resume')
    shutil.rmtree(run, ignore_errors=True)  # this benchmark's own copy (claim_work_dir)
    shutil.copytree(pristine, run, symlinks=True)
    cmd = [sys.executable, 'train_low_mem.py', 'train', *run_flags(d, run, max_seq_len), '--max_steps=2',
           '--is_keep_training=True']
    env = {**os.environ, 'HF_HUB_OFFLINE': '1', 'TOKENIZERS_PARALLELISM': 'false'}
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    resumed = stepped = None
    tail = []
    for line in proc.stderr:
        tail = (tail + [line])[-20:]
        if resumed is None and 'resumed from' in line:
            resumed = time.monotonic() - start
        if 'step 2/2' in line:
            stepped = time.monotonic() - start
            proc.kill()
            break
    proc.wait()
    if resumed is None or stepped is None:
        raise SystemExit('the resume did not reach its first step:\n' + ''.join(tail))
    shutil.rmtree(run, ignore_errors=True)
    return resumed, stepped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--runs', type=int, default=3)
    parser.add_argument('--vocab', type=int, default=8000)
    parser.add_argument('--max_seq_len', type=int, default=64)
    parser.add_argument('--dir', default=None, help='work here (kept) instead of a temporary folder')
    args = parser.parse_args()
    if args.dir == '':  # an unset variable: not the current folder
        parser.error('--dir is empty: give a folder, or leave it out for a temporary one')
    d = claim_work_dir(args.dir) if args.dir else tempfile.mkdtemp(prefix='bench_resume_')
    print('load:', open('/proc/loadavg').read().split()[:3], flush=True)
    env = {**os.environ, 'HF_HUB_OFFLINE': '1', 'TOKENIZERS_PARALLELISM': 'false'}
    try:
        if not os.path.isfile(os.path.join(d, 'tok', 'tokenizer.json')):
            subprocess.run([sys.executable, 'train_low_mem.py', 'train_tokenizer',
                            f'--train_file={SHARED}/real_train_3k.parquet', f'--tokenizer_dir={d}/tok',
                            f'--vocab_size={args.vocab}'], cwd=ROOT, env=env, check=True, capture_output=True)
        pristine = os.path.join(d, 'saved')
        if not os.path.isdir(os.path.join(pristine, 'state')):
            r = subprocess.run([sys.executable, 'train_low_mem.py', 'train', *run_flags(d, pristine, args.max_seq_len),
                                '--max_steps=1', '--save_steps=1'], cwd=ROOT, env=env, capture_output=True, text=True)
            if r.returncode:
                raise SystemExit(r.stderr[-3000:])
        size = sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(os.path.join(pristine, 'state'))
                   for f in files)
        times = [timed_resume(d, pristine, args.max_seq_len) for _ in range(args.runs)]
        to_resumed, to_step = [t[0] for t in times], [t[1] for t in times]
        print(f'state {size / 2**20:,.0f} MiB; {args.runs} resumes: to "resumed from" median '
              f'{statistics.median(to_resumed):.1f} s (min {min(to_resumed):.1f}, max {max(to_resumed):.1f}); '
              f'to the first step median {statistics.median(to_step):.1f} s '
              f'(min {min(to_step):.1f}, max {max(to_step):.1f})')
    finally:
        if not args.dir:
            shutil.rmtree(d, ignore_errors=True)


if __name__ == '__main__':
    main()
