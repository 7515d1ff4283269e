"""A span-corruption resume taking the token counts its state kept, against one counting them
again (a benchmark, not a test).

    .venv/bin/python bench/bench_span_resume.py                  # 300,000 documents, ~3 min on 2 cores
    .venv/bin/python bench/bench_span_resume.py --rows=20000 --runs=1

In a new folder bench/out/span_resume-<random>/ (made by this run, removed at its end unless --keep;
nothing that was there before is touched): a raw-text Parquet of
--rows documents (real_train_3k's rows, prompt and response joined, numbered and repeated), a 6,000
piece tokenizer trained on the 3k rows, and a 2-step demo-model run at max length 128 with its
saved state. Then, --runs times in turn, a copy of that state resumed to step 3 as it is (the
counts taken) and with --allow_data_change=True (counted again: what every resume did before the
counts were kept); printed: each command's wall seconds, the log's counting line, the size of
data_position.json.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REAL = os.path.join(ROOT, '..', 'shared', 'data', 'real_train_3k.parquet')
OUT = ''  # this run's own folder, made in main()


def train(folder: str, *flags: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, 'train_low_mem.py', 'train', '--preset=demo', '--objective=span_corruption',
           '--max_seq_len=128', f'--train_file={OUT}/train.parquet', f'--validation_file={OUT}/valid.parquet',
           f'--tokenizer_dir={OUT}/tok', f'--output_dir={folder}/out', f'--train_state_dir={folder}/state',
           f'--model_file={folder}/out/m.{{}}.bin', f'--log_dir={folder}/logs', '--max_eval_rows=16',
           '--bleu_samples=0', *flags]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE='1'))
    if r.returncode:
        sys.exit(f'{" ".join(cmd)} failed:\n{r.stderr[-3000:]}')
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--rows', type=int, default=300_000)
    ap.add_argument('--runs', type=int, default=2)
    ap.add_argument('--keep', action='store_true', help='keep the folder with the data, tokenizer and runs')
    args = ap.parse_args()
    if args.rows < 1000 or args.runs < 1:
        ap.error('--rows must be at least 1000 and --runs at least 1')
    global OUT
    os.makedirs(os.path.join(ROOT, 'bench', 'out'), exist_ok=True)
    OUT = tempfile.mkdtemp(prefix='span_resume-', dir=os.path.join(ROOT, 'bench', 'out'))  # new: nothing else's
    try:
        measure(args)
    finally:
        if args.keep:
            print(f'kept: {OUT}')
        else:
            shutil.rmtree(OUT)


def measure(args) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    t = pq.read_table(REAL).to_pydict()
    texts = [p + '\n' + r for p, r in zip(t['prompt'], t['response'])]
    pq.write_table(pa.table({'text': [f'{i}. {texts[i % len(texts)]}' for i in range(args.rows)]}),
                   f'{OUT}/train.parquet', row_group_size=20000)
    pq.write_table(pa.table({'text': texts[:200]}), f'{OUT}/valid.parquet')
    pq.write_table(pa.table({'text': texts}), f'{OUT}/tok_src.parquet')
    subprocess.run([sys.executable, 'train_low_mem.py', 'train_tokenizer', '--preset=demo', '--vocab_size=6000',
                    f'--train_file={OUT}/tok_src.parquet', f'--tokenizer_dir={OUT}/tok'], cwd=ROOT, check=True,
                   capture_output=True, env=dict(os.environ, HF_HUB_OFFLINE='1'))
    base = f'{OUT}/base'
    train(base, '--max_steps=2')
    size = sum(os.path.getsize(os.path.join(d, 'data_position.json'))
               for d in [os.path.join(base, 'state', n) for n in os.listdir(f'{base}/state')]
               if os.path.isfile(os.path.join(d, 'data_position.json')))
    print(f'bench_span_resume: {args.rows:,} documents; load average {os.getloadavg()[0]:.2f}; '
          f'data_position.json {size:,} bytes ({size / args.rows:.2f} a row)')
    for run in range(args.runs):
        for k, (name, extra) in enumerate((('counts kept', ()), ('counted again', ('--allow_data_change=True',)))):
            copy = f'{OUT}/copy-{run}-{k}'  # a new folder each time: nothing is removed on the way
            shutil.copytree(base, copy, symlinks=True)
            start = time.perf_counter()
            r = train(copy, '--max_steps=3', '--is_keep_training=True', *extra)
            wall = time.perf_counter() - start
            line = re.search(r'(\d+ tokens in \d+ rows, counted in [\d.]+ s|token counts taken from the saved state)',
                             r.stderr + r.stdout)
            print(f'run {run + 1}, {name:<13}: {wall:6.1f} s  ({line.group(1) if line else "?"})', flush=True)
    print(f'load average at the end {os.getloadavg()[0]:.2f}')


if __name__ == '__main__':
    main()
