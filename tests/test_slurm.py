"""SLURM: scripts/slurm_2nodes.sbatch on one machine, with stand-ins for srun and scontrol, two
"nodes" of one CPU rank each. SIGTERM to the batch shell (as --signal=B: sends it) saves on every
node and requeues; the requeued job resumes by itself and ends with an uninterrupted run's weights;
a finished run, a user error are not requeued; a crashed node brings the job down and requeues.
And every environment input of the start script and the batch script is checked before use."""

from __future__ import annotations

import glob
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import ENV, ROOT, TWO_RANK_STEPS, TWO_RANKS, assert_same_weights, state_folders, tiny_flags

SBATCH = os.path.join(ROOT, 'scripts', 'slurm_2nodes.sbatch')

# slurmstepd's part, as far as these tests need it: each task once per node, srun's SIGTERM/SIGINT
# passed on to the tasks, --kill-on-bad-exit (a task ending non-zero: SIGTERM to the others, then
# SIGKILL to what is left of them after KILL_WAIT s), and at the step's end every process still
# left of it killed (orphans come to srun, a child subreaper, as a step's cgroup holds them)
STAND_IN_SRUN = '''#!{python}
import ctypes, os, signal, subprocess, sys, time
KILL_WAIT = 5.0
ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
open(os.environ['STAND_IN_LOG'], 'a').write('srun ' + ' '.join(sys.argv[1:2]) + '\\n')
args, kill_bad = sys.argv[1:], False
while args[0].startswith('--'):
    kill_bad |= args.pop(0) == '--kill-on-bad-exit=1'
tasks = [subprocess.Popen(args, env={{**os.environ, 'SLURM_NODEID': str(n), 'SLURM_PROCID': str(n)}})
         for n in range(int(os.environ['SLURM_NNODES']))]
def descendants():
    rows = [line.split() for line in subprocess.run(['ps', '-eo', 'pid=,ppid='], capture_output=True,
                                                       text=True).stdout.splitlines()]
    found, todo = [], [os.getpid()]
    while todo:
        parent = todo.pop()
        kids = [int(p) for p, pp in rows if int(pp) == parent and int(p) != os.getpid()]
        found += kids
        todo += kids
    return [p for p in found if p not in {{t.pid for t in tasks if t.poll() is not None}}]
def kill_all():
    for pid in descendants():
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
def pass_on(signum, frame):
    for t in tasks:
        if t.poll() is None:
            t.send_signal(signum)
signal.signal(signal.SIGTERM, pass_on)
signal.signal(signal.SIGINT, pass_on)
kill_at = None
while [t.poll() for t in tasks].count(None):  # every task polled: a list, not any()'s short cut
    if kill_bad and kill_at is None and any(t.returncode not in (None, 0) for t in tasks):
        kill_at = time.monotonic() + KILL_WAIT
        pass_on(signal.SIGTERM, None)
    if kill_at is not None and time.monotonic() > kill_at:
        kill_all()
    time.sleep(0.05)
kill_all()
sys.exit(max(t.returncode if t.returncode >= 0 else 128 - t.returncode for t in tasks))
'''
STAND_IN_SCONTROL = '''#!/bin/sh
echo "scontrol $*" >> "$STAND_IN_LOG"
case "$1 $2" in
  'show hostnames') printf 'node-7\\nnode-8\\n' ;;
  'show job') echo "JobId=$3 JobName=chat_small_t5 JobState=${STAND_IN_JOB_STATE:-RUNNING} Reason=None" ;;
esac
'''

def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.fixture(scope='module')
def stand_ins(tmp_path_factory):
    folder = tmp_path_factory.mktemp('slurm_bin')
    (folder / 'srun').write_text(STAND_IN_SRUN.format(python=sys.executable))
    (folder / 'scontrol').write_text(STAND_IN_SCONTROL)
    for name in ('srun', 'scontrol'):
        os.chmod(folder / name, 0o755)
    return folder


