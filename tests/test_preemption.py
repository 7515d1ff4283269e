"""Preemption at any moment: SIGTERM (and SIGINT) wherever they land, as a cluster sends them.

A run is preempted as SLURM does it (:func:`preempt`): SIGTERM -- from a fault point at an exact
place, or from outside at a step -- then SIGKILL to the whole process group if it has not
exited within the grace period. Every run must exit by itself with 143 within it, and the
resume must end with the uninterrupted run's weights, bit for bit, and its evaluations.

RECORD_PREEMPTION=<file> appends one JSON row per landing (where -> what was saved -> exit,
seconds from the signal to the exit -> exact resume?): the table of the release note.
"""

from __future__ import annotations

import glob
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

import cli_runner
from model.state import markers
from conftest import (ENV, ROOT, STEP_RE, TWO_RANK_STEPS, TWO_RANKS, assert_same_weights, leftover_temps, make_texts,
                      tiny_flags, torchrun, write_parquet)

GRACE_S = 60  # the grace period of these runs (--stop_grace_s): each must exit by itself within it
RESUME = '--is_keep_training=True'
NOTICE = re.compile(r'SIG(TERM|INT): (finishing the step|the run is starting)')  # the handler's line at the signal
EVAL_RE = re.compile(r'eval at step (\d+) \([0-9.]+ s\): (.*)')


# --------------------------------------------------------------------------- the stop, in-process


@pytest.fixture
def stop():
    from model import stopping

    stopping.STOP.uninstall()
    stopping.STOP.install()
    yield stopping
    stopping.STOP.uninstall()


def test_a_stop_raises_outside_any_region_once_and_ignores_copies(stop, monkeypatch):
    monkeypatch.setattr(stop, 'REPEAT_S', 1e9)  # a slow machine must not make the SIGINT copy an abort
    with pytest.raises(stop.Stopped) as e:
        os.kill(os.getpid(), signal.SIGTERM)
    assert e.value.exit_code == 143 and not isinstance(e.value, KeyboardInterrupt)
    assert not isinstance(e.value, Exception)  # no `except Exception` can swallow it
    os.kill(os.getpid(), signal.SIGTERM)  # a launcher's copy: counted once, the process goes on
    os.kill(os.getpid(), signal.SIGINT)
    assert stop.requested() == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN  # also after the interpreter drops handlers


def test_a_stop_in_a_critical_region_is_raised_when_the_outermost_region_ends(stop):
    done = []
    with pytest.raises(stop.Interrupted) as e:
        with stop.critical():
            with stop.critical():
                os.kill(os.getpid(), signal.SIGINT)
                done.append('inner')
            done.append('outer')  # the inner region's end does not raise
    assert done == ['inner', 'outer'] and e.value.exit_code == 130
    assert isinstance(e.value, KeyboardInterrupt)  # code that lets Ctrl-C end one chat answer still can


def test_a_polled_stop_is_only_recorded_and_followers_leave_the_same_way(stop):
    with stop.polling():
        os.kill(os.getpid(), signal.SIGTERM)
        with stop.critical():
            pass
        assert stop.requested() == signal.SIGTERM  # recorded, nothing raised: the run saves first
    stop.STOP.uninstall()
    stop.STOP.install()
    with stop.polling():
        stop.STOP.follow(signal.SIGTERM)  # another rank's stop
        os.kill(os.getpid(), signal.SIGTERM)  # torchrun's SIGTERM once the first rank has left
    assert stop.requested() == signal.SIGTERM


