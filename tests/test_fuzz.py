"""Seeded fuzzing of every reader: hundreds of damaged inputs through `prepare_data.py convert`,
`check`, `split` and `train --dry_run=True`, each ending in exit 0 or exit 2 with exactly one
`error:` line (the dry run: exit 1 "not ready" with the problem listed), never a traceback.

The faces run in process (``main(argv)``, output captured, SystemExit caught, logging reset
between cases) to fit the suite's time; a few cases also run through the real CLI, so the
harness is known to give what a user sees. The limits of model/data/read_guard.py are lowered so
that inputs over them are small.
"""

from __future__ import annotations

import collections
import contextlib
import io
import json
import logging
import os
import random
import sys
import traceback
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest

import prepare_data
import train_low_mem
import cli_runner
from conftest import ENV, ROOT, leftover_temps, make_texts, tiny_flags, write_parquet
from model.prep import records as prep_records
from model.data import read_guard

SEED = 20261205
RECORD_LIMIT = 4096  # read_guard.MAX_RECORD_BYTES during the fuzz run
ROW_GROUP_LIMIT = 32 << 10  # read_guard.MAX_ROW_GROUP_TEXT_BYTES during the fuzz run
READ_CHUNK_BYTES = 512  # the JSON parser's reads: well below RECORD_LIMIT, as 1 MiB is below 16 MiB


@dataclass
class Case:
    name: str
    suffix: str  # the input's extension: the format convert infers
    data: bytes


@dataclass
class Outcome:
    code: object  # the exit status, or 'traceback'
    out: str
    err: str


def run_in_process(main, argv: list[str]) -> Outcome:
    out, err = io.StringIO(), io.StringIO()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    code: object = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main(argv)
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except Exception:  # noqa: BLE001 - what a user would see as a traceback
                traceback.print_exc()
                code = 'traceback'
    finally:  # the face's logging.basicConfig bound a handler to this case's captured stderr
        root.handlers[:] = handlers
        root.setLevel(level)
    return Outcome(code, out.getvalue(), err.getvalue())


def problems_of(outcome: Outcome, command: str, path: str) -> str:
    """'' when the outcome is one a user may see, else what is wrong with it."""
    if outcome.code == 'traceback' or 'Traceback' in outcome.err + outcome.out:
        return 'a traceback'
    lines = [line for line in outcome.err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith('error: ')]
    if outcome.code == 0:
        return 'exit 0 with an error line' if errors else ''
    if outcome.code == 2:
        if len(lines) != 1 or len(errors) != 1:
            return f'exit 2 with {len(lines)} stderr lines'
        return '' if path in errors[0] or command == 'split' else 'the error does not name the input'
    if outcome.code == 1 and command == 'dry_run':  # not ready: the problems are listed
        return '' if 'not ready:' in outcome.out and not errors else 'exit 1 without its problem list'
    return f'exit {outcome.code}'


# --------------------------------------------------------------------------- cases


def parquet_bytes(table: pa.Table, **kwargs) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, **kwargs)
    return sink.getvalue()


def flip(rng: random.Random, data: bytes, lo: int, hi: int, count: int) -> bytes:
    out = bytearray(data)
    for _ in range(count):
        i = rng.randrange(lo, hi)
        out[i] ^= rng.randrange(1, 256)
    return bytes(out)


def invalid_utf8_strings(n: int) -> pa.Array:
    """A string array whose bytes are not UTF-8 (Parquet writers and readers do not check)."""
    values = [b'\xff\xfe' + str(i).encode() for i in range(n)]
    offsets = np.cumsum([0] + [len(v) for v in values], dtype=np.int32)
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets.tobytes()), pa.py_buffer(b''.join(values)))