def job_env(stand_ins, log, job_id, **extra):
    return {**ENV, 'PATH': f'{stand_ins}:/usr/bin:/bin', 'PYTHON': sys.executable, 'STAND_IN_LOG': str(log),
            'SLURM_SUBMIT_DIR': ROOT, 'SLURM_JOB_ID': str(job_id), 'SLURM_NNODES': '2', 'GPUS_PER_NODE': '1',
            'ACCELERATE_USE_CPU': '1', 'MAIN_PROCESS_IP': '127.0.0.1', 'MAIN_PROCESS_PORT': str(free_port()),
            **extra}


def start_job(flags, env):
    return subprocess.Popen(['bash', SBATCH, *flags], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL, start_new_session=True)


def calls(log) -> list[str]:
    return open(log).read().splitlines() if os.path.exists(log) else []


def descendants(pid, needle) -> list[int]:
    out = subprocess.run(['ps', '-ww', '-eo', 'pid=,ppid=,args='], capture_output=True, text=True).stdout
    children: dict[int, list[tuple[int, str]]] = {}
    for line in out.splitlines():
        p, pp, args = (line.split(None, 2) + [''])[:3]
        children.setdefault(int(pp), []).append((int(p), args))
    found, todo = [], [pid]
    while todo:
        for p, args in children.get(todo.pop(), []):
            todo.append(p)
            if needle in args and '--dry_run' not in args:
                found.append(p)
    return sorted(found)


def dry_runs(out) -> list[str]:
    ps = subprocess.run(['ps', '-ww', '-eo', 'args='], capture_output=True, text=True).stdout.splitlines()
    return [args for args in ps if f'--output_dir={out} ' in args and '--dry_run=True' in args]


def newest_step(out) -> int:
    steps = [int(s) for log in glob.glob(f'{out}/logs/*.log')
             for s in re.findall(r'step (\d+)/', open(log, encoding='utf-8').read())]
    return max(steps, default=0)


def wait_for_training(job, out, step=10, ranks=2):
    deadline = time.time() + 300
    while newest_step(out) < step or len(descendants(job.pid, 'rank_outcome.py')) < ranks:
        assert job.poll() is None and time.time() < deadline, job.stdout.read()[-3000:]
        time.sleep(0.05)


def no_outcome_folder_left(job_id) -> bool:
    return not glob.glob(os.path.join(ROOT, 'logs', f'.slurm-{job_id}.*'))


@pytest.mark.slow
def test_sigterm_saves_on_every_node_requeues_and_the_requeued_job_resumes_exactly(tmp_path, data, stand_ins,
                                                                                  two_rank_reference):
    out, log, job_id = tmp_path / 'run', tmp_path / 'calls', 900000 + os.getpid() % 90000
    flags = tiny_flags(data, out, **TWO_RANKS)
    # the stop's save takes 8 s: every further signal below, and torchrun's exit, land while the ranks save
    # COLUMNS as a submitter's terminal exports it: ps must not cut the command lines the start script reads
    job = start_job(flags, job_env(stand_ins, log, job_id, CHAT_SMALL_T5_FAULT='state-save:sleep=8', COLUMNS='80'))
    wait_for_training(job, out)
    os.kill(job.pid, signal.SIGTERM)  # SLURM's --signal=B:TERM@N: the batch shell only
    launchers = descendants(job.pid, 'accelerate launch')
    assert len(launchers) == 2, launchers
    for pid in launchers:  # torchrun waits for the ranks as long as the run's --stop_grace_s
        assert b'TORCH_ELASTIC_SHUTDOWN_TIMEOUT=60\0' in open(f'/proc/{pid}/environ', 'rb').read()
    time.sleep(0.5)
    os.kill(job.pid, signal.SIGTERM)  # twice: passed on once
    for _ in range(2):  # a preemption's SIGTERM to every process: torchrun leaves its ranks saving
        for pid in launchers:
            os.kill(pid, signal.SIGTERM)
        time.sleep(0.5)
    output, _ = job.communicate(timeout=300)
    assert job.returncode == 143, output[-3000:]
    log_text = open(glob.glob(f'{out}/logs/*.log')[0], encoding='utf-8').read()
    for rank in (0, 1):  # both saved and left by themselves: the step's end kills what is left
        assert f'rank {rank}: stopped by SIGTERM' in log_text, output[-3000:]
    assert 'to finish its save' in output and 'did not end within the grace period' not in output  # waited
    assert 'stopped (rank(s) 143 143; node(s) 143 143): requeued (restart 1 of at most 50)' in output, output[-3000:]
    assert [c for c in calls(log) if c.startswith('scontrol requeue')] == [f'scontrol requeue {job_id}']
    assert len([c for c in calls(log) if c.startswith('srun')]) == 1
    states = state_folders(f'{out}/state')
    assert len(states) == 1 and 10 <= int(states[0].split('-')[1]) < TWO_RANK_STEPS, states
    assert no_outcome_folder_left(job_id)

    # the requeued job: the same script and flags, no --is_keep_training from anyone
    requeued = start_job(flags, job_env(stand_ins, log, job_id, SLURM_RESTART_COUNT='1'))
    output, _ = requeued.communicate(timeout=400)
    assert requeued.returncode == 0, output[-3000:]
    assert f'resumed from {out}/state/{states[0]}' in output, output[-3000:]
    assert 'a fresh run moves' not in output  # the start script's dry run note of a fresh run: not this one
    final = f'chat_small_t5.{TWO_RANK_STEPS}.bin'
    assert_same_weights(f'{two_rank_reference[0]}/{final}', f'{out}/{final}')
    # a finished run is not requeued
    assert len([c for c in calls(log) if c.startswith('scontrol requeue')]) == 1
    assert no_outcome_folder_left(job_id)


