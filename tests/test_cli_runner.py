"""tests/cli_runner.py: a child forked from the zygote is what `python SCRIPT ARGS` would be.

A probe script, run once by the real interpreter and once forked, reports what a script can see
of its process; the two reports must agree. The probe imports nothing heavy, so its real runs
cost milliseconds. (Each CLI command also keeps a plain-subprocess smoke test in its own module.)
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import pytest

import cli_runner
from conftest import ENV

pytestmark = pytest.mark.skipif(not cli_runner.forking_enabled(), reason=f'{cli_runner.SWITCH}=0: nothing is forked')

PROBE = r'''
import json, logging, os, signal, sys, time
what = sys.argv[1]
if what == 'facts':
    umask = os.umask(0)
    skip = {signal.SIGKILL, signal.SIGSTOP}
    print(json.dumps({
        'argv': sys.argv, 'orig_argv': sys.orig_argv[1:], 'cwd': os.getcwd(), 'path0': sys.path[0],
        'name': __name__, 'file': __file__, 'env': dict(os.environ), 'umask': umask,
        'signals': {str(s): str(signal.getsignal(s)) for s in signal.valid_signals() if s not in skip},
        'logging': [len(logging.getLogger().handlers), logging.getLogger().level],
        'stdin': sys.stdin.read(), 'stdout': [sys.stdout.encoding, sys.stdout.line_buffering],
        'stderr': [sys.stderr.encoding, sys.stderr.errors, sys.stderr.line_buffering],
        'project_modules': sorted(m for m in sys.modules
                                  if m.split('.')[0] in ('config', 'model', 'conftest', 'cli_runner', '_pytest')),
        'pid': os.getpid(), 'ppid': os.getppid()}))
    print('to stderr', file=sys.stderr)
elif what == 'exit':
    sys.exit(int(sys.argv[2]) if sys.argv[2].lstrip('-').isdigit() else sys.argv[2])
elif what == 'raise':
    raise ValueError('boom')
elif what == 'ctrl-c':
    raise KeyboardInterrupt
elif what == 'wait':
    print('waiting', flush=True)
    time.sleep(120)
elif what == 'state':
    from accelerate import PartialState
    import torch
    before = [len(PartialState._shared_state), torch.get_num_threads(), hasattr(torch, 'probe_mark'),
              len(logging.getLogger().handlers), os.environ.get('PROBE_MARK')]
    PartialState()
    torch.probe_mark = 1
    torch.set_num_threads(2)
    logging.basicConfig()
    os.environ['PROBE_MARK'] = '1'
    import numpy
    print(json.dumps({'before': before, 'seeds': [torch.initial_seed(), int(numpy.random.randint(1 << 30))]}))
'''


@pytest.fixture
def probe(tmp_path, monkeypatch):
    monkeypatch.setattr(cli_runner, 'FORKED_SCRIPTS', (*cli_runner.FORKED_SCRIPTS, 'probe.py'))
    (tmp_path / 'probe.py').write_text(PROBE, encoding='utf-8')
    return tmp_path


def both(probe, *args, input=None, **kwargs) -> list[subprocess.CompletedProcess]:
    """The probe run by the real interpreter, then forked."""
    env = {**ENV, 'CHAT_SMALL_T5_FAULT': 'x y'}  # read at run time: the suite's zygote serves it
    return [runner.run([sys.executable, 'probe.py', *args], cwd=probe, env=env, capture_output=True, text=True,
                       input=input, timeout=120, **kwargs) for runner in (subprocess, cli_runner)]


def test_a_forked_child_sees_what_a_fresh_interpreter_sees(probe):
    real, forked = both(probe, 'facts', 'two words', input='你好\n')
    assert real.returncode == forked.returncode == 0, forked.stderr
    assert real.stderr == forked.stderr == 'to stderr\n'
    facts = [json.loads(r.stdout) for r in (real, forked)]
    assert facts[0]['ppid'] == os.getpid() != facts[1]['ppid']  # forked: a child of the zygote
    for f in facts:
        del f['pid'], f['ppid']
    assert facts[1] == facts[0]
    assert facts[1]['env'] == {**ENV, 'CHAT_SMALL_T5_FAULT': 'x y'} and facts[1]['stdin'] == '你好\n'
    assert facts[1]['argv'] == ['probe.py', 'facts', 'two words'] and facts[1]['project_modules'] == []


@pytest.mark.parametrize('args', [['exit', '3'], ['exit', '300'], ['exit', 'a message'], ['raise'], ['ctrl-c']])
def test_exit_status_and_what_is_printed_on_the_way_out_are_the_interpreters(probe, args):
    real, forked = both(probe, *args)
    assert (forked.returncode, forked.stdout, forked.stderr) == (real.returncode, real.stdout, real.stderr)
    assert real.returncode == {'3': 3, '300': 300 & 0xFF, 'a message': 1}.get(args[-1], -2 if args == ['ctrl-c'] else 1)


def test_signals_timeouts_and_output_while_running(probe):
    proc = cli_runner.Popen([sys.executable, 'probe.py', 'wait'], cwd=probe, env=ENV, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline() == 'waiting\n' and proc.poll() is None
    with pytest.raises(subprocess.TimeoutExpired):
        proc.wait(timeout=0.1)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == -signal.SIGTERM
    proc.stdout.close()
    with pytest.raises(subprocess.TimeoutExpired):
        cli_runner.run([sys.executable, 'probe.py', 'wait'], cwd=probe, env=ENV, timeout=0.5)


def test_nothing_carries_from_one_child_to_the_next(probe):
    runs = [cli_runner.run([sys.executable, 'probe.py', 'state'], cwd=probe, env=ENV, capture_output=True,
                           text=True, timeout=120) for _ in range(2)]
    assert all(r.returncode == 0 for r in runs), runs[-1].stderr
    first, second = (json.loads(r.stdout) for r in runs)
    # accelerate's singletons empty, torch's threads as OMP_NUM_THREADS=1 says, no handler, no mark
    assert first['before'] == second['before'] == [0, 1, False, 0, None]
    for a, b in zip(first['seeds'], second['seeds']):  # torch and numpy seeded from the OS in each, as at start
        assert a != b


def test_the_switch_and_what_is_not_forked_run_the_real_interpreter(probe, monkeypatch):
    args = [sys.executable, 'probe.py', 'facts']
    ppid = json.loads(cli_runner.run(args, cwd=probe, env=ENV, capture_output=True, text=True).stdout)['ppid']
    assert ppid != os.getpid()
    for kwargs in ({'preexec_fn': os.getpid}, {'pass_fds': [sys.stderr.fileno()]}):
        r = cli_runner.run(args, cwd=probe, env=ENV, capture_output=True, text=True, **kwargs)
        assert json.loads(r.stdout)['ppid'] == os.getpid()
    monkeypatch.setenv(cli_runner.SWITCH, '0')
    r = cli_runner.run(args, cwd=probe, env=ENV, capture_output=True, text=True)
    assert json.loads(r.stdout)['ppid'] == os.getpid()


def test_one_zygote_per_import_time_environment():
    key = cli_runner.import_time_env
    assert key(ENV) == key({**ENV, 'PYTEST_CURRENT_TEST': 'x', 'CHAT_SMALL_T5_FAULT': 'state-save@8:enospc'})
    assert key(ENV) != key({**ENV, 'OMP_NUM_THREADS': '2'}) != key({**ENV, 'HF_HUB_OFFLINE': '0'})


def test_a_broken_request_leaves_the_zygote_serving(probe):
    zygote = cli_runner.zygote_for(ENV)
    for request in (b'\0' * 7 + b'\x01{', (100).to_bytes(8, 'big') + b'{"argv"'):  # bad JSON; cut short
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.connect(zygote.socket_path)
            conn.sendall(request)
            conn.shutdown(socket.SHUT_WR)
            assert conn.recv(64) == b''  # no pid: closed
    r = cli_runner.run([sys.executable, 'probe.py', 'exit', '5'], cwd=probe, env=ENV, timeout=120)
    assert r.returncode == 5 and zygote.alive()


FAST_FAIL = ['prepare_data.py', 'convert', '/nonexistent.csv', '/nonexistent.parquet']
# the client, slowed after it sent its request: the child has ended before it reads the pid, so the pid's line
# and the status's arrive in one read (a loaded machine; a face that fails at once)
SLOW_CLIENT = '''
import socket, sys, time
sys.path.insert(0, 'tests')
import cli_runner
send = socket.send_fds
socket.send_fds = lambda *a: (send(*a), time.sleep(1))[0]
cli_runner.client(sys.argv[1:])
'''


def test_the_start_scripts_python_client_ends_as_the_real_interpreter_would(tmp_path):
    """tests/zygote_python ($PYTHON of script_env): a face's exit status and output are the real
    interpreter's, also when the child ends before the client reads its pid (it crashed on the
    two lines read at once, exit 1, while the child's own output looked right); anything not a
    face runs the real interpreter."""
    from conftest import ROOT

    env = cli_runner.script_env({**ENV, 'PATH': '/usr/bin:/bin'})
    real = subprocess.run([sys.executable, *FAST_FAIL], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert real.returncode == 2 and 'no such file' in real.stderr, real.stderr
    for how in ([cli_runner.CLIENT], [sys.executable, '-c', SLOW_CLIENT]):
        r = subprocess.run([*how, *FAST_FAIL], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert (r.returncode, r.stdout, r.stderr) == (real.returncode, real.stdout, real.stderr), (how, r.stderr)
    r = subprocess.run([cli_runner.CLIENT, '-c', 'import os, sys; print(os.getppid() == int(sys.argv[1]))',
                        str(os.getpid())], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout == 'True\n', r.stderr  # not a face: exec'd in place, our own child