def parquet_cases(rng: random.Random, pairs) -> list[Case]:
    prompts, responses = [p for p, _ in pairs], [r for _, r in pairs]
    base = parquet_bytes(pa.table({'prompt': prompts, 'response': responses}), row_group_size=20)
    footer = int.from_bytes(base[-8:-4], 'little')
    pages_end = len(base) - 8 - footer
    cases = [Case(f'parquet: page bytes flipped #{i}', '.parquet', flip(rng, base, 4, pages_end, rng.randint(1, 8)))
             for i in range(40)]
    cases += [Case(f'parquet: footer bytes flipped #{i}', '.parquet',
                   flip(rng, base, pages_end, len(base), rng.randint(1, 4))) for i in range(40)]
    cases += [Case(f'parquet: cut at {n}', '.parquet', base[:n]) for n in sorted(rng.sample(range(len(base)), 20))]
    cases += [Case('parquet: empty file', '.parquet', b''), Case('parquet: magic only', '.parquet', b'PAR1'),
              Case('parquet: garbage after the footer', '.parquet', base + b'\x00garbage')]
    n = len(pairs)
    text = pa.array(prompts)
    tables = {
        'renamed column': pa.table({'question': prompts, 'response': responses}),
        'missing column': pa.table({'prompt': prompts}),
        'no columns': pa.table({'x': pa.array([], pa.int64())}).drop(['x']),
        'duplicated column': pa.Table.from_arrays([text, text, pa.array(responses)], ['prompt', 'prompt', 'response']),
        'extra columns': pa.table({'id': range(n), 'prompt': prompts, 'response': responses, 'x': [1.5] * n}),
        'int column': pa.table({'prompt': range(n), 'response': responses}),
        'float column': pa.table({'prompt': [0.5] * n, 'response': responses}),
        'bool column': pa.table({'prompt': [True] * n, 'response': responses}),
        'binary column': pa.table({'prompt': pa.array([p.encode() for p in prompts], pa.binary()),
                                   'response': responses}),
        'list column': pa.table({'prompt': [[p, p] for p in prompts], 'response': responses}),
        'struct column': pa.table({'prompt': [{'a': p} for p in prompts], 'response': responses}),
        'map column': pa.table({'prompt': pa.array([[('k', p)] for p in prompts], pa.map_(pa.string(), pa.string())),
                                'response': responses}),
        'timestamp column': pa.table({'prompt': pa.array([0] * n, pa.timestamp('s')), 'response': responses}),
        'null-typed column': pa.table({'prompt': pa.nulls(n), 'response': responses}),
        'all null': pa.table({'prompt': pa.array([None] * n, pa.string()), 'response': responses}),
        'all blank': pa.table({'prompt': [' \u3000\n'] * n, 'response': [''] * n}),
        'some null': pa.table({'prompt': [p if i % 3 else None for i, p in enumerate(prompts)], 'response': responses}),
        'large_string': pa.table({'prompt': pa.array(prompts, pa.large_string()), 'response': responses}),
        'dictionary': pa.table({'prompt': pa.array(prompts).dictionary_encode(), 'response': responses}),
        'string_view': pa.table({'prompt': pa.array(prompts, pa.string_view()), 'response': responses}),
        'not UTF-8': pa.table({'prompt': invalid_utf8_strings(n), 'response': responses}),
        'one row': pa.table({'prompt': prompts[:1], 'response': responses[:1]}),
        'zero rows': pa.table({'prompt': pa.array([], pa.string()), 'response': pa.array([], pa.string())}),
        'a cell over the row-group limit': pa.table({'prompt': ['长' * ROW_GROUP_LIMIT] + prompts[1:],
                                                     'response': responses}),
        'a row over the record limit': pa.table({'prompt': ['长' * RECORD_LIMIT] + prompts[1:], 'response': responses}),
        'a few rows over the record limit': pa.table({'prompt': ['x' * (2 * RECORD_LIMIT)] * 3,
                                                      'response': ['y'] * 3}),
    }
    cases += [Case(f'parquet: {name}', '.parquet', parquet_bytes(t, row_group_size=20)) for name, t in tables.items()]
    cases.append(Case('parquet: one row a row group', '.parquet',
                      parquet_bytes(pa.table({'prompt': prompts, 'response': responses}), row_group_size=1)))
    sink = io.BytesIO()
    pq.ParquetWriter(sink, pa.schema([('prompt', pa.string()), ('response', pa.string())])).close()
    cases.append(Case('parquet: zero row groups', '.parquet', sink.getvalue()))
    return cases


