"""Faults during a run: kills at random points, a kill inside a save, damaged states, a full
disk, SIGTERM under a launcher. After each, a resume ends with the uninterrupted run's weights."""

from __future__ import annotations

import glob
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest

import cli_runner
from conftest import (ENV, ROOT, assert_same_weights, leftover_temps, logged_losses, run_logs, run_train, state_folders,
                      tiny_flags, train_cmd)

EXTRA = {'epochs': 2, 'save_steps': 4, 'eval_steps': 20}  # 120 optimizer steps, a state every 4
TOTAL = 120
RESUME = '--is_keep_training=True'


@pytest.fixture(scope='module')
def reference(tmp_path_factory, data):
    out = tmp_path_factory.mktemp('reference') / 'run'
    r = run_train(tiny_flags(data, out, **EXTRA))
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def final_weights(out):
    return f'{out}/chat_small_t5.{TOTAL}.bin'


def newest_log_step(out) -> int:
    logs = run_logs(out)
    if not logs:
        return 0
    steps = logged_losses_of(logs[-1])
    return max(steps, default=0)


def logged_losses_of(log) -> list[int]:
    from conftest import STEP_RE

    return [int(m.group(1)) for m in STEP_RE.finditer(open(log, encoding='utf-8').read())]


def has_state(out) -> bool:
    return bool(glob.glob(f'{out}/state/state-*/chat_small_t5.json'))