@pytest.mark.slow
def test_a_crashed_node_brings_the_job_down_and_requeues(tmp_path, data, stand_ins):
    out, log, job_id = tmp_path / 'run', tmp_path / 'calls', 800000 + os.getpid() % 90000
    job = start_job(tiny_flags(data, out, **TWO_RANKS), job_env(stand_ins, log, job_id))
    wait_for_training(job, out, step=2)
    os.kill(descendants(job.pid, 'rank_outcome.py')[-1], signal.SIGKILL)
    output, _ = job.communicate(timeout=300)
    assert job.returncode == 1, output[-3000:]
    assert re.search(r'crashed \(rank\(s\) [^;]*running[^;]*; node\(s\) [^)]*\): requeued', output), output[-3000:]
    assert [c for c in calls(log) if c.startswith('scontrol requeue')] == [f'scontrol requeue {job_id}']
    assert newest_step(out) < TWO_RANK_STEPS
    assert no_outcome_folder_left(job_id)


def test_a_user_error_is_not_requeued(tmp_path, data, stand_ins):
    out, log, job_id = tmp_path / 'run', tmp_path / 'calls', 700000 + os.getpid() % 90000
    # a mistake every node's start script refuses at once (the dry run's are the same exit 2)
    env = job_env(stand_ins, log, job_id, TORCH_ELASTIC_SHUTDOWN_TIMEOUT='soon')
    r = subprocess.run(['bash', SBATCH, *tiny_flags(data, out)], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2, r.stderr[-3000:]
    assert 'error: TORCH_ELASTIC_SHUTDOWN_TIMEOUT=soon' in r.stderr, r.stderr
    # the node that refuses second may be stopped first by srun's --kill-on-bad-exit (143)
    assert re.search(r'user error \(the error above; node\(s\) (2 2|2 143|143 2)\): not requeued', r.stderr), r.stderr
    assert not [c for c in calls(log) if c.startswith('scontrol requeue')]
    assert no_outcome_folder_left(job_id)


@pytest.mark.slow
def test_a_stop_during_start_up_saves_nothing_and_a_cancelled_job_is_not_requeued(tmp_path, data, stand_ins):
    out, log, job_id = tmp_path / 'run', tmp_path / 'calls', 600000 + os.getpid() % 90000
    # each node's dry run waits at its start (the two need not overlap on their own on a busy machine)
    job = start_job(tiny_flags(data, out), job_env(stand_ins, log, job_id, STAND_IN_JOB_STATE='CANCELLED',
                                                   CHAT_SMALL_T5_FAULT='dry-run:sleep=120'))
    deadline = time.time() + 100
    while len(dry_runs(out)) < 2:  # both nodes are in their start script's dry run
        assert job.poll() is None and time.time() < deadline
        time.sleep(0.02)
    os.kill(job.pid, signal.SIGTERM)  # scancel: SIGTERM, and the job is CANCELLED
    output, _ = job.communicate(timeout=120)
    assert job.returncode == 143, output[-3000:]
    assert 'was cancelled (node(s) 143 143): not requeued' in output, output[-3000:]
    assert not [c for c in calls(log) if c.startswith('scontrol requeue')]
    assert not os.path.exists(out / 'state') and not dry_runs(out)  # nothing trained, nothing left running
    assert no_outcome_folder_left(job_id)


def stub_job(tmp_path, stand_ins, node_script, **env):
    """The batch script over a stand-in start script (bash, run per node with MACHINE_RANK set) that
    writes the ranks' records as scripts/rank_outcome.py would: the batch script's decisions, in ms."""
    work = tmp_path / 'job'
    os.makedirs(work / 'scripts')
    os.symlink(os.path.join(ROOT, 'scripts', 'env_checks.sh'), work / 'scripts' / 'env_checks.sh')
    (work / 'start_pretrain_large.sh').write_text('#!/bin/bash\n' + node_script)
    os.chmod(work / 'start_pretrain_large.sh', 0o755)
    log = tmp_path / 'calls'
    r = subprocess.run(['bash', SBATCH], cwd=work, env=job_env(stand_ins, log, 55, SLURM_SUBMIT_DIR=str(work), **env),
                       capture_output=True, text=True, timeout=60)
    assert os.listdir(work / 'logs') == []  # the records went with the job
    return r, [c for c in calls(log) if c.startswith('scontrol requeue')]


def test_a_divergence_is_not_requeued_though_srun_stopped_the_other_node(tmp_path, stand_ins):
    # both ranks diverge (the trainer's exit 1); node 1 ends first and srun's --kill-on-bad-exit
    # stops node 0, which exits 143: the ranks' own records decide
    r, requeues = stub_job(tmp_path, stand_ins, 'echo 1 > "$RANK_OUTCOME_DIR/rank-$MACHINE_RANK"\n'
                           'if [ "$MACHINE_RANK" = 0 ]; then trap "exit 143" TERM; sleep 60 & wait; fi\nexit 1\n')
    assert r.returncode == 1, r.stderr
    assert 'failed (diverged, not ready, or gave way to another run in its place: see above; rank(s) 1 1; node(s) 143 1): not requeued' in r.stderr, r.stderr
    assert not requeues


def test_a_job_restarted_max_requeues_times_is_not_requeued_again(tmp_path, stand_ins):
    r, requeues = stub_job(tmp_path, stand_ins, 'echo 143 > "$RANK_OUTCOME_DIR/rank-$MACHINE_RANK"\nexit 143\n',
                           SLURM_RESTART_COUNT='3', MAX_REQUEUES='3')
    assert r.returncode == 143, r.stderr
    assert 'stopped (rank(s) 143 143; node(s) 143 143) and was already restarted 3 times (MAX_REQUEUES=3): not requeued' in r.stderr
    assert not requeues


# --------------------------------------------------------------------------- environment checks


def one_error(r) -> str:
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith('error: '), (r.returncode, r.stderr)
    return lines[0]


@pytest.mark.parametrize('name, value', [
    ('NUM_GPUS', '99999999999999999999'), ('NUM_GPUS', '-1'), ('NUM_GPUS', '2x'), ('NUM_MACHINES', '0'),
    ('NUM_PROCESSES', '1e3'), ('MACHINE_RANK', 'abc'), ('MAIN_PROCESS_PORT', '70000'),
    ('TORCH_ELASTIC_SHUTDOWN_TIMEOUT', '0'), ('RESUME', 'maybe'), ('ACCELERATE_USE_CPU', 'perhaps'),
    ('RANK_OUTCOME_DIR', '/no/such/folder'), ('PYTHON', '/no/such/python')])
def test_every_environment_input_of_the_start_script_is_checked_before_anything_runs(tmp_path, name, value):
    python = tmp_path / 'python'  # a stand-in that says when anything was started
    python.write_text(f'#!/bin/sh\ntouch {tmp_path}/started\n')
    os.chmod(python, 0o755)
    env = {**ENV, 'PATH': '/usr/bin:/bin', 'PYTHON': str(python), name: value}
    r = subprocess.run(['bash', os.path.join(ROOT, 'start_pretrain_large.sh'), '--preset=demo'], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=60)
    assert one_error(r).startswith(f'error: {name}={value}: ')
    assert not os.path.exists(tmp_path / 'started')


@pytest.mark.parametrize('name, value', [
    ('SLURM_JOB_ID', ''), ('SLURM_JOB_ID', '12x'), ('GPUS_PER_NODE', '99999999999999999999'), ('SLURM_NNODES', 'two'),
    ('MAX_REQUEUES', '-1'), ('SLURM_RESTART_COUNT', 'abc'), ('MAIN_PROCESS_PORT', '0'), ('SLURM_SUBMIT_DIR', '/')])
def test_every_environment_input_of_the_slurm_script_is_checked_before_srun(tmp_path, stand_ins, name, value):
    log = tmp_path / 'calls'
    env = job_env(stand_ins, log, 1234, **{name: value})
    r = subprocess.run(['bash', SBATCH, '--preset=demo'], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=60)
    line = one_error(r)
    assert name in line or (name == 'SLURM_SUBMIT_DIR' and 'submit from it' in line), line
    assert not calls(log)  # neither srun nor scontrol ran


def test_the_signal_lead_time_is_the_default_stop_grace():
    from config import TrainConfigPretrainLarge

    text = open(SBATCH).read()
    assert re.search(r'^#SBATCH --requeue$', text, re.M)
    lead = re.search(r'^#SBATCH --signal=B:TERM@(\d+)$', text, re.M)
    assert lead and int(lead.group(1)) == TrainConfigPretrainLarge().stop_grace_s


@pytest.mark.slow
def test_ranks_whose_launcher_is_killed_save_and_stop_and_free_the_place(tmp_path, data):
    """torchrun's agent starts each rank in a session of its own: a job killed by process group
    (SIGKILL after the grace period, a node's cleanup) used to leave the ranks training alone,
    holding the lock, and the requeue was refused ('in use by another run'). Now a rank stops as
    at a SIGTERM when its agent dies: it saves its last step and exits."""
    from model.state import locks

    out = tmp_path / 'run'
    flags = tiny_flags(data, out, max_steps=100000, epochs=1000, save_steps=100000)
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', 'train_low_mem.py',
           'train', *flags]
    agent = subprocess.Popen(cmd, cwd=ROOT, env={**ENV, 'ACCELERATE_USE_CPU': '1'}, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    ranks = []
    try:
        deadline = time.time() + 300
        while newest_step(out) < 5 or len(descendants(agent.pid, 'train_low_mem.py')) < 2:
            assert agent.poll() is None and time.time() < deadline
            time.sleep(0.05)
        ranks = descendants(agent.pid, 'train_low_mem.py')
        os.killpg(agent.pid, signal.SIGKILL)  # the job's process group: the agent alone, the ranks live apart
        agent.wait(timeout=30)
        deadline = time.time() + 120
        while any(os.path.exists(f'/proc/{p}') and 'Z' not in open(f'/proc/{p}/stat').read().split()[2] for p in ranks):
            assert time.time() < deadline, 'the ranks outlived their launcher'
            time.sleep(0.1)
    finally:
        for p in ranks or descendants(agent.pid, 'train_low_mem.py'):
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if agent.poll() is None:
            os.killpg(agent.pid, signal.SIGKILL)
    saved = state_folders(out / 'state')  # save_steps is never reached: only a stop saves
    assert saved and int(saved[-1].split('-')[1]) >= 5, saved
    # each rank says its SIGTERM came with its launcher gone (the kernel's, whatever ended the launcher: SIGKILL here)
    log = open(glob.glob(f'{out}/logs/*.log')[0], encoding='utf-8').read()
    for rank in (0, 1):
        assert f'rank {rank}: stopped by SIGTERM (its launcher, pid {agent.pid}, was gone: the kernel sends a rank ' \
               f'SIGTERM when its launcher dies, whatever ended that, which is not known here) at step' in log, log[-3000:]
    assert locks.is_locked(str(out)) is None  # the requeue can start