def text_cases(rng: random.Random, pairs) -> list[Case]:
    records = [{'prompt': p, 'response': r} for p, r in pairs]
    jsonl = ''.join(json.dumps(r, ensure_ascii=False) + '\n' for r in records).encode()
    as_json = json.dumps(records, ensure_ascii=False, indent=1).encode()
    sink = io.BytesIO()
    pcsv.write_csv(pa.Table.from_pylist(records), sink)
    csv = sink.getvalue()
    txt = ''.join(f'{p}{r}\n' for p, r in pairs).encode()  # raw text: one document a line
    cases = []
    for suffix, base in (('.jsonl', jsonl), ('.json', as_json), ('.csv', csv), ('.txt', txt)):
        kind = suffix[1:]
        cases += [Case(f'{kind}: bytes flipped #{i}', suffix, flip(rng, base, 0, len(base), rng.randint(1, 5)))
                  for i in range(20)]
        cases += [Case(f'{kind}: cut at {n}', suffix, base[:n]) for n in sorted(rng.sample(range(len(base)), 10))]
        for i in range(8):
            at = rng.randrange(len(base))
            junk = bytes(rng.randrange(256) for _ in range(rng.randint(1, 6)))
            cases.append(Case(f'{kind}: bytes inserted #{i}', suffix, base[:at] + junk + base[at:]))
        cases += [
            Case(f'{kind}: empty file', suffix, b''),
            Case(f'{kind}: whitespace only', suffix, b' \n\r\n\t'),
            Case(f'{kind}: UTF-8 BOM', suffix, b'\xef\xbb\xbf' + base),
            Case(f'{kind}: UTF-16 with BOM', suffix, base.decode().encode('utf-16')),
            Case(f'{kind}: GBK', suffix, base.decode().encode('gbk', 'replace')),
            Case(f'{kind}: CRLF', suffix, base.replace(b'\n', b'\r\n')),
            Case(f'{kind}: NUL byte', suffix, base.replace(b'\n', b'\n\x00', 1)),
            Case(f'{kind}: NUL byte in a value', suffix, base.replace('，'.encode(), b'\x00', 1)),
            Case(f'{kind}: lone surrogate escape', suffix, base.replace('，'.encode(), b'\\ud800', 1)),
            Case(f'{kind}: broken \\u escape', suffix, base.replace('，'.encode(), b'\\u12', 1)),
            Case(f'{kind}: \\x escape', suffix, base.replace('，'.encode(), b'\\x41', 1)),
            Case(f'{kind}: a value over the record limit', suffix,
                 base.replace('，'.encode(), ('长' * RECORD_LIMIT).encode(), 1)),
        ]

    def lines(*values) -> bytes:
        return ''.join(json.dumps(v, ensure_ascii=False) + '\n' for v in values).encode()

    good = records[0]
    structural = {
        'nested object value': {'prompt': {'a': 1}, 'response': 'x'},
        'list value': {'prompt': ['a', 'b'], 'response': 'x'},
        'number values': {'prompt': 12, 'response': 3.5},
        'bool and null': {'prompt': True, 'response': None},
        'missing key': {'prompt': 'x'},
        'renamed key': {'question': 'x', 'response': 'y'},
        'a list record': ['x', 'y'],
        'a string record': 'x',
        'a number record': 7,
    }
    for name, value in structural.items():
        cases.append(Case(f'jsonl: {name}', '.jsonl', lines(good, value, good)))
        cases.append(Case(f'json: {name}', '.json', json.dumps([good, value], ensure_ascii=False).encode()))
    cases += [
        Case('jsonl: NaN and Infinity', '.jsonl', b'{"prompt": NaN, "response": Infinity}\n'),
        Case('json: NaN', '.json', b'[{"prompt": NaN, "response": "x"}]'),
        Case('jsonl: deeply nested', '.jsonl', b'{"prompt": ' + b'[' * 1500 + b']' * 1500 + b', "response": 1}\n'),
        Case('json: deeply nested', '.json', b'[' * 1500 + b']' * 1500),
        Case('jsonl: duplicate keys', '.jsonl', b'{"prompt": "a", "prompt": "b", "response": "c"}\n'),
        Case('jsonl: a line over the record limit', '.jsonl', lines(good, {'prompt': 'x' * RECORD_LIMIT, 'response': 'y'})),
        Case('json: a record over the record limit', '.json',
             json.dumps([good, {'prompt': 'x' * 2 * RECORD_LIMIT, 'response': 'y'}]).encode()),
        Case('json: trailing garbage', '.json', as_json + b' ]x'),
        Case('json: two values', '.json', json.dumps(good).encode() + b' ' + json.dumps(good).encode()),
        Case('json: a scalar', '.json', b'"just a string"'),
        Case('json: orient columns', '.json', b'{"prompt": {"0": "a", "1": "b"}, "response": {"0": "c"}}'),
        Case('json: orient index', '.json', b'{"0": {"prompt": "a", "response": "b"}, "1": {"prompt": 1}}'),
        Case('json: orient split', '.json', b'{"columns": ["prompt", "response"], "index": [0], "data": [["a", "b"], 5]}'),
        Case('json: orient table', '.json', b'{"schema": {}, "data": [{"prompt": "a", "response": "b"}, 3]}'),
        Case('json: one record', '.json', json.dumps(good).encode()),
        Case('csv: duplicated header', '.csv', b'prompt,prompt,response\na,b,c\n'),
        Case('csv: missing column', '.csv', b'prompt,answer\na,b\n'),
        Case('csv: a row with more fields', '.csv', b'prompt,response\na,b\nc,d,e\n'),
        Case('csv: a row with fewer fields', '.csv', b'prompt,response\na,b\nc\n'),
        Case('csv: unclosed quote', '.csv', b'prompt,response\n"a,b\nc,d\n'),
        Case('csv: unclosed quote over the record limit', '.csv', b'prompt,response\n"a,b\n' + b'c,d\n' * RECORD_LIMIT),
        Case('csv: header only', '.csv', b'prompt,response\n'),
        Case('csv: tab separated', '.csv', b'prompt\tresponse\na\tb\n'),
    ]
    return cases