def test_sigkill_at_five_random_points_then_the_resume_is_exact(tmp_path, data, reference):
    out = tmp_path / 'run'
    flags = tiny_flags(data, out, **EXTRA)
    targets = sorted(random.Random(2026).sample(range(6, TOTAL - 4), 5))
    for target in targets:
        resume = [RESUME] if has_state(out) else []
        proc = cli_runner.Popen(train_cmd(flags, *resume), cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while newest_log_step(out) < target:
            assert proc.poll() is None and time.time() < deadline, f'the run ended before step {target}'
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    r = run_train(flags, RESUME)
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_weights(final_weights(reference), final_weights(out))
    ref_losses, losses = logged_losses(reference), logged_losses(out)
    assert all(losses[s] == ref_losses[s] for s in ref_losses)


def test_sigkill_inside_a_save_keeps_the_previous_state_and_the_resume_is_exact(tmp_path, data, reference):
    out = tmp_path / 'run'
    flags = tiny_flags(data, out, **EXTRA)
    env = {**ENV, 'CHAT_SMALL_T5_FAULT': 'state-save@8:sleep=60'}  # widens the save of step 8
    proc = cli_runner.Popen(train_cmd(flags), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not glob.glob(f'{out}/state/.tmp-state-000000008/model.safetensors'):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert state_folders(f'{out}/state') == ['state-000000004']
    r = run_train(flags, RESUME)
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'resumed from' in r.stderr and 'state-000000004' in r.stderr
    assert not glob.glob(f'{out}/state/.tmp-*')
    assert_same_weights(final_weights(reference), final_weights(out))


def test_a_damaged_newest_state_falls_back_to_the_previous_one(tmp_path, data, reference):
    out = tmp_path / 'run'
    shutil.copytree(reference, out)
    assert state_folders(f'{out}/state') == ['state-000000116', 'state-000000120']
    for name in ('chat_small_t5.120.bin', 'final'):  # the run's end products, written again by the resume
        shutil.move(os.path.join(out, name), os.path.join(tmp_path, name))
    newest = f'{out}/state/state-000000120'
    with open(f'{newest}/model.safetensors', 'r+b') as f:  # truncated
        f.truncate(100)
    flags = tiny_flags(data, out, **EXTRA)
    dry = cli_runner.run(train_cmd(flags, RESUME, '--dry_run=True'), cwd=ROOT, env=ENV, capture_output=True,
                         text=True, timeout=120)
    assert dry.returncode == 0 and 'is damaged' in dry.stdout and 'state-000000116' in dry.stdout, dry.stdout
    r = run_train(flags, RESUME)
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'is damaged' in r.stderr and 'resumed from' in r.stderr and 'state-000000116' in r.stderr
    assert_same_weights(final_weights(reference), final_weights(out))
    # marker present but files missing, in every state: one line, nothing changed
    for state in glob.glob(f'{out}/state/state-*'):
        os.remove(f'{state}/optimizer.bin')
    r = run_train(flags, RESUME)
    assert r.returncode == 2 and 'Traceback' not in r.stderr, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith('error: ')]
    assert len(errors) == 1 and 'every saved state is damaged' in errors[0] and 'optimizer.bin is missing' in errors[0]


def test_disk_full_during_a_save_is_one_line_and_leaves_the_previous_state(tmp_path, data, reference):
    out = tmp_path / 'run'
    flags = tiny_flags(data, out, **EXTRA)
    env = {**ENV, 'CHAT_SMALL_T5_FAULT': 'state-save@8:enospc'}
    r = cli_runner.run(train_cmd(flags), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and 'Traceback' not in r.stderr, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith('error: ')]
    assert len(errors) == 1 and 'disk full' in errors[0] and 'state-000000004 is intact' in errors[0], errors
    assert state_folders(f'{out}/state') == ['state-000000004']
    assert not leftover_temps(out)
    r = run_train(flags, RESUME)
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_weights(final_weights(reference), final_weights(out))


def _mount_tmpfs(path, size) -> bool:
    os.makedirs(path)
    r = subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs', str(path)], capture_output=True)
    return r.returncode == 0


def test_a_real_full_disk_anywhere_in_a_save_is_one_line_and_nothing_half_written(tmp_path, data):
    disk = tmp_path / 'small_disk'
    if not _mount_tmpfs(disk, '1600k'):
        pytest.skip('cannot mount a small tmpfs here (the injected-error test covers the state save)')
    try:
        out = disk / 'run'
        flags = tiny_flags(data, out, log_dir=tmp_path / 'logs', **{**EXTRA, 'eval_steps': 4})
        r = run_train(flags)
        assert r.returncode == 2 and 'Traceback' not in r.stderr, r.stderr[-3000:]
        errors = [line for line in r.stderr.splitlines() if line.startswith('error: ')]
        assert len(errors) == 1 and 'disk full' in errors[0], errors
        assert not leftover_temps(out), leftover_temps(out)
        from model.state_files import latest_state, list_complete_states

        assert all(latest_state(f'{out}/state') == p for _, p in list_complete_states(f'{out}/state')[-1:])
    finally:
        subprocess.run(['umount', str(disk)], check=False)


# --------------------------------------------------------------------------- SIGTERM, 2 ranks


def torchrun_popen(flags, *extra, start_script=False):
    env = {**ENV, 'ACCELERATE_USE_CPU': '1'}
    if start_script:
        cmd = ['bash', 'start_pretrain_large.sh', *flags, *extra]
        env.update(NUM_GPUS='2', PYTHON=sys.executable)
    else:
        cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
               'train_low_mem.py', 'train', *flags, *extra]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, stdin=subprocess.DEVNULL)


def rank_pids(launcher_pid) -> list[int]:
    """The ranks: the processes running train_low_mem.py train below the launcher."""
    out = subprocess.run(['ps', '-ww', '-eo', 'pid=,ppid=,args='], capture_output=True, text=True).stdout
    children: dict[int, list[tuple[int, str]]] = {}
    for line in out.splitlines():
        pid, ppid, args = line.split(None, 2)
        children.setdefault(int(ppid), []).append((int(pid), args))
    found, todo = [], [launcher_pid]
    while todo:
        for pid, args in children.get(todo.pop(), []):
            todo.append(pid)
            if 'train_low_mem.py train' in args and 'torch.distributed.run' not in args and 'accelerate' not in args:
                found.append(pid)
    return sorted(found)


# 240 optimizer steps (60 an epoch): long enough that the SIGTERM lands mid-run on a loaded 2-core machine
TWO_RANKS = {'epochs': 4, 'save_steps': 1000, 'batch_size_per_gpu': 4}
TWO_RANK_STEPS = 240


