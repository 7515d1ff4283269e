"""The benchmark scripts still run (a benchmark that rots is worse than none): each on a tiny
configuration, on the CPU."""

from __future__ import annotations

import json
import glob
import os
import subprocess
import sys

import pytest

from conftest import ENV, ROOT, SHARED_DATA


@pytest.mark.bench_smoke
@pytest.mark.slow
def test_bench_gpu_runs_on_the_cpu():
    tiny = json.dumps(dict(d_model=32, num_heads=2, d_kv=16, d_ff=64, num_layers=1, num_decoder_layers=1))
    r = subprocess.run([sys.executable, 'bench/bench_gpu.py', '--device=cpu', '--steps=2', '--batch=4', '--max_len=256',
                        '--variants=eager', f'--model={tiny}', '--vocab=1000'], cwd=ROOT, env=ENV, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout.split('RESULT ', 1)[1])[0]
    assert result['variant'] == 'eager' and result['rows_per_s'] > 0 and 0 < result['mfu'] < result['padded_mfu']
    assert 0 < result['pad_fraction'] < 0.5 and result['steps'] == 2


def test_bench_resume_removes_only_its_own_work(tmp_path, capsys):
    """Its --dir is new or one it made (stamped); a user's folder, a link to one, or a link
    planted where it removes its copies is refused (one line, exit 2) and left as it was."""
    bench = load_bench('bench_resume')

    def refused(path) -> str:
        with pytest.raises(SystemExit) as stop:
            bench.claim_work_dir(path)
        assert stop.value.code == 2
        return capsys.readouterr().err

    user = tmp_path / 'user'
    os.makedirs(user / 'resume')
    (user / 'resume' / 'thesis.txt').write_text('mine')
    os.symlink(user, tmp_path / 'link')
    for given in (user, tmp_path / 'link'):
        assert 'holds files this benchmark did not make' in refused(str(given))
    work = bench.claim_work_dir(str(tmp_path / 'work'))
    assert bench.claim_work_dir(work) == work  # its own folder again
    os.symlink(user / 'resume', f'{work}/resume')
    assert 'holds resume, a link this benchmark did not make' in refused(work)
    assert (user / 'resume' / 'thesis.txt').read_text() == 'mine' and not os.path.exists(user / bench.STAMP)