def build_cases() -> list[Case]:
    rng = random.Random(SEED)
    pairs = make_texts(40, seed=SEED % 1000, max_len=30)
    return parquet_cases(rng, pairs) + text_cases(rng, pairs)


# --------------------------------------------------------------------------- the run


def commands(case_path: str, out: str, dry_run_flags) -> list[tuple[str, object, list[str]]]:
    """(name, main, argv) of each command a case goes through."""
    converted = os.path.join(out, 'converted.parquet')
    if not case_path.endswith('.parquet'):
        return [('convert', prepare_data.main, ['convert', case_path, converted])]
    return [
        ('convert', prepare_data.main, ['convert', case_path, converted]),
        ('check', prepare_data.main, ['check', case_path]),
        ('split', prepare_data.main, ['split', case_path, f'--train_out={out}/train.parquet',
                                      f'--valid_out={out}/valid.parquet', '--valid_ratio=0.5']),
        ('dry_run', train_low_mem.main, ['train', *dry_run_flags(case_path), '--dry_run=True']),
    ]


@pytest.fixture(scope='module')
def fuzz_run(tmp_path_factory, tokenizer_dir):
    """Every case through every command, in process: {(case, command): Outcome}, the paths."""
    mp = pytest.MonkeyPatch()
    mp.setattr(read_guard, 'MAX_RECORD_BYTES', RECORD_LIMIT)
    mp.setattr(read_guard, 'MAX_ROW_GROUP_TEXT_BYTES', ROW_GROUP_LIMIT)
    mp.setattr(prep_records, 'READ_CHUNK_BYTES', READ_CHUNK_BYTES)
    root = tmp_path_factory.mktemp('fuzz')
    out = str(root / 'out')
    os.makedirs(out)
    valid = write_parquet(root / 'valid.parquet', make_texts(16, seed=3, max_len=30))

    def dry_run_flags(train):
        return tiny_flags({'train': train, 'valid': valid, 'tok': tokenizer_dir}, f'{out}/run', batch_size_per_gpu=4)

    outcomes: dict[tuple[str, str], Outcome] = {}
    paths: dict[str, str] = {}
    try:
        for i, case in enumerate(build_cases()):
            path = str(root / f'case{i:03d}{case.suffix}')
            with open(path, 'wb') as f:
                f.write(case.data)
            paths[case.name] = path
            for name, main, argv in commands(path, out, dry_run_flags):
                outcomes[case.name, name] = run_in_process(main, argv)
            converted = os.path.join(out, 'converted.parquet')
            if case.suffix != '.parquet' and outcomes[case.name, 'convert'].code == 0:
                outcomes[case.name, 'check of the output'] = run_in_process(prepare_data.main, ['check', converted])
    finally:
        mp.undo()
    return outcomes, paths, out, dry_run_flags