def test_a_rank_stopping_for_another_ranks_signal_survives_the_launchers_sigterm_on_its_way_out():
    """torchrun SIGTERMs the ranks still alive when the first one exits: a rank that stopped
    because another rank got the signal must not be killed by it after leaving the loop."""
    from model.run_support import StopSignals

    before = signal.getsignal(signal.SIGTERM)
    with StopSignals():  # no stop: the handlers are given back
        pass
    assert signal.getsignal(signal.SIGTERM) is before
    try:
        with StopSignals() as stop:
            stop.follow(signal.SIGTERM)
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
        os.kill(os.getpid(), signal.SIGTERM)  # would end this process with the default handler
        assert stop.signum == signal.SIGTERM
    finally:
        signal.signal(signal.SIGTERM, before)


@pytest.fixture(scope='module')
def two_rank_reference(tmp_path_factory, data):
    out = tmp_path_factory.mktemp('two_rank_reference') / 'run'
    proc = torchrun_popen(tiny_flags(data, out, **TWO_RANKS))
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-3000:]
    return out


@pytest.mark.parametrize('target', ['one rank', 'the launcher', 'the start script'])
def test_sigterm_under_a_launcher_saves_on_both_ranks_and_resumes_exactly(tmp_path, data, target,
                                                                         two_rank_reference):
    out = tmp_path / 'run'
    flags = tiny_flags(data, out, **TWO_RANKS)
    proc = torchrun_popen(flags, start_script=target == 'the start script')
    deadline = time.time() + 240
    while newest_log_step(out) < 10 or len(rank_pids(proc.pid)) < 2:
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-3000:]
        time.sleep(0.02)
    ranks = rank_pids(proc.pid)
    assert len(ranks) == 2, ranks
    os.kill(ranks[1] if target == 'one rank' else proc.pid, signal.SIGTERM)
    output, _ = proc.communicate(timeout=300)
    log = open(run_logs(out)[-1], encoding='utf-8').read()
    for rank in (0, 1):  # every rank saved its part and left with 143
        assert f'rank {rank}: stopped by SIGTERM' in log and 'exit code 143' in log, output[-3000:]
    if target == 'one rank':
        codes = [line.split(':')[1].split()[0] for line in output.splitlines() if 'exitcode  :' in line]
        assert codes and set(codes) == {'143'}, output[-3000:]  # no rank killed by the second SIGTERM
    if target == 'the start script':
        assert proc.returncode == 143, output[-3000:]
    states = state_folders(f'{out}/state')
    assert len(states) == 1
    step = int(states[0].split('-')[1])
    assert 10 <= step < TWO_RANK_STEPS
    assert {f'random_states_{r}.pkl' for r in (0, 1)} <= set(os.listdir(f'{out}/state/{states[0]}'))
    resumed = torchrun_popen(flags, RESUME)
    output, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, output[-3000:]
    final = f'chat_small_t5.{TWO_RANK_STEPS}.bin'
    assert_same_weights(f'{two_rank_reference}/{final}', f'{out}/{final}')


def test_a_two_rank_state_resumes_on_one_rank_at_the_same_data_position(tmp_path, data, two_rank_reference):
    out = tmp_path / 'run'
    proc = torchrun_popen(tiny_flags(data, out, **TWO_RANKS))
    deadline = time.time() + 240
    while newest_log_step(out) < 10 or len(rank_pids(proc.pid)) < 2:
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGTERM)
    proc.communicate(timeout=300)
    step = int(state_folders(f'{out}/state')[-1].split('-')[1])
    # one process, the same global batch (8 = 2 x 4)
    r = run_train(tiny_flags(data, out, **{**TWO_RANKS, 'batch_size_per_gpu': 8}), RESUME)
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
    ref, resumed = logged_losses(two_rank_reference), logged_losses_of(run_logs(out)[-1])
    assert resumed == list(range(step + 1, TWO_RANK_STEPS + 1))
    last = logged_losses(out)
    assert abs(last[step + 1] - ref[step + 1]) < 0.1  # from scratch it would be ~0.4 away
