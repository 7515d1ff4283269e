"""Peak memory (RSS) of every command on an input built to blow it up.

    .venv/bin/python bench/bench_memory.py                    # 300 MB records, a 1 GiB log line (~3 min)
    .venv/bin/python bench/bench_memory.py --record_mb=20 --log_mb=20   # quick

Builds in a temporary folder (removed at the end): a small training set, a tokenizer and a tiny
model trained for a few steps; then, for the commands, a JSONL line, a JSON value, a CSV field
and a Parquet cell of --record_mb each, and a training log with one --log_mb line among the real
ones; a Parquet cell of --under_mb, under the record limit, which the commands read; and a Parquet
row group of --group_mb of ordinary rows (2 KB each), which they stream in slices.
Each command runs once under ``/usr/bin/time -f %M`` (peak RSS of the process, KiB); the table
gives the exit status, the first line of stderr (or of stdout) and the peak. The limits in
model/data/read_guard.py decide what is refused: records over 16 MiB (a Parquet cell that long is
refused from the footer and page headers, unread), log lines over 64 KiB skipped; a row group over
128 MiB of text is read in slices.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {'d_model': 32, 'num_heads': 2, 'd_kv': 16, 'd_ff': 64, 'num_layers': 1, 'num_decoder_layers': 1,
        'max_seq_len': 64}
ARG_BYTES = 120_000  # one command-line argument holds at most 128 KiB (Linux MAX_ARG_STRLEN)
CHUNK = 1 << 20


def run(args: list[str], stdin_path: str | None = None) -> dict:
    """One command under /usr/bin/time: exit status, first line of output, peak RSS in MiB."""
    with tempfile.NamedTemporaryFile('r') as peak, open(stdin_path or os.devnull, 'rb') as stdin:
        r = subprocess.run(['/usr/bin/time', '-f', '%M', '-o', peak.name, sys.executable, *args], cwd=ROOT,
                           stdin=stdin, capture_output=True, text=True, errors='replace',
                           env={**os.environ, 'HF_HUB_OFFLINE': '1', 'TOKENIZERS_PARALLELISM': 'false'})
        kib = int(peak.read().split()[-1])
    lines = [x for x in r.stderr.splitlines() if x.startswith('error:')] or \
            [x for x in r.stdout.splitlines() if x.strip()][-1:] or \
            [x for x in r.stderr.splitlines() if x.strip()][-1:] or ['']
    return {'code': r.returncode, 'said': lines[0], 'peak_mib': kib / 1024}


def write_big_value(path: str, head: bytes, size: int, tail: bytes) -> None:
    """head + about size bytes of Chinese text + tail, written in pieces (the builder never
    holds it whole)."""
    piece = ('长' * (CHUNK // 3)).encode()
    with open(path, 'wb') as f:
        f.write(head)
        for _ in range(0, size, len(piece)):
            f.write(piece)
        f.write(tail)


def build_inputs(d: str, record: int, log: int, under: int, group: int) -> dict[str, str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    good = json.dumps({'prompt': '你好', 'response': '你好！'}, ensure_ascii=False).encode()
    paths = {name: os.path.join(d, name) for name in ('big.jsonl', 'big.json', 'big.csv', 'big_cell.parquet',
                                                       'big_line.log', 'big_line.txt')}
    write_big_value(paths['big.jsonl'], good + b'\n{"prompt": "', record, b'", "response": "x"}\n')
    write_big_value(paths['big.json'], b'[' + good + b', {"prompt": "', record, b'", "response": "x"}]')
    write_big_value(paths['big.csv'], 'prompt,response\n你好,你好！\n"'.encode(), record, '",答\n'.encode())
    write_big_value(paths['big_line.txt'], '你好\n'.encode(), record, b'\n')
    for name, size in (('big_cell.parquet', record), ('cell_under_limit.parquet', under)):
        paths[name] = os.path.join(d, name)
        cell = pa.array(['长' * (size // 3)] + ['你好'] * 63)  # a batch's worth of rows: training reads it
        pq.write_table(pa.table({'prompt': cell, 'response': ['你好！'] * 64}), paths[name])
        del cell
    paths['big_group.parquet'] = os.path.join(d, 'big_group.parquet')
    rows = group // 2048
    column = pa.array(['长' * 680] * rows)  # 2,040 bytes a row, one row group
    pq.write_table(pa.table({'prompt': column, 'response': ['你好！'] * rows}), paths['big_group.parquet'],
                   row_group_size=rows)
    del column
    logs = os.path.join(d, 'run', 'logs')
    real_log = sorted(os.listdir(logs))[-1]
    with open(os.path.join(logs, real_log), 'rb') as f:
        lines = f.read().splitlines(keepends=True)
    with open(paths['big_line.log'], 'wb') as f:
        f.writelines(lines[:len(lines) // 2])
        for _ in range(0, log, CHUNK):
            f.write(b'x' * CHUNK)
        f.write(b'\n')
        f.writelines(lines[len(lines) // 2:])
    return paths


def with_flags(flags: list[str], **changed) -> list[str]:
    """flags with some values replaced (a flag given twice is an error)."""
    names = {f'--{k}=' for k in changed}
    return [f for f in flags if not any(f.startswith(n) for n in names)] + [f'--{k}={v}' for k, v in changed.items()]


def build_step(argv: list[str]) -> None:
    """One command that builds the model, or the bench ends with what it said (a --dir holding a
    user's files is refused there: a traceback of CalledProcessError showed none of it)."""
    r = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True)
    if r.returncode:
        said = (r.stderr.strip() or r.stdout.strip() or 'nothing said').splitlines()[-1]
        sys.exit(f'error: {" ".join(argv[:2])} failed (exit {r.returncode}): {said[:2000]}')