def test_every_damaged_input_ends_in_one_line_or_success(fuzz_run):
    outcomes, paths, out, _ = fuzz_run
    failures = []
    for (case, command), outcome in outcomes.items():
        problem = problems_of(outcome, command.split()[0] if command != 'dry_run' else command, paths[case])
        if problem:
            failures.append(f'{case} | {command}: {problem}\n{(outcome.err or outcome.out)[-1500:]}')
    codes = collections.Counter(o.code for o in outcomes.values())
    print(f'\nfuzz: {len(paths)} cases, {len(outcomes)} runs: exit 0 {codes[0]}, exit 1 (dry run not ready) '
          f'{codes[1]}, exit 2 {codes[2]}, other {len(outcomes) - codes[0] - codes[1] - codes[2]}')
    assert not failures, f'{len(failures)} of {len(outcomes)} runs failed:\n' + '\n'.join(failures[:5])
    assert len(paths) >= 300 and codes[0] >= 50 and codes[2] >= 300  # both outcomes exercised, at scale
    assert leftover_temps(out) == []


def test_the_harness_gives_what_the_cli_gives(fuzz_run):
    """A few cases through the real CLI: the same exit status and error line as in process."""
    outcomes, paths, out, dry_run_flags = fuzz_run
    chosen = [('parquet: footer bytes flipped #3', 'check'), ('jsonl: CRLF', 'convert'),
              ('csv: missing column', 'convert'), ('parquet: renamed column', 'dry_run')]
    for case, command in chosen:
        expected = outcomes[case, command]
        argv = next(a for name, _, a in commands(paths[case], out, dry_run_flags) if name == command)
        script = 'train_low_mem.py' if command == 'dry_run' else 'prepare_data.py'
        r = cli_runner.run([sys.executable, script, *argv], cwd=ROOT, env=ENV, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == expected.code, (case, r.stderr[-2000:])
        errors = [line for line in r.stderr.splitlines() if line.startswith('error: ')]
        assert errors == [line for line in expected.err.splitlines() if line.startswith('error: ')], case
        if command == 'dry_run':
            assert 'not ready:' in r.stdout and 'missing column' in r.stdout