def load_bench(name: str):
    import importlib.util

    if f'{ROOT}/bench' not in sys.path:  # the benches import their neighbours (tasks, heldout) by name
        sys.path.insert(0, f'{ROOT}/bench')
    spec = importlib.util.spec_from_file_location(name, f'{ROOT}/bench/{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_numbers_task_is_seeded_and_holds_its_validation_numbers_out():
    tasks = load_bench('tasks')
    assert [tasks.chinese_number(n) for n in (7, 10, 15, 40, 101, 110, 305, 999)] == \
        ['七', '十', '十五', '四十', '一百零一', '一百一十', '三百零五', '九百九十九']
    train, valid = tasks.number_rows(3000, seed=5)
    assert (train, valid) == tasks.number_rows(3000, seed=5) and (len(train), len(valid)) == (2700, 300)
    assert tasks.number_rows(3000, seed=6) != (train, valid)
    assert not {p for p, _ in train} & {p for p, _ in valid}  # every validation prompt is unseen

    value = {tasks.chinese_number(n): n for n in range(1000)}

    def numbers(rows):  # the numbers that numeral <-> digits rows are about, read from their answers
        return {int(r) if r.isdigit() else value[r] for _, r in rows if r in value or r.isdigit()}

    held = numbers(valid)
    assert len(held) > 20 and not held & numbers(train)  # neither direction of a held-out number is trained on


def test_a_task_is_written_only_where_nothing_of_the_users_is(tmp_path, monkeypatch):
    from model.errors import UserError

    tasks = load_bench('tasks')
    monkeypatch.setattr(tasks, 'ROWS', {**tasks.ROWS, 'numbers': 200})
    user = tmp_path / 'mine.parquet'
    user.write_bytes(b'my own bytes')
    for how in ('a file of the user', 'a link to a file of the user'):
        monkeypatch.setattr(tasks, 'OUT', str(tmp_path / how.replace(' ', '_')))
        folder = tmp_path / how.replace(' ', '_') / 'tasks' / 'numbers'
        folder.mkdir(parents=True)
        if how == 'a file of the user':
            (folder / 'train.parquet').write_bytes(b'my own bytes')
        else:
            (folder / 'train.parquet').symlink_to(user)
        with pytest.raises(UserError):
            tasks.task_files('numbers')
        assert (folder / 'train.parquet').read_bytes() == b'my own bytes' and user.read_bytes() == b'my own bytes'
        assert sorted(os.listdir(folder)) == ['train.parquet'], how  # nothing else written
    monkeypatch.setattr(tasks, 'OUT', str(tmp_path / 'fresh'))
    paths = tasks.task_files('numbers')  # a new place: written, marked as the toolkit's
    from model.data.files import inspect_parquet
    from model.state.markers import file_kind

    assert inspect_parquet(paths['valid']).num_rows == 20 and file_kind(paths['train']) is not None
    assert tasks.task_files('numbers') == paths  # the same command again: kept


def test_bench_train_times_the_first_evaluation_that_reaches_the_target():
    bench = load_bench('bench_train')
    curve = [(100, 10.0, 2.0, 0.0), (200, 20.0, 0.9, 0.2), (300, 30.0, 0.6, 0.4)]  # (step, train s, loss, em)
    assert bench.time_to(curve, 3, 0.3, higher=True) == 30.0 and bench.time_to(curve, 2, 1.0, higher=False) == 20.0
    assert bench.time_to(curve, 3, 0.5, higher=True) == float('inf')  # never reached: never, not left out
    assert bench.at_time(curve, 25.0) == (0.9, 0.2) and bench.at_time(curve, 5.0) == (2.0, 0.0)


def test_bench_train_times_each_seed_to_the_quality_the_peer_ends_that_seed_with():
    bench = load_bench('bench_train')
    peer = [{'curve': [(1, 40.0, 0.8, 0.5), (2, 80.0, 0.5, 0.9), (3, 100.0, 0.5, 0.9)]},
            {'curve': [(1, 40.0, 0.7, 0.6), (2, 80.0, 0.4, 0.8), (3, 100.0, 0.3, 0.9)]}]
    ours = [{'curve': [(1, 20.0, 0.6, 0.9), (2, 40.0, 0.5, 0.9), (3, 60.0, 0.5, 0.9)]},   # seed 1: 0.5 / 0.9 at 20 s
            {'curve': [(1, 20.0, 0.5, 0.5), (2, 40.0, 0.35, 0.9), (3, 60.0, 0.31, 0.9)]}]  # seed 2: never 0.3
    lines = []
    bench.summarize('numbers', 'd128', [1, 2], 3, {}, 0.01, {'em': 0.5, 'loss': 0.5}, {'ours': ours, 'peer': peer},
                    lines.append)
    goal = lines[-1]
    # the peer reaches its own end's quality at 80 s on seed 1 (a plateau), 100 s on seed 2; ours at 40 s and
    # never (the loss), 20 s and 40 s (the exact match): a seed that never gets there makes the median never
    assert 'ours never / 30 s, the peer 90 s / 90 s' in goal and 'to the loss ours never reached it' in goal, goal
    assert 'to the exact match 3.00x' in goal, goal


def test_bench_recipe_settings_are_config_fields():
    from config import resolve_config

    bench = load_bench('bench_recipe')
    for name, lrs in bench.LRS.items():
        fields = bench.setting(name, lrs[0])
        cfg = resolve_config(overrides=fields)
        assert cfg.train.adafactor_scale_parameter is name.endswith('+scale') and cfg.train.learn_rate == lrs[0]
        assert name.split('+')[0] in bench.label(fields)
    # a field the label has no column for is still shown: two settings never print as one
    assert bench.label({**bench.setting('adamw', 1e-3), 'd_ff': 340}).endswith(' d_ff=340')
    assert 'd_ff' not in bench.label(bench.setting('adamw', 1e-3))


@pytest.mark.slow
@pytest.mark.bench_smoke
@pytest.mark.parametrize('bench', ['bench_train', 'bench_recipe'])
def test_learning_benches_run_quick(bench, tmp_path):
    batch = ['--ours={"batch_size_per_gpu": 8}'] if bench == 'bench_train' else []  # both trainers' batch
    r = subprocess.run([sys.executable, f'bench/{bench}.py', '--quick', f'--out_dir={tmp_path}', *batch], cwd=ROOT,
                       env=ENV, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert ('speed-up (peer time / our time)' if bench == 'bench_train' else 'adamw') in r.stdout
    if bench == 'bench_train':
        for kind in ('ours', 'peer'):
            assert f'seed 42 {kind}: 20 steps of batch 8 in' in r.stdout, r.stdout
    if bench == 'bench_recipe':  # its table under a new name there, nothing in the checkout's bench/out
        (log,) = glob.glob(f'{tmp_path}/recipe_*_quick.txt')
        assert 'adamw' in open(log, encoding='utf-8').read()
    if bench == 'bench_train':  # its output and curves under new names there; the tables again from the curves
        (log,) = glob.glob(f'{tmp_path}/bench_train_*_quick.txt')
        (curves,) = glob.glob(f'{tmp_path}/bench_train_*_quick_numbers_d128.json')
        assert open(log, encoding='utf-8').read().strip() == r.stdout.strip()
        again = subprocess.run([sys.executable, f'bench/{bench}.py', f'--report={curves}'], cwd=ROOT, env=ENV,
                               capture_output=True, text=True, timeout=300)
        table = r.stdout[r.stdout.index('\nnumbers d128'):r.stdout.index('the curves:')].strip()
        assert again.returncode == 0 and again.stdout.strip() == table, (again.stdout, table, again.stderr[-3000:])
        (tmp_path / 'other.json').write_text('[1, 2]')  # not its curves: one line
        for bad, flag in ((tmp_path / 'other.json', '--report'), (tmp_path / 'missing.json', '--report'), ('', '--report'),
                          (log, '--out_dir')):  # a file where a folder is to be
            r = subprocess.run([sys.executable, f'bench/{bench}.py', f'{flag}={bad}', '--quick'], cwd=ROOT, env=ENV,
                               capture_output=True, text=True, timeout=300)
            assert r.returncode == 2 and r.stderr.count('\n') == 1 and r.stderr.startswith(f'{bench}.py: error: {flag}='), \
                r.stderr


@pytest.mark.bench_smoke
def test_bench_optimizer_runs_and_reports_both():
    r = subprocess.run([sys.executable, 'bench/bench_optimizer.py', '--sizes=demo', '--reps=2', '--threads=1'], cwd=ROOT,
                       env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [line for line in r.stdout.splitlines() if 'ratio' in line]
    assert len(lines) == 2 and all('transformers' in line and 'this toolkit' in line for line in lines)
    for bad in ('--sizes=bogus', '--reps=0', '--threads=0', '--threads=x', '--threads=1,', '--threads=99999',
                '--device=bogus'):
        r = subprocess.run([sys.executable, 'bench/bench_optimizer.py', bad], cwd=ROOT, env=ENV, capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 2 and 'Traceback' not in r.stderr, r.stderr[-2000:]


@pytest.mark.bench_smoke
@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(os.path.join(SHARED_DATA, 'real_train_3k.parquet')),
                    reason='needs ../shared/data/real_train_3k.parquet beside the checkout (CI has it)')
def test_bench_span_resume_runs_and_compares_kept_with_counted():
    mine = os.path.join(ROOT, 'bench', 'out', 'span_resume')  # a folder of that name, the bench's old place
    os.makedirs(mine, exist_ok=True)
    with open(os.path.join(mine, 'my_notes.txt'), 'w') as f:
        f.write('mine')
    r = subprocess.run([sys.executable, 'bench/bench_span_resume.py', '--rows=1000', '--runs=1'], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert 'counts kept' in r.stdout and 'token counts taken from the saved state' in r.stdout
    assert 'counted again' in r.stdout and 'counted in' in r.stdout
    # its own new folder, removed at its end: what bench/out held before is untouched
    assert not any(n.startswith('span_resume-') for n in os.listdir(os.path.join(ROOT, 'bench', 'out')))
    assert open(os.path.join(mine, 'my_notes.txt')).read() == 'mine'
    os.remove(os.path.join(mine, 'my_notes.txt'))
    if not os.listdir(mine):
        os.rmdir(mine)


def test_bench_steps_minimal_t5_computes_what_transformers_does(tokenizer):
    """bench/bench_step.py times a minimal T5 on the same weights: it must compute the same loss
    and gradients as transformers' (packed batches, both stacks, relative position bias)."""
    import torch

    from config import T5ModelConfig
    from conftest import make_texts
    from model.data.batches import TokenEncoder, make_batches, to_torch
    from model.data.packing import pack_batch
    from model.net.chat_model import build_model, token_loss_sum

    bench = load_bench('bench_step')
    pairs = make_texts(48, seed=3, max_len=40)
    (batch,) = make_batches([([p for p, _ in pairs], [r for _, r in pairs], None, 0)], TokenEncoder(tokenizer, 48))
    packed = {k: v for k, v in to_torch(pack_batch(batch, 48, 32)).items() if isinstance(v, torch.Tensor)}
    assert packed['input_ids'].shape[0] < 48  # several pairs a row: the masks matter
    torch.manual_seed(0)
    model = build_model(T5ModelConfig(d_model=32, num_heads=2, d_kv=16, d_ff=64, num_layers=2, num_decoder_layers=2,
                                      dropout_rate=0.0, feed_forward_proj='relu'), len(tokenizer))
    grads = []
    for loss in (token_loss_sum(model, packed, 'cpu'), bench.minimal_loss(model, packed)):
        loss.backward()
        grads.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
        model.zero_grad(set_to_none=True)
    (want, g_want), (got, g_got) = grads
    assert abs(got - want) < 1e-4 * want and set(g_got) == set(g_want)
    for k in g_want:  # float32 sums in another order: an element's error scales with the tensor's largest
        # (q.weight's gradient reaches ~20 here: 5.7e-6 apart on an AMD EPYC, within 1e-6 on another CPU)
        torch.testing.assert_close(g_got[k], g_want[k], rtol=1e-3, atol=1e-5 * float(g_want[k].abs().max()) + 1e-8)


def test_bench_steps_grouped_way_batches_as_the_peers_length_grouped_sampler():
    """bench_step's ``grouped`` way: the same rows, each megabatch of 50 batches sorted by prompt
    length (longest first), rows of other megabatches never mixed in."""
    import random

    bench = load_bench('bench_step')
    rng = random.Random(0)
    rows = [(f'p{i}', f'r{i}') for i in range(130 * 4)]
    lengths = [rng.randint(1, 60) for _ in rows]
    out = bench.length_grouped(rows, lengths, batch=4, mega=50)
    assert sorted(out) == sorted(rows)
    index = {row: i for i, row in enumerate(rows)}
    for start in range(0, len(rows), 200):
        mega = [index[r] for r in out[start:start + 200]]
        assert sorted(mega) == list(range(start, min(start + 200, len(rows))))
        assert [lengths[k] for k in mega] == sorted((lengths[k] for k in mega), reverse=True)


def test_a_benchs_output_takes_a_new_name_never_an_earlier_runs(tmp_path):
    heldout = load_bench('heldout')
    first, stem = heldout.new_log(str(tmp_path / 'out'), 'bench_train', quick=False)  # the folder made
    first.write('the first run\n')
    first.close()
    second, stem2 = heldout.new_log(str(tmp_path / 'out'), 'bench_train', quick=False)  # the same second, perhaps
    second.close()
    assert stem2 != stem and open(stem + '.txt', encoding='utf-8').read() == 'the first run\n'
    os.symlink(tmp_path / 'later', tmp_path / 'link')  # a link to a folder still to make: made there
    linked, _ = heldout.new_log(str(tmp_path / 'link'), 'bench_train', quick=False)
    linked.close()
    assert len(os.listdir(tmp_path / 'later')) == 1
    quick, stem3 = heldout.new_log(str(tmp_path / 'out'), 'bench_train', quick=True)
    quick.close()
    assert stem3.endswith('_quick') or '_quick-' in stem3


@pytest.mark.bench_smoke
@pytest.mark.slow
@pytest.mark.parametrize('bench,whom', [('bench_train', 'the bench'), ('bench_train', 'all of it'),
                                        ('bench_recipe', 'the bench')])
def test_a_stopped_learning_bench_removes_its_training_folders(bench, whom, tmp_path):
    """SIGTERM to the bench (it stops its child and waits) or to every process of it (a cluster's
    scancel): the training run's temporary folder is removed either way, the bench exits 143 soon
    -- bench_recipe runs its children from a thread pool, whose run it must not wait out."""
    import signal
    import time

    tmp = tmp_path / 'tmp'
    tmp.mkdir()
    args = (['--quick'] if bench == 'bench_train' else  # a run of minutes: the stop must not wait for it
            ['--settings=[{"optimizer": "adamw", "learn_rate": 0.001}]', '--steps=3000', '--seeds=1', '--sizes=d128'])
    proc = subprocess.Popen([sys.executable, f'bench/{bench}.py', *args, f'--out_dir={tmp_path}'], cwd=ROOT,
                            env=dict(ENV, TMPDIR=str(tmp)), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not glob.glob(f'{tmp}/bench-*/*') and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)  # until a run has made its folder and begun writing there
        assert glob.glob(f'{tmp}/bench-*'), 'no training folder was made'
        if whom == 'the bench':
            proc.send_signal(signal.SIGTERM)
        else:
            os.killpg(proc.pid, signal.SIGTERM)
        signalled = time.monotonic()
        _, err = proc.communicate(timeout=120)
        waited = time.monotonic() - signalled
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 143, err[-3000:]
    assert waited < 60, waited
    assert not glob.glob(f'{tmp}/bench-*'), os.listdir(tmp)  # (torch may leave its own cache there)


def test_a_bench_removes_only_the_temporary_folders_it_made(tmp_path, monkeypatch):
    """remove_folder (a run's end, a stop) acts on a folder temp_folder made in this process while it
    is still that folder: a user's folder, a link to one, or the made folder's name taken since by a
    link or another folder are left as they are."""
    import shutil
    import tempfile

    heldout = load_bench('heldout')
    monkeypatch.setattr(tempfile, 'tempdir', str(tmp_path))
    user = tmp_path / 'user'
    user.mkdir()
    (user / 'keep.txt').write_text('mine')
    link = tmp_path / 'link'
    link.symlink_to(user)
    for path in (user, link):  # never made here
        heldout.remove_folder(str(path))
    made = heldout.temp_folder('bench-ours-')
    (tmp_path / made / 'state').mkdir()
    heldout.remove_folder(made)
    assert not os.path.lexists(made)
    for replace in ('link', 'folder'):  # the name of a made folder taken since
        made = heldout.temp_folder('bench-ours-')
        shutil.rmtree(made)  # gone (by hand) and its name taken: by a link, or by a folder that may get its inode
        if replace == 'link':
            os.symlink(user, made)
        else:
            other = tmp_path / 'other'
            other.mkdir()
            (other / 'keep.txt').write_text('also mine')
            os.rename(other, made)
        heldout.remove_folder(made)
        assert os.path.lexists(made) and (tmp_path / made / 'keep.txt').exists()
    assert (user / 'keep.txt').read_text() == 'mine' and link.is_symlink()
    assert (tmp_path / made / 'keep.txt').read_text() == 'also mine'


@pytest.mark.bench_smoke
def test_bench_step_times_the_batch_it_is_given():
    r = subprocess.run([sys.executable, 'bench/bench_step.py', '--task=numbers', '--batch=8', '--batches=2', '--rounds=1',
                        '--threads=1'], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert '2 batches of 8,' in r.stdout and 'packed / minimal' in r.stdout, r.stdout


def test_a_benchs_output_place_that_is_a_file_unwritable_or_the_toolkits_code_is_one_line_exit_2(tmp_path):
    """A bad --out_dir (--dir for the benches that keep a work folder) ended in exit 1 (a file), wrote
    among the toolkit's code, or (bench_memory) in a CalledProcessError traceback: now each is
    refused in one line, exit 2, before anything is written."""
    afile = tmp_path / 'afile'
    afile.write_text('mine')
    cases = [('bench_train', 'out_dir', str(afile), 'is a file, not a folder'),
             ('bench_train', 'out_dir', f'{afile}/sub', f'cannot be made: {afile} is a file, not a folder'),
             ('bench_recipe', 'out_dir', '/proc/1/nope', 'is not writable for this user'),
             ('bench_train', 'out_dir', os.path.join(ROOT, 'model'), "is inside the toolkit's model/ folder"),
             ('bench_recipe', 'out_dir', ROOT, "is the toolkit's own folder (its code)"),
             ('bench_train', 'out_dir', os.path.join(ROOT, 'bench'), "is inside the toolkit's bench/ folder (its code)"),
             ('bench_resume', 'dir', str(afile), 'is a file, not a folder; give a folder, e.g. bench/out/resume'),
             ('bench_resume', 'dir', os.path.join(ROOT, 'tests'), "is inside the toolkit's tests/ folder"),
             ('bench_memory', 'dir', str(afile), 'is a file, not a folder; give a folder, e.g. bench/out/memory'),
             ('bench_memory', 'dir', os.path.join(ROOT, 'scripts', 'x'), "is inside the toolkit's scripts/ folder")]
    before = sorted(os.listdir(ROOT))
    for bench, flag, place, said in cases:
        quick = {'bench_train': ['--quick'], 'bench_recipe': ['--quick'], 'bench_resume': ['--runs=1'],
                 'bench_memory': ['--record_mb=1', '--log_mb=1']}[bench]
        r = subprocess.run([sys.executable, f'{ROOT}/bench/{bench}.py', *quick, f'--{flag}={place}'], cwd=tmp_path,
                           env=ENV, capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and r.stderr.count('\n') == 1, (bench, place, r.stderr[-2000:])
        assert r.stderr.startswith(f'{bench}.py: error: --{flag}={place} ') and said in r.stderr, r.stderr
        assert r.stdout == '', r.stdout
    assert sorted(os.listdir(ROOT)) == before and sorted(os.listdir(tmp_path)) == ['afile']
    assert afile.read_text() == 'mine' and not os.path.exists(os.path.join(ROOT, 'scripts', 'x'))


@pytest.mark.parametrize('bench,flag', [('bench_train', '--steps=-3'), ('bench_train', '--out_dir='),
                                        ('bench_train', '--eval_every=0'), ('bench_recipe', '--steps=-1,200'),
                                        ('bench_recipe', '--out_dir='), ('bench_recipe', '--steps=abc'),
                                        ('bench_recipe', '--seeds=1,x'), ('bench_train', '--seeds=')])
def test_a_learning_bench_refuses_flags_it_cannot_use_in_one_line(bench, flag, tmp_path):
    r = subprocess.run([sys.executable, f'{ROOT}/bench/{bench}.py', '--quick', flag], cwd=tmp_path, env=ENV,
                       capture_output=True, text=True, timeout=120)  # run elsewhere: nothing written there either
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith(f'{bench}.py: error: --'), r.stderr
    assert os.listdir(tmp_path) == []