def build_model(d: str) -> tuple[list[str], list[str]]:
    """A tokenizer and a tiny model on the demo corpus; the flags that point train, and
    generate/chat/test, at them (a flag a command does not use is refused)."""
    data, run_dir = os.path.join(d, 'data'), os.path.join(d, 'run')
    build_step(['prepare_data.py', 'demo', f'--out_dir={data}', '--rows=2000'])
    flags = [f'--train_file={data}/train.parquet', f'--validation_file={data}/valid.parquet',
             f'--tokenizer_dir={d}/tok', f'--output_dir={run_dir}', f'--train_state_dir={run_dir}/state',
             f'--model_file={run_dir}/chat_small_t5.{{}}.bin', f'--log_dir={run_dir}/logs',
             *(f'--{k}={v}' for k, v in TINY.items())]
    build_step(['train_low_mem.py', 'train_tokenizer', f'--train_file={data}/train.parquet', f'--tokenizer_dir={d}/tok',
                '--vocab_size=1000'])
    build_step(['train_low_mem.py', 'train', *flags, '--max_steps=20', '--logging_steps=1', '--eval_steps=10',
                '--batch_size_per_gpu=8', '--mixed_precision=no', '--bleu_samples=4'])
    return flags, [f'--output_dir={run_dir}', f'--tokenizer_dir={d}/tok', f'--max_seq_len={TINY["max_seq_len"]}']


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--record_mb', type=int, default=300, help='size of the huge line, value, field and cell')
    parser.add_argument('--log_mb', type=int, default=1024, help='size of the huge log line')
    parser.add_argument('--under_mb', type=int, default=15, help='size of a cell under the record limit')
    parser.add_argument('--group_mb', type=int, default=300, help='text in one row group of 2 KB rows')
    parser.add_argument('--dir', default=None, help='work here (kept) instead of a temporary folder')
    args = parser.parse_args()
    if args.dir == '':  # an unset variable: not the current folder
        parser.error('--dir is empty: give a folder, or leave it out for a temporary one')
    if args.dir:
        from heldout import out_place_problem, refuse_flag

        why = out_place_problem(args.dir, os.path.join('bench', 'out', 'memory'))
        if why:
            refuse_flag('dir', args.dir, why)
    d = args.dir or tempfile.mkdtemp(prefix='bench_memory_')
    try:
        flags, use = build_model(d)
        p = build_inputs(d, args.record_mb << 20, args.log_mb << 20, args.under_mb << 20, args.group_mb << 20)
        out = os.path.join(d, 'out')
        rec, log = f'a {args.record_mb} MB', f'a {args.log_mb} MB'
        under = f'a {args.under_mb} MB Parquet cell, under the limit'
        group = f'a {args.group_mb} MB row group of 2 KB rows'
        cases = [
            ('train', f'{rec} Parquet cell', ['train_low_mem.py', 'train',
                                              *with_flags(flags, train_file=p['big_cell.parquet'])]),
            ('train_tokenizer', f'{rec} Parquet cell', ['train_low_mem.py', 'train_tokenizer', '--vocab_size=1000',
                                                        f'--train_file={p["big_cell.parquet"]}',
                                                        f'--tokenizer_dir={out}_tok']),
            ('generate', f'a {ARG_BYTES // 1000} KB prompt (the longest argument)',
             ['train_low_mem.py', 'generate', *use, f'--prompts={"长" * (ARG_BYTES // 3)}']),
            ('chat', f'{rec} line on stdin', ['train_low_mem.py', 'chat', *use], p['big_line.txt']),
            ('test', f'{rec} Parquet cell', ['train_low_mem.py', 'test', *use, f'--test_file={p["big_cell.parquet"]}']),
            ('plot', f'{log} log line', ['train_low_mem.py', 'plot', f'--log_file={p["big_line.log"]}',
                                         f'--out={out}.png']),
            ('convert', f'{rec} JSONL line', ['prepare_data.py', 'convert', p['big.jsonl'], f'{out}.parquet']),
            ('convert', f'{rec} JSON value', ['prepare_data.py', 'convert', p['big.json'], f'{out}.parquet']),
            ('convert', f'{rec} CSV field', ['prepare_data.py', 'convert', p['big.csv'], f'{out}.parquet']),
            ('convert', f'{rec} Parquet cell', ['prepare_data.py', 'convert', p['big_cell.parquet'], f'{out}.parquet']),
            ('clean', f'{rec} Parquet cell', ['prepare_data.py', 'clean', p['big_cell.parquet'], f'{out}.parquet']),
            ('split', f'{rec} Parquet cell', ['prepare_data.py', 'split', p['big_cell.parquet'],
                                              f'--train_out={out}_t.parquet', f'--valid_out={out}_v.parquet']),
            ('check', f'{rec} Parquet cell', ['prepare_data.py', 'check', p['big_cell.parquet']]),
            ('train', under, ['train_low_mem.py', 'train', '--max_steps=4',
                              *with_flags(flags, train_file=p['cell_under_limit.parquet'], train_state_dir=f'{out}_state',
                                          output_dir=f'{out}_run', model_file=f'{out}_run/m.{{}}.bin')]),
            ('test', under, ['train_low_mem.py', 'test', *use, f'--test_file={p["cell_under_limit.parquet"]}']),
            ('check', under, ['prepare_data.py', 'check', p['cell_under_limit.parquet']]),
            ('train', group, ['train_low_mem.py', 'train', '--max_steps=4',
                              *with_flags(flags, train_file=p['big_group.parquet'], train_state_dir=f'{out}_gstate',
                                          output_dir=f'{out}_grun', model_file=f'{out}_grun/m.{{}}.bin')]),
            ('check', group, ['prepare_data.py', 'check', p['big_group.parquet']]),
            ('convert', group, ['prepare_data.py', 'convert', p['big_group.parquet'], f'{out}_g.parquet']),
        ]
        print('| command | input | exit | what it said | peak RSS |\n|---|---|---|---|---|')
        for name, what, argv, *stdin in cases:
            r = run(argv, *stdin)
            said = r['said'].replace(d, '…').replace('|', '\\|')
            said = said if len(said) <= 110 else said[:107] + '...'
            print(f'| {name} | {what} | {r["code"]} | {said} | {r["peak_mib"]:,.0f} MiB |', flush=True)
    finally:
        if not args.dir:
            shutil.rmtree(d, ignore_errors=True)


if __name__ == '__main__':
    main()