def test_a_stop_names_the_signal_this_process_got_or_says_what_it_does_not_know(stop, monkeypatch, capfd):
    """A rank whose launcher was SIGKILLed said 'stopped by SIGTERM' as if someone had sent one: the
    SIGTERM is the kernel's (PR_SET_PDEATHSIG), sent whatever ended the launcher. It now says its
    launcher was gone and that what ended it is not known here; a rank that follows another rank's
    stop, with no signal of its own, says whose it was."""
    with stop.polling():  # a launcher alive: a SIGTERM is a SIGTERM
        os.kill(os.getpid(), signal.SIGTERM)
    assert stop.STOP.said() == 'SIGTERM' and stop.stop_line(stop.STOP.stopped('kept')) == 'stopped by SIGTERM: kept'
    stop.STOP.uninstall()
    stop.STOP.install()
    monkeypatch.setattr(stop, '_WATCHING_LAUNCHER', True)  # a rank whose launcher lives: it passed a stop on
    with stop.polling():
        os.kill(os.getpid(), signal.SIGTERM)
    assert stop.STOP.said() == 'SIGTERM'
    stop.STOP.uninstall()
    stop.STOP.install()
    monkeypatch.setattr(stop, '_PARENT', os.getppid() + 4_000_000)  # the launcher that started this rank: gone
    capfd.readouterr()
    with stop.polling():
        os.kill(os.getpid(), signal.SIGTERM)  # the kernel's, at the launcher's death
    said = (f'SIGTERM (its launcher, pid {os.getppid() + 4_000_000}, was gone: the kernel sends a rank SIGTERM when '
            f'its launcher dies, whatever ended that, which is not known here)')
    assert stop.STOP.said() == said and capfd.readouterr().err.startswith(f'{said}: finishing the step')
    stopped = stop.STOP.stopped('the state at step 8 saved')
    assert stopped.exit_code == 143 and stop.stop_line(stopped) == f'stopped by {said}: the state at step 8 saved'
    for follows, said in ((0, "another rank's stop"), (signal.SIGINT, "another rank's SIGINT")):
        stop.STOP.uninstall()
        stop.STOP.install()
        stop.STOP.follow(follows)  # no signal of its own: never 'stopped by SIGTERM'
        assert stop.STOP.said() == said and stop.STOP.stopped().exit_code == 128 + (follows or signal.SIGTERM)
    # the step's vote sums the ranks' signal numbers and how many stopped: the signal when all got the same one
    term, intr = int(signal.SIGTERM), int(signal.SIGINT)
    assert [stop.shared_signal(sum(got), len(got)) for got in ([term], [term, term], [intr] * 3, [intr, term],
                                                                 [intr, intr, term], [9], [])] == [
        signal.SIGTERM, signal.SIGTERM, signal.SIGINT, 0, 0, 0, 0]
    stop.STOP.uninstall()
    stop.STOP.install()
    with stop.polling():
        os.kill(os.getpid(), signal.SIGINT)  # its own first: what it got
        stop.STOP.follow(signal.SIGTERM)
    assert stop.STOP.said() == 'SIGINT'


def test_a_stop_after_the_work_is_done_is_said_and_changes_nothing(stop, tmp_path, data, capfd):
    """A SIGTERM after a run's final model is written (a job's end, a scancel a moment late) raised
    wherever it landed -- an atexit callback's traceback, or a silent 143 that a cluster script
    requeues: now it is said, and the command exits as done."""
    stop.STOP.finish()
    os.kill(os.getpid(), signal.SIGTERM)  # nothing raised, here or at a region's end
    with stop.critical():
        pass
    stop.STOP.raise_if_stopped()
    assert stop.requested() == signal.SIGTERM and 'SIGTERM after the work was done' in capfd.readouterr().err
    out = tmp_path / 'run'
    r = cli_runner.run([sys.executable, 'train_low_mem.py', 'train', *tiny_flags(data, out, max_steps=3)], cwd=ROOT,
                       env={**ENV, 'CHAT_SMALL_T5_FAULT': 'done:sigterm'}, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'SIGTERM after the work was done: nothing to stop, exiting as done' in r.stderr
    assert 'Traceback' not in r.stderr and 'stopped by' not in r.stderr and os.path.isdir(out / 'final')


def test_a_second_ctrl_c_after_the_repeat_time_aborts_at_once(stop, monkeypatch):
    class Aborted(BaseException):
        pass

    def fake_exit(code):
        raise Aborted(code)

    monkeypatch.setattr(os, '_exit', fake_exit)
    monkeypatch.setattr(stop, 'REPEAT_S', 0.0)
    with stop.polling():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)  # the repeat time (0 here) passes
        with pytest.raises(Aborted) as e:
            os.kill(os.getpid(), signal.SIGINT)
    assert e.value.args == (130,)


# --------------------------------------------------------------------------- writers other than training


def run_face(face, args, capsys) -> tuple[int, str]:
    """A command in-process (its stop handlers installed by main, as at process start)."""
    with pytest.raises(SystemExit) as e:
        face.main(list(map(str, args)))
        raise SystemExit(0)
    return e.value.code, capsys.readouterr().err


