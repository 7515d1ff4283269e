"""Nothing a user owns is lost to prepare_data.py, and its mistakes are one line (the real CLI in
a subprocess, as a user runs it: exit 2, one line naming the thing and what to do, no traceback,
nothing that existed before changed). The training side: tests/test_nothing_lost.py."""

from __future__ import annotations

import json
import os

import pyarrow.parquet as pq
import pytest

from conftest import assert_user_error, cli, make_texts, run_parallel, run_train, snapshot, tiny_flags, write_parquet


def test_prepare_data_never_replaces_an_input_or_a_foreign_file(tmp_path):
    pairs = make_texts(50, seed=4)
    src = tmp_path / 'a.jsonl'
    src.write_text(''.join(json.dumps({'prompt': p, 'response': r}, ensure_ascii=False) + '\n' for p, r in pairs),
                   encoding='utf-8')
    d = tmp_path / 'd.parquet'
    write_parquet(d, pairs)
    folder = tmp_path / 'parts'
    folder.mkdir()
    write_parquet(folder / 'p1.parquet', pairs)
    foreign = tmp_path / 'foreign.parquet'
    write_parquet(foreign, pairs[:3])
    (tmp_path / 'outdir').mkdir()
    before = snapshot(tmp_path)
    py = 'prepare_data.py'
    results = run_parallel([
        ('convert same', ['convert', src, src], py),
        ('convert same parquet', ['convert', d, d], py),
        ('clean same', ['clean', d, d], py),
        ('split train=input', ['split', d, f'--train_out={d}', f'--valid_out={tmp_path / "v.parquet"}'], py),
        ('split valid=input', ['split', d, f'--train_out={tmp_path / "t.parquet"}', f'--valid_out={d}'], py),
        ('clean into input folder', ['clean', folder, folder / 'clean.parquet'], py),
        ('clean into input glob', ['clean', f'{tmp_path}/*.parquet', tmp_path / 'x.parquet'], py),
        ('foreign output', ['convert', src, foreign], py),
        ('output is a folder', ['convert', src, tmp_path / 'outdir'], py),
        ('output under a file', ['convert', src, src / 'x.parquet'], py),
        ('demo over foreign', ['demo', f'--out_dir={tmp_path}', '--rows=20'], py),
        ('missing positional', ['convert', src], py),
    ])
    assert_user_error(results['convert same'], 'also an input')
    assert_user_error(results['convert same parquet'], 'also an input')
    assert_user_error(results['clean same'], 'also an input')
    assert_user_error(results['split train=input'], 'also an input')
    assert_user_error(results['split valid=input'], 'also an input')
    assert_user_error(results['clean into input folder'], 'input folder')
    assert_user_error(results['clean into input glob'], 'input pattern')
    assert_user_error(results['foreign output'], 'not written by this toolkit')
    assert_user_error(results['output is a folder'], 'is a folder')
    assert_user_error(results['output under a file'], 'is a file')
    assert_user_error(results['missing positional'], 'OUTPUT')
    # demo's outputs train.parquet / valid.parquet do not exist in tmp_path: only a real clash is refused
    assert results['demo over foreign'][0] == 0, results['demo over foreign'][1]
    after = snapshot(tmp_path)
    for name in ('train.parquet', 'valid.parquet'):
        after.pop(name)
    assert after == before
    # a file it wrote, it may replace: the same command twice works
    out = tmp_path / 'out.parquet'
    for _ in range(2):
        r = cli('convert', src, out, script=py)
        assert r.returncode == 0, r.stderr
    assert pq.read_table(out).num_rows == 50


def test_dictionary_string_view_and_null_columns_are_text(tmp_path, data):
    import pandas as pd

    pairs = make_texts(40, seed=5)
    df = pd.DataFrame({'question': pd.Categorical([p for p, _ in pairs]),
                       'answer': pd.array([r for _, r in pairs], dtype='string[pyarrow]')})
    df.to_parquet(tmp_path / 'cat.parquet')
    r = cli('convert', tmp_path / 'cat.parquet', tmp_path / 'out.parquet', '--prompt_col=question',
            '--response_col=answer', script='prepare_data.py')
    assert r.returncode == 0, r.stderr
    assert pq.read_table(tmp_path / 'out.parquet').column('prompt').to_pylist() == [p for p, _ in pairs]
    # training reads a dictionary-encoded column as it is
    cat = tmp_path / 'train_cat.parquet'
    pd.DataFrame({'prompt': pd.Categorical([p for p, _ in pairs] * 6),
                  'response': [r for _, r in pairs] * 6}).to_parquet(cat)
    flags = tiny_flags(data, tmp_path / 'run', train_file=cat, max_steps=3)
    r = cli('train', *flags, '--dry_run=True')
    assert r.returncode == 0 and 'ready' in r.stdout, r.stdout + r.stderr
    r = run_train(flags)
    assert r.returncode == 0, r.stderr[-2000:]



@pytest.mark.parametrize('orient', ['records', 'columns', 'index', 'split', 'table', 'values', 'lines', 'json.dump'])
def test_every_json_layout_pandas_or_json_writes_converts(tmp_path, orient):
    import pandas as pd

    pairs = make_texts(30, seed=9)
    df = pd.DataFrame({'q': [p for p, _ in pairs], 'a': [r for _, r in pairs]})
    src = tmp_path / ('in.jsonl' if orient == 'lines' else 'in.json')
    if orient == 'json.dump':  # JSONL from the standard library: a missing float is written as NaN
        records = df.to_dict('records')
        records[3]['a'] = float('nan')
        src = tmp_path / 'in.jsonl'
        src.write_text(''.join(json.dumps(r, ensure_ascii=False) + '\n' for r in records), encoding='utf-8')
    elif orient == 'lines':
        df.to_json(src, orient='records', lines=True, force_ascii=False)
    else:
        df.to_json(src, orient=orient, force_ascii=False)
    cols = ['--prompt_col=0', '--response_col=1'] if orient == 'values' else ['--prompt_col=q', '--response_col=a']
    r = cli('convert', src, tmp_path / 'out.parquet', *cols, script='prepare_data.py')
    assert r.returncode == 0, r.stderr
    table = pq.read_table(tmp_path / 'out.parquet')
    want = [r for _, r in pairs]
    if orient == 'json.dump':
        want[3] = None
    assert table.column('prompt').to_pylist() == [p for p, _ in pairs]
    assert table.column('response').to_pylist() == want


@pytest.mark.slow
def test_nan_in_a_json_list_is_one_line_with_its_line_number(tmp_path):
    src = tmp_path / 'nan.json'
    src.write_text(json.dumps([{'q': '问', 'a': '答'}, {'q': '问二', 'a': float('nan')}], indent=1), encoding='utf-8')
    r = cli('convert', src, tmp_path / 'out.parquet', '--prompt_col=q', '--response_col=a', script='prepare_data.py')
    assert_user_error(r, 'line 8', 'NaN is not JSON')
    assert not os.path.exists(tmp_path / 'out.parquet')
