"""The train_low_mem.py face, run as a user runs it: in a subprocess (forked from a pre-imported
zygote, tests/cli_runner.py; the plain subprocess.run calls here are the real interpreter's)."""

import os
import re
import subprocess
import sys

import pytest

import cli_runner
from conftest import ENV, ROOT, make_texts, write_parquet


def cli(*args, script='train_low_mem.py', timeout=300):
    return cli_runner.run([sys.executable, script, *args], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize('args,needle', [
    (['train', '--use_large_config=True', '--max_seq_lenn=128'],
     'unknown option --max_seq_lenn; did you mean --max_seq_len?'),
    (['train', '--batch_size_per_gpu=abc'], 'expected an integer for batch_size_per_gpu'),
    (['train', '--epochs=1.5'], 'expected an integer for epochs'),
    (['train', '--learn_rate=fast'], 'expected a number for learn_rate'),
    (['train', '--preset=huge'], "unknown preset 'huge'"),
    (['train', '--is_keep_trainin=True'], 'did you mean --is_keep_training?'),
    (['train_tokenizer', '--vocab_sise=8000'], 'did you mean --vocab_size?'),
    (['train', '--preset=demo', 'epochs=2'], "unexpected argument 'epochs=2'"),  # not silently dropped
    (['generate', 'hello'], "unexpected argument 'hello'"),
    (['train', '--preset=demo', '--dry_run=True', '--rows_per_s=-5'], '--rows_per_s=-5'),
    (['generate', '--num_beams=100000'], '--num_beams=100000: give 1 to 64'),
    (['chat', '--temperature=0.5'], '--temperature applies to sampling only'),
    (['test', '--top_k=-3'], '--top_k=-3'),
    # what follows '--' Fire reads and drops: this one trained the preset's whole run into its default folder
    (['train', '--preset=demo', '--', '--dry_run=True'], "unexpected argument '--'"),
])
def test_user_errors_exit_2_with_one_line(args, needle):
    r = cli(*args)
    assert r.returncode == 2, r.stderr
    assert 'Traceback' not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0], r.stderr


def test_a_process_count_that_is_not_a_number_is_one_line():
    r = subprocess.run([sys.executable, 'train_low_mem.py', 'train', '--preset=demo', '--dry_run=True'], cwd=ROOT,
                       env={**ENV, 'NUM_GPUS': 'x'}, capture_output=True, text=True, timeout=300)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1 and 'NUM_GPUS=x' in lines[0], r.stderr


def test_dry_run_lists_what_is_missing_with_commands(tmp_path):
    r = cli('train', '--use_large_config=True', '--max_seq_len=128', '--dry_run=True',
            f'--train_file={tmp_path}/train.parquet', f'--validation_file={tmp_path}/valid.parquet',
            f'--tokenizer_dir={tmp_path}/tok')
    assert r.returncode == 1, r.stderr
    out = r.stdout
    assert 'max_seq_len                      128   <- flag' in out
    assert 'epochs                           3\n' in out  # a default, unmarked
    assert 'not ready' in out
    assert 'python prepare_data.py split' in out and 'train_low_mem.py train_tokenizer' in out
    assert f'path.train_file={tmp_path}/train.parquet' in out
    assert 'path.states_moved_to=' not in out and 'run.previous_items=' not in out  # not judged: not ready


@pytest.mark.slow
def test_train_tokenizer_then_dry_run_is_ready(tmp_path):
    train = write_parquet(tmp_path / 'train.parquet', make_texts(600, seed=5))
    valid = write_parquet(tmp_path / 'valid.parquet', make_texts(100, seed=6))
    tok = tmp_path / 'tok'
    r = subprocess.run([sys.executable, 'train_low_mem.py', 'train_tokenizer', f'--train_file={train}',
                        f'--tokenizer_dir={tok}', '--vocab_size=900'], cwd=ROOT, env=ENV, capture_output=True,
                       text=True, timeout=300)  # the real interpreter: this command's smoke test
    assert r.returncode == 0, r.stderr
    assert 'tokenizer: 900 pieces + 100 T5 sentinels (pad 0, eos 1, unk 2)' in r.stdout
    check = ('from transformers import AutoTokenizer; t = AutoTokenizer.from_pretrained(%r); '
             'assert len(t) == 1000 and t.is_fast' % str(tok))
    subprocess.run([sys.executable, '-c', check], env=ENV, check=True)
    r = cli('train', '--dry_run=True', f'--train_file={train}', f'--validation_file={valid}',
            f'--tokenizer_dir={tok}', '--batch_size_per_gpu=8', '--gradient_accumulation_steps=1',
            '--epochs=2')
    assert r.returncode == 0, r.stdout + r.stderr
    assert 'ready: data, tokenizer and output places checked' in r.stdout
    assert 'train rows 600' in r.stdout and '150 optimizer steps over 2 epoch(s)' in r.stdout  # 600 // 8 * 2
    assert re.search(r'\n  run\.previous_items=\d+  \(', r.stdout) and '\n  path.states_moved_to=' in r.stdout
    r = cli('train', '--dry_run=True', f'--train_file={train}', f'--validation_file={valid}',
            f'--tokenizer_dir={tok}', '--batch_size_per_gpu=8', '--gradient_accumulation_steps=1', '--epochs=3',
            '--max_steps=15')
    assert '15 optimizer steps (--max_steps=15: 0.2 epoch(s) of 75 steps, not the 3 of --epochs)' in r.stdout, r.stdout