@pytest.mark.parametrize('command, action, code', [
    ('convert', 'sigterm', 143), ('clean', 'sigint', 130), ('split', 'sigterm', 143), ('demo', 'sigint', 130)])
def test_prepare_data_stopped_mid_write_leaves_no_temporary_and_says_so(stop, tmp_path, monkeypatch, capsys,
                                                                        command, action, code):
    import prepare_data

    src = write_parquet(tmp_path / 'in.parquet', make_texts(300, seed=3))
    out = tmp_path / 'out'
    args = {'convert': [src, out / 'a.parquet'], 'clean': [src, out / 'a.parquet'],
            'split': [src, f'--train_out={out}/t.parquet', f'--valid_out={out}/v.parquet'],
            'demo': [f'--out_dir={out}', '--rows=200']}[command]
    monkeypatch.setenv('CHAT_SMALL_T5_FAULT', f'write:{action}')  # written in full, not yet renamed
    got, err = run_face(prepare_data, [command, *args], capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert got == code and len(lines) == 1 and 'Traceback' not in err, err
    assert lines[0].startswith(f'stopped by {action.upper()}: '), lines
    written = sorted(glob.glob(f'{out}/*.parquet'))
    if command in ('split', 'demo'):
        # a pair: the stop landed once both were written in full, and waited for both renames (a
        # mismatched train/validation pair is never left); a stop before that leaves neither
        assert len(written) == 2 and lines[0].count(' written') == 2 and 'not written' not in lines[0], lines
        assert all(markers.file_kind(path) == markers.DATA for path in written)
    else:
        assert 'not written' in lines[0] and not written, lines
    assert not leftover_temps(tmp_path)


def test_tokenizer_predictions_and_plot_stopped_mid_write_leave_no_temporary_and_no_folder_made(
        stop, tmp_path, monkeypatch, capsys, tokenizer_dir):
    # each output in new folders: those are made for the write and go again when it is stopped
    import train_low_mem
    from config import T5ModelConfig
    from model.net.chat_model import build_model
    from model.state.model_files import save_model_folder
    from model.data.tokenizer import load_tokenizer

    src = write_parquet(tmp_path / 'text.parquet', make_texts(400, seed=4))
    monkeypatch.setenv('CHAT_SMALL_T5_FAULT', 'write:sigterm')
    code, err = run_face(train_low_mem, ['train_tokenizer', f'--train_file={src}', f'--tokenizer_dir={tmp_path}/new/a/tok',
                                         '--vocab_size=900'], capsys)
    assert code == 143 and err.strip().splitlines()[-1].startswith('stopped by SIGTERM: ') and 'Traceback' not in err
    assert not os.path.exists(f'{tmp_path}/new') and not leftover_temps(tmp_path)

    tok = load_tokenizer(tokenizer_dir)
    model = build_model(T5ModelConfig(d_model=16, num_heads=2, d_kv=8, d_ff=32, num_layers=1, num_decoder_layers=1),
                        len(tok))
    save_model_folder(model, model.state_dict(), tok, f'{tmp_path}/model', tag='final', step=0, max_seq_len=16)
    stop.STOP.uninstall()
    monkeypatch.setenv('CHAT_SMALL_T5_FAULT', 'write:sigint')
    code, err = run_face(train_low_mem, ['test', f'--model_dir={tmp_path}/model', f'--test_file={src}',
                                         '--max_test_rows=8', f'--out={tmp_path}/new/b/pred.jsonl'], capsys)
    assert code == 130 and 'stopped by SIGINT: ' in err and 'pred.jsonl not written' in err and 'Traceback' not in err
    assert not os.path.exists(f'{tmp_path}/new') and not leftover_temps(tmp_path)

    log = tmp_path / 'run.log'
    log.write_text(''.join(f'2026-01-01 00:00:00 [rank 0] INFO step {i}/9 | epoch 0 | loss {9 - i}.0 | lr 1e-3\n'
                           for i in range(1, 10)), encoding='utf-8')
    stop.STOP.uninstall()
    monkeypatch.setenv('CHAT_SMALL_T5_FAULT', 'write:sigterm')
    code, err = run_face(train_low_mem, ['plot', f'--log_file={log}', f'--out={tmp_path}/new/c/p.png'], capsys)
    assert code == 143 and 'p.png not written' in err and not os.path.exists(f'{tmp_path}/new')
    assert not leftover_temps(tmp_path)


def prepare(*args, fault=None):
    env = {**ENV, 'CHAT_SMALL_T5_FAULT': fault} if fault else ENV
    return cli_runner.Popen([sys.executable, 'prepare_data.py', *map(str, args)], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)


def test_prepare_data_ctrl_c_from_a_terminal_and_sigkill_then_the_rerun_sweeps(tmp_path):
    src = write_parquet(tmp_path / 'in.parquet', make_texts(300, seed=5))
    out = tmp_path / 'out.parquet'
    proc = prepare('convert', src, out, fault='write:sleep=60')  # holds its temporary: the signals land there
    deadline = time.time() + 60
    while not leftover_temps(tmp_path):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGINT)  # a terminal's Ctrl-C goes to the whole process group
    os.killpg(proc.pid, signal.SIGINT)  # pressed twice quickly: counted once
    _, err = proc.communicate(timeout=60)
    lines = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode == 130 and len(lines) == 1 and lines[0].startswith('stopped by SIGINT: '), err
    assert not os.path.exists(out) and not leftover_temps(tmp_path)

    proc = prepare('convert', src, out, fault='write:sigkill')  # a SIGKILL leaves its temporary ...
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL and len(leftover_temps(tmp_path)) == 1
    proc = prepare('convert', src, out)  # ... which the same command sweeps
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and os.path.isfile(out) and not leftover_temps(tmp_path), err


