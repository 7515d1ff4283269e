"""Faults during a run: kills at random points, a kill inside a save, damaged states, a full
disk. After each, a resume ends with the uninterrupted run's weights. (Signals that ask a run
to stop -- SIGTERM, SIGINT -- are in test_preemption.py.)"""

from __future__ import annotations

import glob
import os
import random
import shutil
import signal
import subprocess
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


@pytest.mark.slow
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


def test_a_kill_between_a_state_and_its_step_file_loses_no_step_file(tmp_path, data):
    """save_all_ranks writes the state, then the step's weights file: a SIGKILL between the two
    left chat_small_t5.<step>.bin missing for good (the resume went on past it, without a word).
    The resume writes it from the state: the very weights that state holds."""
    out = tmp_path / 'run'
    flags = tiny_flags(data, out, **{**EXTRA, 'max_steps': 12, 'keep_latest_n_ckp': 0})
    r = cli_runner.run(train_cmd(flags), cwd=ROOT, env={**ENV, 'CHAT_SMALL_T5_FAULT': 'state-saved@8:sigkill'},
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == -signal.SIGKILL and state_folders(f'{out}/state')[-1] == 'state-000000008', r.stderr[-2000:]
    assert not os.path.exists(f'{out}/chat_small_t5.8.bin')
    r = run_train(flags, RESUME)
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'chat_small_t5.8.bin, the step file of the state resumed from, is missing' in r.stderr
    assert_same_weights(f'{out}/state/state-000000008/model.safetensors', f'{out}/chat_small_t5.8.bin')
    assert os.path.isfile(f'{out}/chat_small_t5.12.bin')

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
    # the first save of a run: nothing to resume, and the line says to start again
    first = tmp_path / 'first'
    r = cli_runner.run(train_cmd(tiny_flags(data, first, **EXTRA)), cwd=ROOT, capture_output=True, text=True,
                       env={**ENV, 'CHAT_SMALL_T5_FAULT': 'state-save@4:enospc'}, timeout=300)
    errors = [line for line in r.stderr.splitlines() if line.startswith('error: ')]
    assert r.returncode == 2 and len(errors) == 1 and 'no earlier state was saved' in errors[0], r.stderr[-3000:]
    assert errors[0].endswith('Free space, then start the run again') and not state_folders(f'{first}/state')


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
        from model.state.states import latest_state, list_complete_states

        assert all(latest_state(f'{out}/state') == p for _, p in list_complete_states(f'{out}/state')[-1:])
    finally:
        subprocess.run(['umount', str(disk)], check=False)


def test_a_log_file_on_a_full_disk_is_one_line_and_the_run_goes_on(capsys):
    """/dev/full fails every write with ENOSPC, as a filled-up log disk does mid-run."""
    import logging

    from model.train.run_support import LogFile

    handler = LogFile('/dev/full', mode='a', encoding='utf-8')
    log = logging.getLogger('test_log_on_full_disk')
    log.propagate, log.handlers = False, [handler]
    try:
        for step in range(5):
            log.warning('step %d', step)
    finally:
        handler.close()
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines == ['warning: cannot write the log file /dev/full (No space left on device); logging to the '
                     'console only from here on'], err