def test_the_demos_dry_run_shows_the_schedule_or_why_it_is_not_ready(tmp_path):
    """scripts/demo.sh filters its dry run: it showed the last three lines of the resource estimates,
    and (set -euo pipefail) a dry run that was not ready stopped the demo without its reasons."""
    import re

    line = next(x for x in open(f'{ROOT}/scripts/demo.sh', encoding='utf-8') if '--dry_run=True' in x)
    program = re.search(r"\| sed -n '([^']*)'", line).group(1)  # the demo's own filter
    train = write_parquet(tmp_path / 'train.parquet', make_texts(40, seed=1))
    for given, kept, dropped in (
            ([f'--train_file={tmp_path}/none.parquet'], ['not ready:', 'none.parquet: no such file'], ['[schedule]']),
            ([f'--train_file={train}', f'--validation_file={train}', f'--tokenizer_dir={tmp_path}/tok'],
             ['not ready:', 'no tokenizer here', 'train_tokenizer'], ['[resources]'])):
        dry = cli('train', '--preset=demo', *given, '--dry_run=True')
        shown = subprocess.run(['sed', '-n', program], input=dry.stdout, capture_output=True, text=True).stdout
        assert all(k in shown for k in kept) and not any(d in shown for d in dropped), shown
    ready = '[schedule]\n  train rows 9; ...\n[resources] estimates\n  GPU memory ...\nnote: x\nready: data\n'
    shown = subprocess.run(['sed', '-n', program], input=ready, capture_output=True, text=True).stdout
    assert shown == '[schedule]\n  train rows 9; ...\nready: data\n'


def test_text_values_reach_the_program_as_typed(tmp_path):
    """Fire reads a flag's value as a Python literal where it parses as one: --output_dir=2024_12_07
    (a run named by its date) trained into 20241207, 1e3 into 1000.0, 0x10 into 16; a positional
    path of prepare_data.py the same. Text flags and paths now reach the program as typed."""
    from model.cli import keep_text

    assert keep_text(['--output_dir=2024_12_07', '--epochs=2', '--preset', 'demo', 'x', '--', '1e3'],
                     {'output_dir', 'preset'}) == ["--output_dir='2024_12_07'", '--epochs=2', '--preset', "'demo'",
                                                   'x', '--', '1e3']
    assert keep_text(['in.csv', '0x10', '--text_col=1e3', '--quoting', '--epochs=1'], {'text_col', 'quoting'},
                     positional=True) == ["'in.csv'", "'0x10'", "--text_col='1e3'", '--quoting', '--epochs=1']
    # a number flag's value in the space form is left to Fire ('--rows 1e3' is 1000), a text flag's may start with '-'
    assert keep_text(['in.csv', '--rows', '1e3', '--out_dir', '-1e3', '--dry_run', '--x=1'], {'out_dir'},
                     positional=True) == ["'in.csv'", '--rows', '1e3', '--out_dir', "'-1e3'", '--dry_run', '--x=1']
    # --prompts as typed: a list written as JSON or as Python literals, else one prompt, whatever it looks like
    from train_low_mem import TEXT_FLAGS, parse_prompts
    assert 'prompts' in TEXT_FLAGS
    assert [parse_prompts(p) for p in ('1e3', 'hello, world', '["你好","1+1="]', "['a', 'b']", '[not a list')] == [
        ['1e3'], ['hello, world'], ['你好', '1+1='], ['a', 'b'], ['[not a list']]
    for typed in ('2024_12_07', '1e3', '0x10', "it's"):
        r = cli_runner.run([sys.executable, f'{ROOT}/train_low_mem.py', 'train', '--preset=demo', f'--output_dir={typed}',
                            '--dry_run=True'], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
        said = re.search(r"train_state_dir +['\"](.*)/train_latest_state['\"]", r.stdout)
        assert said and said.group(1) == f'{tmp_path}/{typed}', (typed, r.stdout[-2000:], r.stderr[-2000:])
    (tmp_path / '2024_12').mkdir()  # a folder of Parquet files, named by its month
    write_parquet(tmp_path / '2024_12' / 'part.parquet', make_texts(20, seed=5))
    r = cli_runner.run([sys.executable, f'{ROOT}/prepare_data.py', 'check', '2024_12'], cwd=tmp_path, env=ENV,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and '202412' not in r.stdout + r.stderr, (r.stdout, r.stderr)
    r = cli_runner.run([sys.executable, f'{ROOT}/prepare_data.py', 'demo', '--out_dir', 'd1', '--rows', '1e3'],
                       cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and os.path.exists(tmp_path / 'd1' / 'train.parquet'), r.stderr  # it said rows='1e3'
    r = cli_runner.run([sys.executable, f'{ROOT}/prepare_data.py', 'check', '2024_12', '--', '--x'], cwd=tmp_path,
                       env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "unexpected argument '--'" in r.stderr, r.stderr