# --------------------------------------------------------------------------- training, as SLURM preempts it


def preempt(cmd, env, send_when=None, target=None, grace_s=GRACE_S, timeout=300):
    """Run cmd and preempt it: SIGTERM from a fault point inside it, or (send_when) from here
    once an output line matches, to target(proc) or the process; SIGKILL to its process group
    if it has not exited grace_s after the signal. -> (exit code, seconds from the signal to
    the exit, output); the code is -9 when it had to be killed."""
    proc = cli_runner.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, stdin=subprocess.DEVNULL)  # a launcher's cmd: a real one
    lines, at, signalled, matched = [], {}, threading.Event(), threading.Event()

    def read():
        for line in proc.stdout:
            lines.append(line)
            if send_when and not matched.is_set() and send_when(line):
                matched.set()
            if 'signal' not in at and NOTICE.search(line):
                at['signal'] = time.monotonic()
                signalled.set()
        signalled.set()  # the output ended: wake the waiter

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    if send_when:
        assert matched.wait(timeout), ''.join(lines)[-3000:]
        at['signal'] = time.monotonic()
        os.kill(target(proc) if target else proc.pid, signal.SIGTERM)
    else:
        signalled.wait(timeout)
        assert 'signal' in at, ''.join(lines)[-3000:]
    try:
        code = proc.wait(timeout=max(grace_s - (time.monotonic() - at['signal']), 0))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        code = proc.wait()
    seconds = time.monotonic() - at['signal']
    reader.join(timeout=30)
    return code, seconds, ''.join(lines)


def record(row: dict) -> None:
    if os.environ.get('RECORD_PREEMPTION'):
        with open(os.environ['RECORD_PREEMPTION'], 'a', encoding='utf-8') as f:
            f.write(json.dumps(row, ensure_ascii=False) + '\n')


def newest_state(out) -> tuple[int, bool] | None:
    """(step, evaluation pending) of the newest complete state."""
    from model.state.states import latest_state

    path = latest_state(f'{out}/state')
    if not path:
        return None
    saved = json.load(open(f'{path}/counters.json', encoding='utf-8'))
    return saved['global_step'], saved.get('eval_pending', False)


def states_snapshot(out) -> dict:
    return {p: open(p, 'rb').read() for p in sorted(glob.glob(f'{out}/state/*/chat_small_t5.json'))}


def log_of(out, before: set) -> str:
    new = sorted(set(glob.glob(f'{out}/logs/*.log')) - before)
    return ''.join(open(p, encoding='utf-8').read() for p in new)


def losses_of(text: str) -> dict[int, float]:
    return {int(m.group(1)): float(m.group(3)) for m in STEP_RE.finditer(text)}


def evaluations(text: str) -> list[tuple[int, str]]:
    return [(int(m.group(1)), m.group(2)) for m in EVAL_RE.finditer(text)]


