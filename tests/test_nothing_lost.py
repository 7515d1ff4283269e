"""Nothing a user owns is lost, and every mistake knowable at start-up is caught before the work.

Each case runs the real CLI in a subprocess, as a user would, and checks: exit 2, one line
naming the thing and what to do, no traceback, and nothing that existed before changed.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import cli_runner
from config import resolve_config
from model.state.model_files import model_record
from conftest import (ENV, ROOT, assert_user_error, cli, logged_losses, make_texts, run_logs, run_parallel, run_train,
                      snapshot, start, state_folders, tiny_flags, train_cmd, write_parquet)


@pytest.fixture(scope='module')
def trained(tmp_path_factory, data):
    """A tiny finished run: states, step files, best/ and final/."""
    out = tmp_path_factory.mktemp('trained') / 'run'
    r = run_train(tiny_flags(data, out, max_steps=10, save_steps=5, eval_steps=5))
    assert r.returncode == 0, r.stderr[-3000:]
    return out


# --------------------------------------------------------------------------- train_tokenizer


def test_train_tokenizer_never_deletes_what_it_did_not_make(tmp_path, data):
    user = tmp_path / 'user'
    (user / 'data').mkdir(parents=True)
    write_parquet(user / 'data' / 'train.parquet', make_texts(300, seed=3))
    (user / 'notes.txt').write_text('mine')
    checkout = tmp_path / 'checkout'
    (checkout / '.git').mkdir(parents=True)
    (checkout / '.git' / 'HEAD').write_text('ref: refs/heads/main\n')
    (checkout / 'README.md').write_text('x')
    before = snapshot(tmp_path)
    train = user / 'data' / 'train.parquet'
    results = run_parallel([
        ('data folder', ['train_tokenizer', f'--train_file={train}', f'--tokenizer_dir={user / "data"}',
                         '--vocab_size=900'], 'train_low_mem.py'),
        ('checkout', ['train_tokenizer', f'--train_file={train}', f'--tokenizer_dir={checkout}',
                      '--vocab_size=900'], 'train_low_mem.py'),
        ('a file', ['train_tokenizer', f'--train_file={train}', f'--tokenizer_dir={user / "notes.txt"}',
                    '--vocab_size=900'], 'train_low_mem.py'),
    ])
    assert_user_error(results['data folder'], str(user / 'data'), 'not empty')
    assert_user_error(results['checkout'], str(checkout), 'did not make')
    assert_user_error(results['a file'], 'is a file')
    assert snapshot(tmp_path) == before
    # its own tokenizer folder it replaces (twice: the same command again), in place
    tok = tmp_path / 'tok'
    for _ in range(2):
        r = cli('train_tokenizer', f'--train_file={train}', f'--tokenizer_dir={tok}', '--vocab_size=900')
        assert r.returncode == 0, r.stderr
        assert json.loads((tok / 'chat_small_t5.json').read_text())['kind'] == 'tokenizer'
    assert not [n for n in os.listdir(tmp_path) if n.startswith('.tmp')]


def test_generate_on_a_state_folder_explains_instead_of_suggesting_train_tokenizer(trained):
    state = os.path.join(trained, 'state', state_folders(f'{trained}/state')[-1])
    before = snapshot(trained)
    line = assert_user_error(cli('generate', f'--model_dir={state}'), 'training state', 'best')
    assert 'train_tokenizer' not in line
    assert_user_error(cli('generate', f'--model_dir={trained}/nowhere'), 'no such file or folder')
    assert snapshot(trained) == before


# --------------------------------------------------------------------------- train: start-up checks


def test_mistakes_are_caught_before_the_work_and_by_the_dry_run(tmp_path, data):
    user = tmp_path / 'user'
    user.mkdir()
    (user / 'notes.txt').write_text('mine')
    a_file = tmp_path / 'a_file'
    a_file.write_text('x')
    blank = write_parquet(tmp_path / 'blank.parquet', [('', '答'), ('  ', ' '), ('问', '\u3000')] * 5)
    null_prompts = tmp_path / 'nulls.parquet'
    pq.write_table(pa.table({'prompt': pa.nulls(200, pa.string()),
                             'response': [r for _, r in make_texts(200, seed=1)]}), null_prompts)
    empty_tok = tmp_path / 'empty_tok'
    empty_tok.mkdir()
    (empty_tok / 'tokenizer.json').write_text('')
    out = tmp_path / 'run'
    cases = {
        'state dir is a file': ({'train_state_dir': a_file}, ['train_state_dir', 'is a file']),
        'state dir holds user files': ({'train_state_dir': user}, ['train_state_dir', str(user)]),
        'output_dir under a file': ({'output_dir': a_file / 'out'}, ['output_dir', 'is a file']),
        'log_dir under a file': ({'log_dir': a_file / 'logs'}, ['log_dir', 'is a file']),
        'validation all blank': ({'validation_file': blank}, ['validation_file', 'no usable row']),
        'prompts all null': ({'train_file': null_prompts}, ['train_file', 'no usable row']),
        'model_file no {}': ({'model_file': f'{out}/m.{{step}}.bin'}, ['model_file', "'{}'"]),
        'model_file pattern': ({'model_file': f'{out}/m.{{}}.{{x}}.bin'}, ['model_file', "'{}' exactly once"]),
        'model_file two braces': ({'model_file': f'{out}/m.{{}}.{{}}.bin'}, ['model_file', 'exactly once']),
        'empty tokenizer.json': ({'tokenizer_dir': empty_tok}, ['tokenizer.json', 'not a valid tokenizer']),
        'missing tokenizer': ({'tokenizer_dir': tmp_path / 'none'}, ['no tokenizer here', 'train_tokenizer']),
        'missing train file': ({'train_file': tmp_path / 'none.parquet'}, ['train_file', 'no such file']),
        'bleu_samples unbounded': ({'bleu_samples': 10**9}, ['bleu_samples', 'at most']),
    }
    before = snapshot(tmp_path)
    procs = []
    for name, (extra, words) in cases.items():
        flags = tiny_flags(data, out, **extra)
        procs.append((name, words, start('train', *flags), start('train', *flags, '--dry_run=True')))
    for name, words, run, dry in procs:
        stdout, stderr = run.communicate(timeout=300)
        assert_user_error((run.returncode, stderr), *words)
        dry_out, dry_err = dry.communicate(timeout=300)
        if dry.returncode == 2:  # a config value error: the dry run says the same line
            assert_user_error((dry.returncode, dry_err), *words)
        else:
            assert dry.returncode == 1 and 'not ready' in dry_out, (name, dry_out, dry_err)
            assert all(w in dry_out for w in words), (name, words, dry_out)
    assert snapshot(tmp_path) == before  # nothing created, moved or changed by any of them


def test_a_fresh_run_moves_only_its_own_previous_run_and_only_after_the_checks(tmp_path, data):
    out = tmp_path / 'run'
    assert run_train(tiny_flags(data, out, max_steps=5, save_steps=5)).returncode == 0
    before = snapshot(out)
    # a mistake in the new command: nothing of the previous run is moved
    r = run_train(tiny_flags(data, out, max_steps=5, tokenizer_dir=tmp_path / 'missing'))
    assert_user_error(r, 'no tokenizer here')
    assert snapshot(out) == before
    r = run_train(tiny_flags(data, out, max_steps=5), '--is_keep_training=True')  # the advice still works
    assert r.returncode == 0, r.stderr[-2000:]
    # a file of the user's beside the run's outputs, and one matching the model_file pattern
    (out / 'my_notes.txt').write_text('mine')
    (out / 'chat_small_t5.999.bin').write_bytes(b'my own weights')
    r = run_train(tiny_flags(data, out, max_steps=5))
    assert_user_error(r, 'chat_small_t5.999.bin', 'not written by this toolkit')
    os.remove(out / 'chat_small_t5.999.bin')
    # the previous run's best/ scored by `test`: its predictions go with it, never stay beside the new best/
    r = cli('test', f'--output_dir={out}', f'--test_file={data["valid"]}', '--max_test_rows=4')
    assert r.returncode == 0 and os.path.exists(out / 'best.predictions.valid.jsonl'), r.stderr[-2000:]
    # a step file scored, then pruned (as a later save of the run would): its predictions go too
    r = cli('test', f'--model_dir={out}/chat_small_t5.5.bin', f'--tokenizer_dir={data["tok"]}',
            f'--test_file={data["valid"]}', '--max_test_rows=4')
    assert r.returncode == 0 and os.path.exists(out / 'chat_small_t5.5.bin.predictions.valid.jsonl'), r.stderr[-2000:]
    from model.state.markers import WEIGHTS
    from model.state.writes import remove_owned

    remove_owned(str(out / 'chat_small_t5.5.bin'), WEIGHTS)  # as pruning does: only the toolkit's unchanged file
    (out / 'best.predictions.mine.jsonl').write_text('{"mine": 1}\n')  # named alike, not the toolkit's: stays
    # final/ scored into a file named as best/'s: it scores another model, so it does not go with best/
    r = cli('test', f'--model_dir={out}/final', f'--test_file={data["valid"]}', '--max_test_rows=4',
            f'--out={out}/best.predictions.final.jsonl')
    assert r.returncode == 0, r.stderr[-2000:]
    r = run_train(tiny_flags(data, out, max_steps=5))
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / 'my_notes.txt').read_text() == 'mine'
    archived = glob.glob(f'{out}/previous_runs/*/')
    assert len(archived) == 1 and os.path.isdir(f'{archived[0]}/best')
    assert os.path.exists(f'{archived[0]}/best.predictions.valid.jsonl')
    assert os.path.exists(f'{archived[0]}/chat_small_t5.5.bin.predictions.valid.jsonl')
    assert sorted(n for n in os.listdir(out) if '.predictions.' in n) == ['best.predictions.final.jsonl',
                                                                         'best.predictions.mine.jsonl']
    # each one left is said, with why: beside the new best/, neither describes it
    assert f'{out}/best.predictions.final.jsonl is named as the predictions of a model this run writes there, ' \
           f'but it scores {out}/final' in r.stderr, r.stderr[-3000:]
    assert f'{out}/best.predictions.mine.jsonl is named as' in r.stderr and '`test` did not write it' in r.stderr
    # the moved run continues where it now is, as the run says, beside the new one and apart from it
    advice = shlex.split(r.stderr.split('apart from this run\'s): ')[1].splitlines()[0])
    assert advice[0] == '--is_keep_training=True' and advice[1] == f'--output_dir={archived[0].rstrip("/")}', advice
    new_best = snapshot(out / 'best')
    given = {a.split('=')[0] for a in advice}
    r = run_train([f for f in tiny_flags(data, out, max_steps=8) if f.split('=')[0] not in given], *advice)
    assert r.returncode == 0 and f'resumed from {archived[0]}' in r.stderr, r.stderr[-2000:]
    assert snapshot(out / 'best') == new_best and os.path.exists(f'{archived[0]}/chat_small_t5.8.bin')


def test_states_kept_in_the_output_folder_itself_or_around_it_survive_a_second_run_and_resume(tmp_path, data):
    out = tmp_path / 'run'
    flags = tiny_flags(data, out, train_state_dir=out, max_steps=10)
    for _ in range(2):  # the second moves the first aside (its states among best/, final/ and step files)
        r = run_train(flags)
        assert r.returncode == 0, r.stderr[-2000:]
    archived = glob.glob(f'{out}/previous_runs/*/run/state-000000010/chat_small_t5.json')
    assert len(archived) == 1 and os.path.isdir(archived[0].split('/run/state-')[0] + '/best')
    r = run_train(tiny_flags(data, out, train_state_dir=out, max_steps=15), '--is_keep_training=True')
    assert r.returncode == 0 and 'resumed from' in r.stderr and f'{out}/state-000000015' in r.stderr, r.stderr[-2000:]
    # the other way round: output_dir and the step files' folder inside a new state folder (their locks make
    # them there before the state folder is marked)
    states = tmp_path / 'states'
    r = run_train(tiny_flags(data, states / 'out', train_state_dir=states, model_file=f'{states}/steps/m.{{}}.bin',
                             max_steps=10))
    assert r.returncode == 0 and os.path.isdir(states / 'state-000000010'), r.stderr[-2000:]


def test_a_resume_never_replaces_another_runs_models_and_a_copied_run_is_known_as_itself(tmp_path, data):
    from model.state import markers, model_files

    def recorded_runs(out):  # the run id of each model and of the newest state
        found = {name: model_files.recorded_run(str(out / name)) for name in ('best', 'final', 'chat_small_t5.10.bin')}
        (newest,) = state_folders(out / 'state')[-1:]
        found['state'] = json.loads((out / 'state' / newest / 'run.json').read_text())['run_id']
        return found

    a, b = tmp_path / 'a', tmp_path / 'b'
    for out in (a, b):
        r = run_train(tiny_flags(data, out, max_steps=10, save_steps=10, eval_steps=5))
        assert r.returncode == 0, r.stderr[-2000:]
    runs_a, runs_b = recorded_runs(a), recorded_runs(b)
    # every model and state a run writes records its run's id; two runs differ
    assert len(set(runs_a.values())) == 1 and None not in runs_a.values(), runs_a
    assert len(set(runs_b.values())) == 1 and runs_a['best'] != runs_b['best'], (runs_a, runs_b)
    # a's states resumed with hand-made flags into b's models, or over b's step files: refused before the work,
    # pointing at where a's models are
    before = snapshot(b)
    for place, said in ((dict(output_dir=b), f'{b}/best, {b}/final'), (dict(model_file=f'{b}/chat_small_t5.{{}}.bin'),
                                                                        f'{b}/chat_small_t5.10.bin')):
        flags = tiny_flags(data, a, max_steps=15, train_state_dir=a / 'state', **place)
        for extra in ((), ('--dry_run=True',)):
            r = run_train(flags, '--is_keep_training=True', *extra)
            if extra:
                assert r.returncode == 1 and said in r.stdout and runs_b['best'] in r.stdout, r.stdout[-2000:]
                continue
            line = assert_user_error(r, said, f'of another run ({runs_b["best"]}), not of the run this resumes '
                                     f'({runs_a["best"]}')
            wanted = shlex.quote(f'--output_dir={a}') if 'output_dir' in place else \
                shlex.quote(f'--model_file={a}/chat_small_t5.{{}}.bin')
            assert line.endswith(f'resume with {wanted}, where this run\'s models are'), line
    assert snapshot(b) == before
    # a resume into its own places keeps its id; final/ scored by `test` before: the resume that replaces it says
    # the predictions describe the one before
    r = cli('test', f'--model_dir={a}/final', f'--test_file={data["valid"]}', '--max_test_rows=4')
    assert r.returncode == 0 and os.path.exists(a / 'final.predictions.valid.jsonl'), r.stderr[-2000:]
    r = run_train(tiny_flags(data, a, max_steps=15, save_steps=5), '--is_keep_training=True')
    assert r.returncode == 0, r.stderr[-2000:]
    assert f'{a}/final.predictions.valid.jsonl scored the model that was at {a}/final until this save replaced it' \
           in r.stderr
    assert model_files.recorded_run(str(a / 'chat_small_t5.15.bin')) == runs_a['best']
    # a copy of a run folder (its states inside): the same run, not another run's states; a fresh run there moves
    # the copy aside as its own earlier run, and the copy resumes on its own
    c = tmp_path / 'c'
    shutil.copytree(a, c, symlinks=True)
    r = run_train(tiny_flags(data, c, max_steps=18, save_steps=6), '--is_keep_training=True')
    assert r.returncode == 0 and f'resumed from {c}/state' in r.stderr, r.stderr[-2000:]
    assert model_files.recorded_run(str(c / 'chat_small_t5.18.bin')) == runs_a['best']
    shutil.rmtree(c)
    shutil.copytree(a, c, symlinks=True)
    # stopped before its first step, right after it moved the copy aside: its last line says how that one continues
    r = cli_runner.run(train_cmd(tiny_flags(data, c, max_steps=5, save_steps=5)), cwd=ROOT, capture_output=True,
                       text=True, timeout=300, env={**ENV, 'CHAT_SMALL_T5_FAULT': 'moved-aside:sigterm'})
    (archived,) = glob.glob(f'{c}/previous_runs/*/')
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 143 and 'no step was taken, nothing to save' in last, r.stderr[-2000:]
    assert (f'; the earlier run it moved aside continues with --is_keep_training=True --output_dir='
            f'{archived.rstrip("/")} \'--model_file={archived}chat_small_t5.{{}}.bin\' --train_state_dir={archived}state '
            f'(') in last, last
    # its requeue as a resume (nothing of its own saved): the same way to the earlier run
    r = run_train(tiny_flags(data, c, max_steps=5, save_steps=5), '--is_keep_training=True')
    assert_user_error(r, 'no complete saved state', f'or continue the newest earlier run moved aside from here, to '
                      f'{archived.rstrip("/")}, with --is_keep_training=True --output_dir={archived.rstrip("/")}')
    r = run_train(tiny_flags(data, c, max_steps=5, save_steps=5))
    assert r.returncode == 0, r.stderr[-2000:]
    (archived,) = [p for p in glob.glob(f'{c}/previous_runs/*/') if os.path.isdir(f'{p}best')]
    assert model_files.recorded_run(f'{archived}best') == runs_a['best'] != model_files.recorded_run(str(c / 'final'))
    assert markers.file_kind(str(a / 'chat_small_t5.15.bin')) == markers.WEIGHTS  # the original untouched


def test_two_runs_into_the_same_place_one_is_refused(tmp_path, data):
    out = tmp_path / 'run'
    first = cli_runner.Popen(train_cmd(tiny_flags(data, out, epochs=50, save_steps=100000)), cwd=ROOT, env=ENV,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not logged_losses(out):
        assert first.poll() is None and time.time() < deadline, first.stderr.read()
        time.sleep(0.05)
    results = run_parallel([('second', ['train', *tiny_flags(data, out, max_steps=2)], 'train_low_mem.py'),
                            ('dry', ['train', *tiny_flags(data, out), '--dry_run=True'], 'train_low_mem.py')])
    assert_user_error(results['second'], 'in use by another', f'pid {first.pid}')
    assert results['dry'][0] == 1 and 'in use by another run' in results['dry'][2], results['dry']
    assert first.poll() is None, 'the first run must still be running'
    # a killed run leaves no lock behind: the kernel drops it with the process
    first.kill()
    first.communicate()
    r = run_train(tiny_flags(data, out, max_steps=2))
    assert r.returncode == 0, r.stderr[-2000:]


# --------------------------------------------------------------------------- resume


def test_resume_applies_a_new_learning_rate_and_refuses_a_new_optimizer(tmp_path, data):
    out = tmp_path / 'run'
    assert run_train(tiny_flags(data, out, max_steps=10, save_steps=10, warmup_steps=0,
                                lr_schedule='constant')).returncode == 0
    r = run_train(tiny_flags(data, out, max_steps=10, save_steps=10, optimizer='adafactor'),
                  '--is_keep_training=True')
    assert_user_error(r, '--optimizer=adafactor', 'optimizer=adamw')
    r = run_train(tiny_flags(data, out, max_steps=14, save_steps=10, warmup_steps=0, lr_schedule='constant',
                             learn_rate=1e-4), '--is_keep_training=True')
    assert r.returncode == 0, r.stderr[-2000:]
    log = open(run_logs(out)[-1], encoding='utf-8').read()
    assert 'learn_rate 0.003 -> 0.0001' in log
    assert 'lr 1.000e-04' in log and 'lr 3.000e-03' not in log


def test_resume_uses_the_runs_own_tokenizer_after_a_retrain(tmp_path, data):
    tok = tmp_path / 'tok'
    r = cli('train_tokenizer', f'--train_file={data["train"]}', f'--tokenizer_dir={tok}', '--vocab_size=1000')
    assert r.returncode == 0, r.stderr
    out = tmp_path / 'run'
    assert run_train(tiny_flags(data, out, tokenizer_dir=tok, max_steps=6, save_steps=3)).returncode == 0
    # the same command again gives the same tokenizer: the run stays resumable
    assert cli('train_tokenizer', f'--train_file={data["train"]}', f'--tokenizer_dir={tok}',
               '--vocab_size=1000').returncode == 0
    dry = cli('train', *tiny_flags(data, out, tokenizer_dir=tok, max_steps=8), '--is_keep_training=True',
              '--dry_run=True')
    assert dry.returncode == 0, dry.stdout
    # another vocabulary: refused with the way out, which works
    assert cli('train_tokenizer', f'--train_file={data["train"]}', f'--tokenizer_dir={tok}',
               '--vocab_size=950').returncode == 0
    r = run_train(tiny_flags(data, out, tokenizer_dir=tok, max_steps=8), '--is_keep_training=True')
    line = assert_user_error(r, 'not the one this run was trained with', 'cp -r ')
    own_copy = line.split('cp -r ')[1].split()[0]
    assert own_copy.startswith(f'{out}/state/state-') and own_copy.endswith('/tokenizer')
    # in place it would be pruned under the run: refused, with the copy to make
    r = run_train(tiny_flags(data, out, tokenizer_dir=own_copy, max_steps=8), '--is_keep_training=True')
    assert_user_error(r, 'lies inside train_state_dir', f'cp -r {own_copy} ')
    shutil.copytree(own_copy, tmp_path / 'tok_of_the_run')  # the cp -r it names
    r = run_train(tiny_flags(data, out, tokenizer_dir=tmp_path / 'tok_of_the_run', max_steps=8),
                  '--is_keep_training=True')
    assert r.returncode == 0, r.stderr[-2000:]


# --------------------------------------------------------------------------- generate and help


@pytest.mark.slow
def test_generate_bounds_memory_and_rejects_bad_values(trained):
    flags = [f'--output_dir={trained}', '--max_new_tokens=4']
    huge = '长' * 40000
    r = subprocess.run(['/usr/bin/time', '-f', 'maxrss_kb=%M', sys.executable, 'train_low_mem.py', 'generate',
                        *flags, f'--prompts={huge}'], cwd=ROOT, env=ENV, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rss_mb = int(r.stderr.rsplit('maxrss_kb=', 1)[1].split()[0]) / 1024
    assert rss_mb < 1500, rss_mb  # untruncated: 23.7 GB
    r = cli('generate', *flags, '--prompts=123')
    assert r.returncode == 0 and '123  ->' in r.stdout, r.stdout + r.stderr
    results = run_parallel([
        ('negative', ['generate', f'--output_dir={trained}', '--max_new_tokens=-5'], 'train_low_mem.py'),
        ('huge', ['generate', f'--output_dir={trained}', '--max_new_tokens=100000000'], 'train_low_mem.py'),
        ('dict', ['generate', f'--output_dir={trained}', '--prompts={"a": 1}'], 'train_low_mem.py'),
    ])
    assert_user_error(results['negative'], '--max_new_tokens=-5')
    assert_user_error(results['huge'], '--max_new_tokens', '2048')
    assert_user_error(results['dict'], '--prompts')


def test_help_lists_every_option_with_its_comment():
    import dataclasses

    from config import RunFlags, T5ModelConfig, TrainConfigPretrainLarge
    from model.cli import field_comments

    results = run_parallel([(c, [c, '--help'], 'train_low_mem.py') for c in ('train', 'train_tokenizer', 'generate')]
                           + [(f'prep {c}', [c, '--help'], 'prepare_data.py')
                              for c in ('convert', 'clean', 'split', 'check', 'demo')])
    for name, (code, stderr, stdout) in results.items():
        assert code == 0 and 'Traceback' not in stderr and 'usage:' in stdout, (name, stderr)
    text = results['train'][2]
    for cls in (TrainConfigPretrainLarge, T5ModelConfig, RunFlags):
        comments = field_comments(cls)
        for f in dataclasses.fields(cls):
            assert f'--{f.name}=' in text, f.name
            assert comments[f.name] and comments[f.name] in text, f.name
    assert '--vocab_size=' in results['train_tokenizer'][2] and '--prompts=' in results['generate'][2]
    assert 'renamed to prompt' in results['prep convert'][2] and '--valid_ratio=' in results['prep split'][2]


# --------------------------------------------------------------------------- found by a hostile pass


def test_a_marked_folder_holding_someone_elses_file_is_not_replaced(tmp_path, data):
    tok = tmp_path / 'tok'
    args = ('train_tokenizer', f'--train_file={data["train"]}', f'--tokenizer_dir={tok}', '--vocab_size=1000')
    assert cli(*args).returncode == 0
    (tok / 'my_notes.txt').write_text('important')
    assert_user_error(cli(*args), 'my_notes.txt', 'did not write')
    assert (tok / 'my_notes.txt').read_text() == 'important' and (tok / 'tokenizer.json').is_file()
    out = tmp_path / 'run'
    assert run_train(tiny_flags(data, out, max_steps=4, save_steps=2, eval_steps=2)).returncode == 0
    (out / 'best' / 'NOTES.md').write_text('mine')
    before = snapshot(out / 'best')
    r = run_train(tiny_flags(data, out, max_steps=8, save_steps=2, eval_steps=2), '--is_keep_training=True')
    assert r.returncode == 0 and 'NOTES.md' in r.stderr and 'did not write' in r.stderr, r.stderr[-3000:]  # said,
    assert snapshot(out / 'best') == before  # and never replaced: the resume trains on beside it


def test_outputs_never_land_in_or_among_the_inputs(tmp_path, data):
    d2 = tmp_path / 'd2'
    d2.mkdir()
    train = write_parquet(d2 / 'train.parquet', make_texts(200, seed=3))
    w = tmp_path / 'w'
    w.mkdir()
    write_parquet(w / 'a1.parquet', make_texts(20, seed=4))
    (w / 'new').mkdir()
    before = snapshot(tmp_path)
    results = run_parallel([
        ('parquet weights in the input folder', ['train', *tiny_flags(data, tmp_path / 'o1', train_file=d2,
                                                                      model_file=f'{d2}/m.{{}}.parquet')],
         'train_low_mem.py'),
        ('outputs inside tokenizer_dir', ['train', *tiny_flags(data, tmp_path / 'o2', output_dir=data['tok'],
                                                                model_file=f'{data["tok"]}/m.{{}}.bin')],
         'train_low_mem.py'),
        ('glob picks any name', ['clean', f'{w}/a*', f'{w}/a_out.txt'], 'prepare_data.py'),
    ])
    assert_user_error(results['parquet weights in the input folder'], 'model_file', 'input folder')
    assert_user_error(results['outputs inside tokenizer_dir'], 'inside tokenizer_dir')
    assert_user_error(results['glob picks any name'], 'input pattern')
    assert snapshot(tmp_path) == before
    # a glob never crosses a '/': a file in a subfolder is not picked up, so it is allowed
    r = cli('clean', f'{w}/*.parquet', w / 'new' / 'c.parquet', script='prepare_data.py')
    assert r.returncode == 0, r.stderr
    assert train


def test_flags_without_effect_and_outputs_among_the_inputs_are_refused(tmp_path, data, trained):
    """A flag that the command would ignore is a mistake, as is an output where an input (or the
    training data) lives; each is one line before any work, by the dry run too."""
    out = tmp_path / 'run'
    data_dir = os.path.dirname(data['train'])
    log = tmp_path / 'run.log'
    log.write_text('2026-01-01 00:00:00 [rank 0] INFO step 1/2 | epoch 0 | loss 9.0000 | lr 1.000e-03 | x\n')
    png_named_log = tmp_path / 'run_log.png'  # a log whose name would pass as a plot's
    png_named_log.write_text(log.read_text())
    before = snapshot(tmp_path)
    results = run_parallel([
        ('vocab on train', ['train', *tiny_flags(data, out), '--vocab_size=5', '--dry_run=True'], 'train_low_mem.py'),
        ('test file on train', ['train', *tiny_flags(data, out), f'--test_file={data["valid"]}'], 'train_low_mem.py'),
        ('epochs on generate', ['generate', f'--output_dir={trained}', f'--tokenizer_dir={data["tok"]}', '--epochs=3'],
         'train_low_mem.py'),
        ('lr on plot', ['plot', f'--log_file={log}', '--learn_rate=0.1'], 'train_low_mem.py'),
        ('predictions as parquet', ['test', f'--output_dir={trained}', f'--test_file={data["valid"]}',
                                    f'--out={data_dir}/preds.parquet'], 'train_low_mem.py'),
        ('predictions into the tokenizer', ['test', f'--output_dir={trained}', f'--test_file={data["valid"]}',
                                            f'--out={data["tok"]}/preds.jsonl'], 'train_low_mem.py'),
        ('a plot named .png', ['plot', f'--log_file={log}', f'--out={tmp_path}/.png'], 'train_low_mem.py'),
        ('the plot over its log', ['plot', f'--log_file={png_named_log}', f'--out={png_named_log}'],
         'train_low_mem.py'),
    ])
    assert_user_error(results['vocab on train'], '--vocab_size has no effect on train', 'train_tokenizer')
    assert_user_error(results['test file on train'], '--test_file has no effect on train')
    assert_user_error(results['epochs on generate'], '--epochs has no effect on generate')
    assert_user_error(results['lr on plot'], '--learn_rate has no effect on plot')
    assert_user_error(results['predictions as parquet'], '.jsonl')
    assert_user_error(results['predictions into the tokenizer'], '--out', 'a tokenizer folder')
    assert_user_error(results['a plot named .png'], 'ending in .png')
    assert_user_error(results['the plot over its log'], 'is also an input')
    assert snapshot(tmp_path) == before
    assert not os.path.exists(f'{data_dir}/preds.parquet')
    # warmup longer than the whole run: said by the dry run (and logged by the run)
    r = cli('train', *tiny_flags(data, out, max_steps=4, warmup_steps=50), '--dry_run=True')
    assert r.returncode == 0 and 'note: warmup_steps=50 warms up for 50 optimizer steps, all of the run\'s 4' in r.stdout, r.stdout


@contextlib.contextmanager
def a_long_run(flags, out):
    """A run of many epochs, training (it has logged a loss) while the block runs; killed after."""
    first = cli_runner.Popen(train_cmd(flags), cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not logged_losses(out):
            assert first.poll() is None and time.time() < deadline
            time.sleep(0.05)
        yield first
    finally:
        first.kill()
        first.wait()


def test_two_runs_sharing_only_the_model_file_folder_are_refused(tmp_path, data):
    shared = tmp_path / 'shared'
    with a_long_run(tiny_flags(data, tmp_path / 'a', epochs=50, save_steps=100000, model_file=f'{shared}/m.{{}}.bin'),
                    tmp_path / 'a'):
        r = run_train(tiny_flags(data, tmp_path / 'b', max_steps=2, model_file=f'{shared}/m.{{}}.bin'))
        assert_user_error(r, str(shared), 'in use by another')


def test_two_runs_given_only_their_own_output_dir_run_side_by_side(tmp_path, data):
    # --output_dir alone takes the states and step files along: neither run touches the defaults'
    # places, nor the other's (a folder with braces in its name included: the pattern keeps them literal)
    def own_flags(out, **extra):
        return [f for f in tiny_flags(data, out, **extra) if not f.startswith(('--model_file=', '--train_state_dir='))]

    defaults = resolve_config().train
    started = time.time()

    def touched_since_start():  # anything in the default places written by these runs
        return [os.path.join(root, n) for place in (defaults.train_state_dir, os.path.dirname(defaults.model_file))
                for root, dirs, files in os.walk(place) for n in dirs + files
                if os.lstat(os.path.join(root, n)).st_mtime >= started]

    with a_long_run(own_flags(tmp_path / 'a', epochs=50, save_steps=100000), tmp_path / 'a'):
        # the first one's output_dir is also its model_file folder: that folder said in use once
        dry = cli('train', *own_flags(tmp_path / 'a', max_steps=3), '--dry_run=True')
        in_use = [line.strip() for line in dry.stdout.splitlines() if 'is in use by another run' in line]
        assert dry.returncode == 1 and [line.split(':')[0] for line in in_use] == ['- train_state_dir', '- output_dir']
        # a resume of it while it runs, before its first save: the place in use is what is said
        r = run_train(own_flags(tmp_path / 'a', max_steps=3), '--is_keep_training=True')
        assert_user_error(r, 'is in use by another run')
        assert 'no complete saved state' not in r.stderr  # its states are not judged while it runs
        out = tmp_path / 'b{1}'
        r = run_train(own_flags(out, max_steps=3, save_steps=1, keep_latest_n_ckp=1))
        assert r.returncode == 0, r.stderr[-2000:]
    assert state_folders(out / 'train_latest_state')[-1].endswith('state-000000003')
    assert sorted(glob.glob(f'{glob.escape(str(out))}/chat_small_t5.*.bin')) == [f'{out}/chat_small_t5.3.bin',
                                                                                 f'{out}/chat_small_t5.best.bin']
    assert not os.path.exists(tmp_path / 'a' / 'previous_runs') and not os.path.exists(out / 'previous_runs')
    assert touched_since_start() == []


def test_dry_run_ready_means_the_run_does_not_fail_at_start(tmp_path, data):
    out = tmp_path / 'run'
    assert run_train(tiny_flags(data, out, max_steps=4, save_steps=2)).returncode == 0
    (out / 'previous_runs').write_text('a file of mine')
    flags = tiny_flags(data, out, max_steps=4, save_steps=2)
    dry = cli('train', *flags, '--dry_run=True')
    assert dry.returncode == 1 and 'previous_runs' in dry.stdout, dry.stdout
    assert_user_error(run_train(flags), 'previous_runs')
    os.remove(out / 'previous_runs')
    # every state damaged, sizes unchanged: the checksums find it, in the dry run as in the run; the place the advice
    # names is taken by an earlier time's damaged states (a user's folder now): the advice names the next free one
    os.makedirs(f'{out}.damaged_states/state')
    (tmp_path / 'run.damaged_states' / 'state' / 'mine.txt').write_text('an earlier time')
    for state in glob.glob(f'{out}/state/state-*'):
        size = os.path.getsize(f'{state}/model.safetensors')
        with open(f'{state}/model.safetensors', 'wb') as f:
            f.write(b'\0' * size)
    dry = cli('train', *flags, '--is_keep_training=True', '--dry_run=True')
    assert dry.returncode == 1 and 'every saved state is damaged' in dry.stdout and 'checksum' in dry.stdout
    assert_user_error(run_train(flags, '--is_keep_training=True'), 'every saved state is damaged')
    # and the advice does not go round: a fresh run cannot move them aside either, so neither says to try the other;
    # both give the way on: move them away, then start afresh or keep the newest weights (the step file of step 4)
    aside = f'{out}.damaged_states-2'
    keep = f'or keep the weights of {out}/chat_small_t5.4.bin (a new optimizer, schedule and data order, from step 0)'
    assert f'move it away yourself (e.g. mv {out}/state {aside}), then start afresh without ' \
           f'--is_keep_training, {keep}' in dry.stdout, dry.stdout
    fresh = cli('train', *flags, '--dry_run=True')
    assert fresh.returncode == 1 and 'resume that run' not in fresh.stdout and 'which this toolkit did not write' \
        not in fresh.stdout, fresh.stdout  # damaged since it saved them: not a stranger's
    assert f'every saved state is damaged since this toolkit saved it (the newest, {out}/state/state-000000004: ' \
        in fresh.stdout, fresh.stdout
    assert f'then start afresh, {keep}: --init_from={out}/chat_small_t5.4.bin' in fresh.stdout, fresh.stdout
    # the start script with RESUME=auto (a job's requeue): said once, not as a fresh run and again as a resume
    env = cli_runner.script_env({**ENV, 'RESUME': 'auto', 'ACCELERATE_USE_CPU': '1', 'NUM_GPUS': '1'})
    script = subprocess.run(['bash', 'start_pretrain_large.sh', *flags], cwd=ROOT, capture_output=True, text=True,
                            env=env, stdin=subprocess.DEVNULL, timeout=300)
    assert script.returncode == 1 and script.stderr.count('every saved state') == 1, script.stderr[-3000:]
    assert 'nor as a resume' not in script.stderr and '--init_from=' in script.stderr, script.stderr[-3000:]
    os.rename(f'{out}/state', f'{aside}')  # as told: the warm start from the newest weights runs
    dry = cli('train', *flags, '--is_keep_training=True', '--dry_run=True')  # a resume tried anyway: told where they went
    assert dry.returncode == 1 and f"this run's states were moved to {aside} as damaged: none of them " \
        f'can be resumed; start afresh without --is_keep_training, {keep}' in dry.stdout, dry.stdout
    warm = [*flags, f'--init_from={out}/chat_small_t5.4.bin']
    dry = cli('train', *warm, '--dry_run=True')  # what it says of the earlier run it moves aside is true: no way on
    assert dry.returncode == 0 and f'(its states are in {aside}, moved there as damaged: it cannot be ' \
        f'continued)' in dry.stdout, dry.stdout
    r = run_train(warm)
    assert r.returncode == 0 and 'warm start: weights from' in open(run_logs(out)[-1], encoding='utf-8').read()
    assert f"the earlier run's states are in {aside}, moved there as damaged: it cannot be continued " \
           f"(its models are in {out}/previous_runs/" in r.stderr, r.stderr[-3000:]
    assert 'if it kept its states in another --train_state_dir' not in r.stderr, r.stderr[-3000:]
    assert os.listdir(f'{out}.damaged_states/state') == ['mine.txt']  # the earlier time's: untouched


def test_values_that_cannot_work_are_refused_before_the_work(tmp_path, data):
    src = write_parquet(tmp_path / 'd.parquet', make_texts(50, seed=4))
    split = ['split', src, f'--train_out={tmp_path / "t.parquet"}', f'--valid_out={tmp_path / "v.parquet"}']
    before = snapshot(tmp_path)
    results = run_parallel([
        ('inf lr', ['train', *tiny_flags(data, tmp_path / 'o', learn_rate='inf')], 'train_low_mem.py'),
        ('workers', ['train', *tiny_flags(data, tmp_path / 'o', num_workers=1000)], 'train_low_mem.py'),
        ('ratio near 1', [*split, '--valid_ratio=0.999999'], 'prepare_data.py'),
        ('ratio near 0, streamed', [*split, '--valid_ratio=0.0001', '--max_in_memory_rows=0'], 'prepare_data.py'),
        ('negative rows', [*split, '--max_in_memory_rows=-5'], 'prepare_data.py'),
        ('flag without value', ['demo', '--out_dir'], 'prepare_data.py'),
        ('prompts without value', ['generate', '--prompts'], 'train_low_mem.py'),
        ('flag twice', ['train', '--max_steps=1', '--max_steps=2', '--dry_run=True'], 'train_low_mem.py'),
        ('empty path', ['train', '--train_file=', '--dry_run=True'], 'train_low_mem.py'),
    ])
    assert_user_error(results['inf lr'], 'learn_rate', 'finite')
    assert_user_error(results['workers'], 'num_workers=1000', 'cores')
    assert_user_error(results['ratio near 1'], 'valid_ratio')
    assert_user_error(results['ratio near 0, streamed'], 'valid_ratio', 'no row')
    assert_user_error(results['negative rows'], 'max_in_memory_rows')
    assert_user_error(results['flag without value'], '--out_dir needs a value')
    assert_user_error(results['prompts without value'], '--prompts needs a value')
    assert_user_error(results['flag twice'], '--max_steps is given twice')
    assert_user_error(results['empty path'], 'train_file is empty')
    assert snapshot(tmp_path) == before


def test_start_script_keeps_relative_paths_and_checks_num_gpus(tmp_path, data):
    env = cli_runner.script_env({**ENV, 'PATH': '/usr/bin:/bin'})
    script = os.path.join(ROOT, 'start_pretrain_large.sh')
    bad = subprocess.run(['bash', script, '--dry_run=True'], cwd=tmp_path, env={**env, 'NUM_GPUS': 'abc'},
                         capture_output=True, text=True, timeout=120)
    assert_user_error(bad, 'NUM_GPUS=abc')
    flags = [f for f in tiny_flags(data, 'rel', max_steps=2) if not f.startswith('--log_dir')] + ['--log_dir=rel/logs']
    r = subprocess.run(['bash', script, *flags], cwd=tmp_path, env=env, capture_output=True, text=True,
                       stdin=subprocess.DEVNULL, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / 'rel' / 'final' / 'config.json').is_file()
    assert not os.path.exists(os.path.join(ROOT, 'rel'))


def test_resume_reports_changed_model_settings_and_files_are_readable(tmp_path, data):
    out = tmp_path / 'run'
    assert run_train(tiny_flags(data, out, max_steps=4, save_steps=2)).returncode == 0
    r = run_train(tiny_flags(data, out, max_steps=6, save_steps=2, dropout_rate=0.3), '--is_keep_training=True')
    assert r.returncode == 0, r.stderr[-2000:]
    assert 'dropout_rate 0.1 -> 0.3' in r.stderr
    mask = os.umask(0)
    os.umask(mask)
    for path in (out / 'chat_small_t5.6.bin', out / 'final', out / 'final' / 'model.safetensors'):
        want = (0o777 if path.is_dir() else 0o666) & ~mask
        assert os.stat(path).st_mode & 0o777 == want, path


def train_acting_at_an_evaluation(flags, step: int, steps: int, act) -> tuple[int, str]:
    """A run of ``steps`` optimizer steps whose evaluation at ``step`` waits 3 s (a fault point), ``act()`` done
    while it waits (what a user does to the run's folders mid-run): (exit code, stderr)."""
    proc = cli_runner.Popen(train_cmd(flags, f'--max_steps={steps}'), cwd=ROOT, stdout=subprocess.DEVNULL,
                            env={**ENV, 'CHAT_SMALL_T5_FAULT': f'eval-loss@{step}:sleep=3'}, stderr=subprocess.PIPE,
                            text=True)
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if f'step {step}/{steps}' in line:  # its evaluation now waits at the fault point
            act()
            break
    err = ''.join(lines) + proc.stderr.read()
    proc.wait(timeout=300)
    return proc.returncode, err


def test_a_users_file_put_in_best_mid_run_is_kept_and_the_run_trains_on(tmp_path, data):
    """A user's note dropped into best/ while the run trains: the next best-model export would
    replace that folder, so it is refused -- and that refusal ended the run with exit 2 before the
    step's state was saved (the steps since the last save were lost, and a cluster script does not
    requeue exit 2). Now it is said, the note stays, and the run trains to its end."""
    out = tmp_path / 'run'
    flags = tiny_flags(data, out, eval_steps=2, save_steps=100, learn_rate=1e-2)
    # best/ exists from step 2
    code, err = train_acting_at_an_evaluation(flags, 4, 8, lambda: (out / 'best' / 'MYNOTE').write_text('mine'))
    assert code == 0, err[-3000:]
    assert 'MYNOTE' in err and 'is not exported there, training goes on' in err, err[-3000:]
    assert (out / 'best' / 'MYNOTE').read_text() == 'mine' and 'step 8/8' in err and os.path.isdir(out / 'final')


@pytest.mark.parametrize('kind', ['folder', 'file', 'link'])
def test_a_users_folder_put_in_final_mid_run_is_kept_and_the_run_ends_well_with_its_last_model_named(tmp_path, data,
                                                                                                      kind):
    """A user's folder put in final/ while the run trains (final/ is written only at the end): the
    export was refused and the run exited 2 at its very end, after all its training, without final
    weights. As for best/: the folder is kept, the last model is the weights file of the last state
    (named in the warning and the done line), exit 0; a resume beside it trains on as well. The
    same for a file named final (it said "output_dir: .../final is a file, not a folder", exit 2),
    and a link put there (the model was written through it, out of output_dir)."""
    out = tmp_path / 'run'
    elsewhere = tmp_path / 'elsewhere'
    elsewhere.mkdir()
    flags = tiny_flags(data, out, eval_steps=2, save_steps=100)

    def put_in_final():
        if kind == 'folder':
            os.makedirs(out / 'final')
            (out / 'final' / 'MYNOTE').write_text('mine')
        elif kind == 'file':
            (out / 'final').write_text('mine')
        else:
            os.symlink(elsewhere, out / 'final')

    code, err = train_acting_at_an_evaluation(flags, 4, 8, put_in_final)
    assert code == 0, err[-3000:]
    step_file = out / 'chat_small_t5.8.bin'
    said = {'folder': f'{out / "final"} is a folder this toolkit did not make',
            'file': f'{out / "final"} is a file, not a folder; it is never replaced',
            'link': f'{out / "final"} is a symbolic link this toolkit did not make (to {elsewhere})'}[kind]
    assert said in err, err[-3000:]
    assert f'the last model (step 8) is in {step_file}, the weights file of its state, instead' in err, err[-3000:]
    assert f'final model in {step_file}' in err, err[-3000:]
    assert os.listdir(elsewhere) == []  # nothing written through a link
    if kind != 'folder':
        assert (out / 'final').is_symlink() if kind == 'link' else (out / 'final').read_text() == 'mine'
        return
    assert 'MYNOTE' in err
    assert os.listdir(out / 'final') == ['MYNOTE'] and (out / 'final' / 'MYNOTE').read_text() == 'mine'
    assert model_record(str(step_file))['step'] == 8
    r = run_train(flags, '--max_steps=10', '--is_keep_training=True')  # a resume beside it trains on, as best/'s
    assert r.returncode == 0 and 'the last model is not exported there until that is moved out' in r.stderr, \
        r.stderr[-3000:]
    assert f'final model in {out / "chat_small_t5.10.bin"}' in r.stderr and os.listdir(out / 'final') == ['MYNOTE']
    assert_user_error(run_train(flags, '--max_steps=2'), str(out / 'final'))  # a fresh run: refused


def test_a_users_file_named_best_put_in_output_dir_mid_run_is_kept_and_the_run_trains_on(tmp_path, data):
    """A file named best put in output_dir before the run's first evaluation: the best export said
    "output_dir: .../best is a file, not a folder" and the run died there, exit 2, its steps since
    the last save lost. Now as for a user's folder there: kept, said, the run trains on."""
    out = tmp_path / 'run'
    code, err = train_acting_at_an_evaluation(tiny_flags(data, out, eval_steps=2, save_steps=100), 2, 6,
                                              lambda: (out / 'best').write_text('mine'))
    assert code == 0 and 'step 6/6' in err, err[-3000:]
    assert f'{out / "best"} is a file, not a folder; it is never replaced' in err, err[-3000:]
    assert 'training goes on' in err and (out / 'best').read_text() == 'mine'
    assert (out / 'final').is_dir()


def test_a_link_put_at_a_weights_files_name_mid_run_is_never_written_through(tmp_path, data):
    """A link put where the best weights file or a step file goes, while the run trains: the model
    was written through it, out of the run's folders, without a word (and the end said the best
    file did not hold the best model). Now the link is kept, each export there is said refused,
    the run trains on to exit 0, its states hold the weights; a resume beside the links too."""
    out, elsewhere = tmp_path / 'run', tmp_path / 'elsewhere'
    elsewhere.mkdir()
    flags = tiny_flags(data, out, eval_steps=2, save_steps=2)
    def link_both():
        os.symlink(elsewhere / 'best.bin', out / 'chat_small_t5.best.bin')
        os.symlink(elsewhere / 'step4.bin', out / 'chat_small_t5.4.bin')

    code, err = train_acting_at_an_evaluation(flags, 2, 6, link_both)
    assert code == 0 and 'step 6/6' in err, err[-3000:]
    assert os.listdir(elsewhere) == [], err[-3000:]  # nothing written through a link
    assert f'{out}/chat_small_t5.best.bin is a symbolic link this toolkit did not make' in err, err[-3000:]
    assert f'{out}/chat_small_t5.4.bin is a symbolic link this toolkit did not make' in err and \
        'the weights of step 4 are not exported there, training goes on' in err, err[-3000:]
    assert (out / 'chat_small_t5.best.bin').is_symlink() and (out / 'chat_small_t5.4.bin').is_symlink()
    r = run_train(flags, '--max_steps=8', '--is_keep_training=True')  # a resume beside them: notes, it trains on
    assert r.returncode == 0 and 'step 8/8' in r.stderr, r.stderr[-3000:]
    assert 'the weights of that step are not exported there until it is moved away' in r.stderr, r.stderr[-3000:]
    assert os.listdir(elsewhere) == []
    assert_user_error(run_train(flags, '--max_steps=2'), 'chat_small_t5.')  # a fresh run: refused


def test_a_start_stopped_early_with_its_log_in_the_state_folder_starts_again(tmp_path, data):
    """The take-back of a start stopped before its first step removed the state folder's marker
    though the folder stayed (it held the run's log): the same command was then refused ('a folder
    this toolkit did not make'), and a requeued job could never start. A folder that keeps
    anything keeps its marker."""
    out = tmp_path / 'new' / 'o'
    flags = tiny_flags(data, out, train_state_dir=out / 'st', log_dir=out / 'st' / 'logs', max_steps=2)
    r = cli_runner.run(train_cmd(flags), cwd=ROOT, env={**ENV, 'CHAT_SMALL_T5_FAULT': 'start-up:sigterm'},
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 143, r.stderr[-3000:]
    assert sorted(os.listdir(out / 'st')) == ['.chat_small_t5.lock', 'chat_small_t5.json', 'logs']
    r = run_train(flags)
    assert r.returncode == 0, r.stderr[-3000:]


def test_a_resume_trains_on_beside_a_users_file_in_best_as_the_run_that_met_it_did(tmp_path, data):
    """The run that met a user's file in best/ trained on; after a stop its resume was refused at
    start-up ('best holds what this toolkit did not write'): a requeued job died. A resume now says
    it and trains on, the file kept; the same for a user's file where the best weights file goes.
    A fresh run, which would have to move it aside, is still refused."""
    out = tmp_path / 'run'
    flags = tiny_flags(data, out, eval_steps=2, save_steps=2)
    assert run_train(flags, '--max_steps=4').returncode == 0
    (out / 'best' / 'notes.txt').write_text('mine')
    r = run_train(flags, '--max_steps=8', '--is_keep_training=True')
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'the best model is not exported there until that is moved out' in r.stderr, r.stderr[-3000:]
    assert (out / 'best' / 'notes.txt').read_text() == 'mine' and 'step 8/8' in r.stderr
    assert 'output_dir: output_dir' not in r.stderr
    best = int(re.search(r'done: .* at step (\d+)', r.stderr).group(1))  # read back at the end: said where it is not
    assert (f'{out / "best"} does not hold the best model (step {best}), but step 4\'s' in r.stderr) == (best > 4)
    assert 'chat_small_t5.best.bin does not hold' not in r.stderr  # the weights file was written: not named
    os.remove(out / 'best' / 'notes.txt')
    os.remove(out / 'chat_small_t5.best.bin')
    (out / 'chat_small_t5.best.bin').write_text('my own weights')
    r = run_train(flags, '--max_steps=12', '--is_keep_training=True')
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / 'chat_small_t5.best.bin').read_text() == 'my own weights' and 'step 12/12' in r.stderr
    assert_user_error(run_train(flags, '--max_steps=2'), 'chat_small_t5.best.bin')  # a fresh run: refused


def test_a_marker_named_entry_of_the_users_is_one_line_in_the_dry_run_and_the_run(tmp_path, data):
    out = tmp_path / 'run'
    os.makedirs(out / 'state')
    (out / 'state' / 'chat_small_t5.json').write_text('{"mine": 1}')
    flags = tiny_flags(data, out, max_steps=2)
    for extra in ((), ('--dry_run=True',)):
        r = run_train(flags, *extra)
        assert r.returncode in (1, 2) and 'Traceback' not in r.stderr + r.stdout, (r.stdout + r.stderr)[-3000:]
        assert 'holds a chat_small_t5.json this toolkit did not write' in r.stderr + r.stdout
    assert_user_error(run_train(flags), 'chat_small_t5.json')
    assert (out / 'state' / 'chat_small_t5.json').read_text() == '{"mine": 1}'
    os.makedirs(tmp_path / 'model' / 'chat_small_t5.json')  # a folder of that name: no traceback either
    r = cli('generate', f'--model_dir={tmp_path / "model"}', f'--tokenizer_dir={data["tok"]}', '--prompts=["hi"]')
    assert r.returncode == 2 and 'Traceback' not in r.stderr, r.stderr[-3000:]