def assert_stopped(code, seconds, output, name='SIGTERM', ranks=1):
    assert code == 128 + signal.Signals[name].value and seconds < GRACE_S, (code, seconds, output[-3000:])
    stops = [line for line in output.splitlines() if re.match(rf'(rank \d: )?stopped by {name}: ', line)]
    assert len(stops) == ranks, output[-3000:]
    assert output.count('Traceback') == output.count('ChildFailedError:'), output[-3000:]  # only torchrun's own


ONE_RANK = {'epochs': 1, 'save_steps': 8, 'eval_steps': 20, 'stop_grace_s': GRACE_S}  # 60 steps, evaluated at 20/40/60
ONE_RANK_STEPS = 60


@pytest.fixture(scope='module')
def one_rank_reference(tmp_path_factory, data):
    out = tmp_path_factory.mktemp('reference') / 'run'
    r = cli_runner.run([sys.executable, 'train_low_mem.py', 'train', *tiny_flags(data, out, **ONE_RANK)], cwd=ROOT,
                       env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return out, open(glob.glob(f'{out}/logs/*.log')[0], encoding='utf-8').read()


@pytest.mark.slow
def test_sigterm_anywhere_in_a_run_saves_exits_143_in_time_and_the_resume_is_exact(tmp_path, data,
                                                                                    one_rank_reference):
    ref_out, ref_log = one_rank_reference
    ref_losses, ref_evals = losses_of(ref_log), evaluations(ref_log)
    out = tmp_path / 'run'
    flags = tiny_flags(data, out, **ONE_RANK)
    cmd = [sys.executable, 'train_low_mem.py', 'train', *flags]
    rng = random.Random(2027)
    landings = [('a step (SIGTERM from outside)', None), ('inside a step (random)', 'train-step@{random}:sigterm'),
                ('the validation loss', 'eval-loss@20:sigterm'), ('start-up of a resume', 'start-up:sigterm'),
                ('the generation (BLEU, samples)', 'eval-generate@40:sigterm'), ('inside a save', 'state-save@48:sigterm'),
                ('the last evaluation', 'eval-loss@60:sigterm')]
    rows, all_logs = [], ''
    for where, fault in landings:
        saved = newest_state(out)
        if fault and '{random}' in fault:
            fault = fault.format(random=rng.randint(saved[0] + 1, 19))
        before_states, before_logs = states_snapshot(out), set(glob.glob(f'{out}/logs/*.log'))
        env = {**ENV, 'CHAT_SMALL_T5_FAULT': fault} if fault else ENV
        send_when = (lambda line: bool(re.search(r'step ([3-9]|1\d)/60 ', line))) if fault is None else None
        code, seconds, output = preempt(cmd + ([RESUME] if saved else []), env, send_when=send_when)
        assert_stopped(code, seconds, output)
        log = log_of(out, before_logs)
        all_logs += log
        now = newest_state(out)
        expected = {'the validation loss': (20, True), 'the generation (BLEU, samples)': (40, True),
                    'inside a save': (48, False), 'the last evaluation': (60, True)}.get(where)
        if where == 'start-up of a resume':
            assert states_snapshot(out) == before_states  # nothing new to save: the state is untouched
        elif expected:
            assert now == expected, (where, now)
            assert not any(step == now[0] for step, _ in evaluations(log)) or not now[1]  # a cut one is not logged
        else:
            assert now[0] > (saved[0] if saved else 0) and not now[1] and now[0] < 20, (where, now)
        if fault and fault.startswith('train-step'):
            assert now[0] == int(fault.split('@')[1].split(':')[0])  # the step in progress was finished
        # the steps this run trained are the uninterrupted run's: the previous stop resumed exactly
        resumed_exactly = all(ref_losses[s] == v for s, v in losses_of(log).items())
        if rows:
            rows[-1]['exact_resume'] = resumed_exactly
        rows.append({'ranks': 1, 'landed': where, 'fault': fault or 'SIGTERM from outside',
                     'saved': f'state at step {now[0]}' + (' (its evaluation pending)' if now[1] else '') +
                     (' (unchanged)' if where == 'start-up of a resume' else ''),
                     'exit': code, 'seconds_to_exit': round(seconds, 1)})
    assert not os.path.exists(f'{out}/final')  # the last evaluation was cut: no final export yet
    before_logs = set(glob.glob(f'{out}/logs/*.log'))
    r = cli_runner.run(cmd + [RESUME], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    log = log_of(out, before_logs)
    all_logs += log
    rows[-1]['exact_resume'] = all(ref_losses[s] == v for s, v in losses_of(log).items())
    for name in (f'chat_small_t5.{ONE_RANK_STEPS}.bin', 'chat_small_t5.best.bin', 'final/model.safetensors'):
        assert_same_weights(f'{ref_out}/{name}', f'{out}/{name}')
    assert sorted(evaluations(all_logs)) == sorted(ref_evals)  # each evaluation once, the same figures
    assert sorted(losses_of(all_logs)) == list(range(1, ONE_RANK_STEPS + 1))
    assert not leftover_temps(out)
    for row in rows:
        assert row['exact_resume'], rows
        record(row)


# --------------------------------------------------------------------------- two ranks under a launcher




def launch(flags, *extra, start_script=False):
    """(command, environment) of a two-rank CPU run under torchrun, or under the start script."""
    env = {**ENV, 'ACCELERATE_USE_CPU': '1'}
    if start_script:
        env.update(NUM_GPUS='2', PYTHON=sys.executable)
        return ['bash', 'start_pretrain_large.sh', *flags, *extra], env
    return [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', 'train_low_mem.py',
            'train', *flags, *extra], env


def rank_exit_codes(output) -> set[str]:
    return {line.split(':')[1].split()[0] for line in output.splitlines() if 'exitcode  :' in line}


def after_step(n):
    return lambda line: any(int(m.group(1)) >= n for m in STEP_RE.finditer(line))


@pytest.mark.slow
def test_sigterm_to_the_start_script_saves_on_both_ranks_and_resumes_exactly(tmp_path, data, two_rank_reference):
    """A preemption from outside, mid-step: the start script passes it to the launcher, which passes
    it to the ranks (SIGTERM straight to torchrun is the same path from there on: the SLURM test)."""
    out, target = tmp_path / 'run', 'the start script'
    flags = tiny_flags(data, out, **TWO_RANKS)
    cmd, env = launch(flags, start_script=True)
    code, seconds, output = preempt(cmd, env, send_when=after_step(10))
    log = open(sorted(glob.glob(f'{out}/logs/*.log'))[-1], encoding='utf-8').read()
    for rank in (0, 1):  # every rank saved its part and left with 143
        assert f'rank {rank}: stopped by SIGTERM' in log and 'exit code 143' in log, output[-3000:]
    assert code == 143 and seconds < GRACE_S, (code, seconds, output[-3000:])
    assert rank_exit_codes(output) <= {'143'}, output[-3000:]
    step, pending = newest_state(out)
    assert 10 <= step < TWO_RANK_STEPS
    from model.state.states import latest_state

    assert {f'random_states_{r}.pkl' for r in (0, 1)} <= set(os.listdir(latest_state(f'{out}/state')))
    cmd, env = launch(flags, RESUME)
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    final = f'chat_small_t5.{TWO_RANK_STEPS}.bin'
    assert_same_weights(f'{two_rank_reference[0]}/{final}', f'{out}/{final}')
    record({'ranks': 2, 'landed': f'a step (SIGTERM to {target})', 'fault': 'SIGTERM from outside',
            'saved': f'state at step {step}' + (' (its evaluation pending)' if pending else ''), 'exit': code,
            'seconds_to_exit': round(seconds, 1), 'exact_resume': True})


@pytest.mark.slow
def test_sigterm_to_one_rank_inside_an_evaluation_both_leave_together_and_resume_exactly(tmp_path, data,
                                                                                           two_rank_reference):
    """Rank 1 alone is signalled inside the validation loss (the ranks vote before every batch),
    then the main process alone inside the generation (rank 1 waits for its answers)."""
    ref_out, ref_log = two_rank_reference
    out = tmp_path / 'run'
    flags = tiny_flags(data, out, **TWO_RANKS)
    all_logs = ''
    # the rank not signalled says whose stop it followed: the ranks vote on the signal before every validation batch,
    # and a cut generation is learned at the next step's vote, which carries it too
    for where, fault, step, follower in (
            ('the validation loss, rank 1 only', 'eval-loss@20#1:sigterm', 20, "another rank's SIGTERM"),
            ('the generation, main only', 'eval-generate@40#0:sigterm', 40, "another rank's SIGTERM")):
        before_logs = set(glob.glob(f'{out}/logs/*.log'))
        cmd, env = launch(flags, *([RESUME] if newest_state(out) else []))
        code, seconds, output = preempt(cmd, {**env, 'CHAT_SMALL_T5_FAULT': fault})
        assert code == 1 and rank_exit_codes(output) == {'143'} and seconds < GRACE_S, (code, output[-3000:])
        log = log_of(out, before_logs)
        all_logs += log
        signalled = int(fault.split('#')[1][0])
        assert f'rank {signalled}: stopped by SIGTERM at step {step}' in log, log[-3000:]
        assert f'rank {1 - signalled}: stopped by {follower} at step {step}' in log, log[-3000:]
        assert newest_state(out) == (step, True) and step not in dict(evaluations(log))
        record({'ranks': 2, 'landed': where, 'fault': fault, 'saved': f'state at step {step} (its evaluation pending)',
                'exit': code, 'seconds_to_exit': round(seconds, 1), 'exact_resume': True})
    before_logs = set(glob.glob(f'{out}/logs/*.log'))
    cmd, env = launch(flags, RESUME)
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    all_logs += log_of(out, before_logs)
    final = f'chat_small_t5.{TWO_RANK_STEPS}.bin'
    assert_same_weights(f'{ref_out}/{final}', f'{out}/{final}')
    assert sorted(evaluations(all_logs)) == sorted(evaluations(ref_log))


@pytest.mark.slow
def test_a_two_rank_state_resumes_on_one_rank_at_the_same_data_position(tmp_path, data, two_rank_reference):
    out = tmp_path / 'run'
    cmd, env = launch(tiny_flags(data, out, **TWO_RANKS))
    preempt(cmd, env, send_when=after_step(10))
    step, _ = newest_state(out)
    # one process, the same global batch (8 = 2 x 4)
    r = cli_runner.run([sys.executable, 'train_low_mem.py', 'train',
                        *tiny_flags(data, out, **{**TWO_RANKS, 'batch_size_per_gpu': 8}), RESUME],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'resuming on 1 process(es), saved on 2' in r.stderr
    epoch, into = divmod(step, TWO_RANK_STEPS // TWO_RANKS['epochs'])
    positions = {f'step {step}, epoch {epoch}, {into * 8} rows into the epoch'}
    if into == 0 and epoch:  # at an epoch's end the state may name either side of the boundary
        positions.add(f'step {step}, epoch {epoch - 1}, {TWO_RANK_STEPS // TWO_RANKS["epochs"] * 8} rows into the epoch')
    assert any(p in r.stderr for p in positions), r.stderr[-3000:]
    assert not glob.glob(f'{out}/state/.tmp-*')
    # the weights went on from the state, not from scratch (dropout streams differ from 2 ranks, and
    # float reduction order: compared by data position, not bit for bit)
    ref, resumed = losses_of(two_rank_reference[1]), losses_of(r.stderr)
    assert sorted(resumed) == list(range(step + 1, TWO_RANK_STEPS + 1))
    near = [s for s in range(step + 1, step + 6) if s in ref]  # a few steps: 1 rank's dropout draws differ
    assert abs(sum(resumed[s] - ref[s] for s in near) / len(near)) < 0.1  # from scratch: ~0.4 away


@pytest.mark.slow
def test_a_damage_only_the_main_process_finds_stops_every_rank_at_once(tmp_path, data):
    # every state's optimizer.bin replaced by bytes of its size: the sizes every rank checks pass,
    # the checksums the main process alone checks do not; no rank may wait for it in the engine
    out = tmp_path / 'run'
    flags = tiny_flags(data, out, max_steps=4, save_steps=2, max_eval_rows=8, bleu_samples=0)
    r = torchrun(flags, 2)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    for state in glob.glob(f'{out}/state/state-*'):
        path = f'{state}/optimizer.bin'
        size = os.path.getsize(path)
        with open(path, 'wb') as f:
            f.write(bytes(random.Random(size).getrandbits(8) for _ in range(size)))
    r = torchrun(flags + [RESUME], 2)
    output = r.stdout + r.stderr
    assert r.returncode != 0 and 'every saved state is damaged' in output, output[-3000:]
    assert 'optimizer.bin differs from what was saved (checksum)' in output
    assert 'forcefully exiting' not in output and 'Unable to shutdown' not in output, output[-3000:]
