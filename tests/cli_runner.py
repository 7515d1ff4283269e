"""The CLI faces (train_low_mem.py, prepare_data.py) as real child processes, forked from a
process that has already imported torch, transformers, accelerate, pyarrow and the rest.

Why: importing them costs ~7 s per process on a 2-core machine and the suite starts about a
hundred CLI processes. A zygote (this file run as a script) imports the libraries once, then
forks one child per invocation; the child becomes `python SCRIPT ARGS` -- its own pid, the
given stdio, cwd, env and argv, a fresh `__main__`, the signal handlers of a fresh interpreter
-- and exits the way the interpreter would (sys.exit(n) -> n, death by a signal -> -signum).
Each child is forked from the same untouched zygote, so nothing (accelerate's singletons,
logging handlers, RNG state) carries from one child to the next.

Drop-ins for the subprocess module: `Popen` and `run` take the same arguments; an invocation
that is not `[sys.executable, <a face>, ...]`, or asks for what a fork cannot give (shell,
preexec_fn, pass_fds, uid/gid, executable), runs as a real subprocess.
CHAT_SMALL_T5_TEST_FORK=0 runs everything as real subprocesses.

A shell script that runs the faces through $PYTHON (start_pretrain_large.sh, one process: its dry
runs and its `exec "$PY" train_low_mem.py train ...`) gets the same from `script_env(env)`:
PYTHON is then tests/zygote_python, a client (this file run as `cli_runner.py client ARGS`) that has
`python FACE ARGS` forked from the zygote with its own stdio, cwd and environment, passes on the
signals it gets and exits as the child did; any other invocation (`-m`, `-c`, another
script, an environment the zygote did not import under) execs the real interpreter. The child is
the zygote's, not the client's: a test that kills the client (SIGKILL) or reads the process tree
runs the real interpreter.

What is read at import time (HF_HUB_OFFLINE, OMP_NUM_THREADS, HOME, ...) is the zygote's: one
zygote per distinct value of the environment outside RUNTIME_ENV (and SLURM_*), so a child's environment is
always the one its libraries were imported under.
"""

from __future__ import annotations

import json
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading

SWITCH = 'CHAT_SMALL_T5_TEST_FORK'
FORKED_SCRIPTS = ('train_low_mem.py', 'prepare_data.py')
# Read only at run time, by the project or by pytest: a child may differ from its zygote here.
RUNTIME_ENV = ('PYTEST_CURRENT_TEST', 'RECORD_USER_ERRORS', 'NUM_GPUS', 'WORLD_SIZE', 'RANK', 'LOCAL_RANK',
               'ACCELERATE_USE_CPU', 'CHAT_SMALL_T5_FAULT',
               # read by the start script only, or set by bash for what it runs
               'RESUME', 'PYTHON', 'PWD', 'OLDPWD', 'SHLVL', '_',
               'CHAT_SMALL_T5_TEST_ZYGOTE', 'CHAT_SMALL_T5_TEST_PYTHON')
ZYGOTE_SOCKET = 'CHAT_SMALL_T5_TEST_ZYGOTE'  # script_env: the zygote a client asks
CLIENT = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'zygote_python')
# What the faces import, including transformers' lazily loaded parts (measured with -X importtime).
# One that fails to import is left out: the child then meets the same error where the face imports it.
PRELOAD = (
    'import numpy, pandas, pyarrow, pyarrow.parquet, pyarrow.compute, pyarrow.csv, sentencepiece, tokenizers, fire',
    'import ijson, ijson.utils, ijson.backends.python, tqdm, tqdm.contrib.logging, sacrebleu, sacrebleu.metrics',
    'import sklearn.model_selection',
    'import torch, torch.nn.functional, torch.utils.data, torch.distributed, safetensors.torch',
    'import accelerate, accelerate.utils, accelerate.utils.other, accelerate.commands.config.config_args',
    'from transformers import AutoTokenizer, PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration',
    'from transformers import StoppingCriteria, StoppingCriteriaList, TextStreamer, get_scheduler',
    'from transformers.optimization import Adafactor',
)


def forking_enabled() -> bool:
    return os.environ.get(SWITCH, '1') != '0'


class Popen(subprocess.Popen):
    """subprocess.Popen; a face's invocation is forked from a zygote instead of exec'd."""

    _zygote_conn: socket.socket | None = None

    def _execute_child(self, args, executable, preexec_fn, close_fds, pass_fds, cwd, env, startupinfo,
                       creationflags, shell, p2cread, p2cwrite, c2pread, c2pwrite, errread, errwrite,
                       restore_signals, gid, gids, uid, umask, start_new_session, process_group):
        request = None
        if (forking_enabled() and not shell and executable is None and preexec_fn is None and not pass_fds
                and gid is None and gids is None and uid is None and process_group in (None, -1)):
            request = fork_request(args, cwd, env, umask, start_new_session)
        if request is None:
            return super()._execute_child(args, executable, preexec_fn, close_fds, pass_fds, cwd, env,
                                          startupinfo, creationflags, shell, p2cread, p2cwrite, c2pread,
                                          c2pwrite, errread, errwrite, restore_signals, gid, gids, uid, umask,
                                          start_new_session, process_group)
        # -1: the child inherits ours, as a real subprocess would
        stdio = [p2cread if p2cread != -1 else 0, c2pwrite if c2pwrite != -1 else 1,
                 errwrite if errwrite != -1 else 2]
        self._zygote_conn, self.pid, self._zygote_reply = zygote_for(request['env']).launch(request, stdio)
        self._child_created = True
        self._close_pipe_fds(p2cread, p2cwrite, c2pread, c2pwrite, errread, errwrite)

    def _zygote_waitpid(self, pid, flags):
        """os.waitpid for a child of the zygote: it sends the raw wait status when it reaps it."""
        conn = self._zygote_conn
        conn.setblocking(not flags & os.WNOHANG)
        while not self._zygote_reply.endswith(b'\n'):
            try:
                part = conn.recv(64)
            except BlockingIOError:
                return 0, 0
            if not part:
                raise RuntimeError(f'the zygote went away before child {pid} ended (see {_zygote_log_hint()})')
            self._zygote_reply += part
        conn.close()
        return pid, int(self._zygote_reply)

    def _internal_poll(self, _deadstate=None, _waitpid=os.waitpid, _WNOHANG=os.WNOHANG, _ECHILD=10):
        if self._zygote_conn is None:
            return super()._internal_poll(_deadstate, _waitpid, _WNOHANG, _ECHILD)
        return super()._internal_poll(_deadstate, self._zygote_waitpid, _WNOHANG, _ECHILD)

    def _try_wait(self, wait_flags):
        if self._zygote_conn is None:
            return super()._try_wait(wait_flags)
        return self._zygote_waitpid(self.pid, wait_flags)


def run(*popenargs, input=None, capture_output=False, timeout=None, check=False, **kwargs):
    """subprocess.run with this module's Popen (the same body)."""
    if input is not None:
        if kwargs.get('stdin') is not None:
            raise ValueError('stdin and input arguments may not both be used.')
        kwargs['stdin'] = subprocess.PIPE
    if capture_output:
        if kwargs.get('stdout') is not None or kwargs.get('stderr') is not None:
            raise ValueError('stdout and stderr arguments may not be used with capture_output.')
        kwargs['stdout'] = kwargs['stderr'] = subprocess.PIPE
    with Popen(*popenargs, **kwargs) as process:
        try:
            stdout, stderr = process.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            process.kill()
            exc.stdout, exc.stderr = process.communicate()
            raise
        except BaseException:
            process.kill()
            raise
        retcode = process.poll()
        if check and retcode:
            raise subprocess.CalledProcessError(retcode, process.args, output=stdout, stderr=stderr)
    return subprocess.CompletedProcess(process.args, retcode, stdout, stderr)


def fork_request(args, cwd, env, umask, start_new_session) -> dict | None:
    """What the zygote needs to become `python SCRIPT ARGS`, or None when it should not try."""
    if isinstance(args, (str, bytes, os.PathLike)):
        return None
    args = [os.fsdecode(a) for a in args]
    if len(args) < 2 or args[0] != sys.executable or args[1].startswith('-'):
        return None  # not `python SCRIPT`: interpreter options, -m, -c
    cwd = os.fsdecode(cwd) if cwd is not None else os.getcwd()
    script = os.path.join(cwd, args[1])
    if os.path.basename(args[1]) not in FORKED_SCRIPTS or not os.path.isdir(cwd) or not os.path.isfile(script):
        return None  # the real interpreter says what is wrong
    if umask == -1:
        umask = os.umask(0)
        os.umask(umask)
    env = {os.fsdecode(k): os.fsdecode(v) for k, v in (os.environ if env is None else env).items()}
    return {'argv': args[1:], 'cwd': cwd, 'env': env, 'umask': umask, 'new_session': bool(start_new_session)}


def import_time_env(env: dict) -> tuple:
    return tuple(sorted((k, v) for k, v in env.items() if k not in RUNTIME_ENV and not k.startswith('SLURM_')))


_zygotes: dict[tuple, Zygote] = {}
_zygotes_lock = threading.Lock()


def zygote_for(env: dict) -> Zygote:
    key = import_time_env(env)
    with _zygotes_lock:
        if key in _zygotes and not _zygotes[key].alive():
            _zygotes.pop(key).close()
        if key not in _zygotes:
            _zygotes[key] = Zygote(dict(key))
        return _zygotes[key]


def script_env(env: dict) -> dict:
    """env for a shell script that runs the faces through $PYTHON: PYTHON is the client (see the
    module's docstring), pointed at the zygote of env; without forking, this interpreter."""
    if not forking_enabled():
        return {**env, 'PYTHON': sys.executable}
    env = {**env, 'PYTHON': CLIENT, 'CHAT_SMALL_T5_TEST_PYTHON': sys.executable}
    return {**env, ZYGOTE_SOCKET: zygote_for(env).socket_path}


def prestart(env: dict) -> None:
    """Starts importing for env now (in the background), so the first invocation waits less."""
    if forking_enabled():
        zygote_for(env)


def close_all() -> None:
    with _zygotes_lock:
        for zygote in _zygotes.values():
            zygote.close()
        _zygotes.clear()


def _zygote_log_hint() -> str:
    return ', '.join(z.log_path for z in _zygotes.values()) or 'its log'


class Zygote:
    """This file run as `python cli_runner.py zygote LISTENER_FD CONTROL_FD` under env; it lives
    until the control pipe closes (this process ends or calls close)."""

    def __init__(self, env: dict):
        self.dir = tempfile.mkdtemp(prefix='cli-zygote-')
        self.socket_path = os.path.join(self.dir, 'socket')
        self.log_path = os.path.join(self.dir, 'zygote.log')
        # bound and listening here, before the zygote starts: a connect never races its start-up
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(self.socket_path)
        listener.listen(64)
        with open(self.socket_path + '.env', 'w', encoding='utf-8') as f:  # what a client compares its own with
            json.dump(import_time_env(env), f)
        control_read, self.control = os.pipe()
        with open(self.log_path, 'wb') as log, listener:
            self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), 'zygote', str(listener.fileno()),
                                          str(control_read)], env=env, cwd=self.dir, stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT,
                                         pass_fds=[listener.fileno(), control_read])
        os.close(control_read)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def launch(self, request: dict, stdio: list[int]) -> tuple[socket.socket, int, bytes]:
        """Sends the request with the child's stdin, stdout, stderr; returns (the connection, its pid,
        what was read past the pid's line)."""
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            try:
                conn.connect(self.socket_path)  # queued until the zygote has imported everything
            except OSError:
                raise RuntimeError(self._failure('is not listening')) from None
            payload = json.dumps(request).encode()
            socket.send_fds(conn, [len(payload).to_bytes(8, 'big') + payload], stdio)
            reply = b''
            while b'\n' not in reply:
                part = conn.recv(64)
                if not part:
                    raise RuntimeError(self._failure('closed the connection instead of forking'))
                reply += part
            pid, rest = reply.split(b'\n', 1)  # a child that ended at once: its status came in the same read
            return conn, int(pid), rest
        except BaseException:
            conn.close()
            raise

    def _failure(self, what: str) -> str:
        with open(self.log_path, encoding='utf-8', errors='replace') as f:
            return f'the CLI zygote {what}; its log ({self.log_path}) ends:\n{f.read()[-3000:]}'

    def close(self) -> None:
        os.close(self.control)
        self.proc.wait(timeout=60)
        shutil.rmtree(self.dir, ignore_errors=True)


# --------------------------------------------------------------------------- the zygote process


def serve(listener_fd: int, control: int) -> None:
    """Import once, then fork one child per connection; report each child's wait status to it."""
    fresh_handlers = {s: signal.getsignal(s) for s in signal.valid_signals()
                      if s not in (signal.SIGKILL, signal.SIGSTOP)}
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C at pytest reaches the children, not us
    listener = socket.socket(fileno=listener_fd)
    for statement in PRELOAD:
        try:
            exec(statement, {})
        except ImportError as e:
            print(f'not preloaded: {statement}: {e}', file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ, 'accept')
    selector.register(control, selectors.EVENT_READ, 'control')
    waiting: dict[int, tuple[int, socket.socket]] = {}  # pidfd -> (pid, connection)
    while True:
        for key, _ in selector.select():
            if key.data == 'control':
                os._exit(0)  # the test process is gone; running children go on, as real ones would
            if key.data == 'accept':
                conn, _ = listener.accept()
                ours = [listener.fileno(), control, selector.fileno(), conn.fileno(),
                        *waiting, *(c.fileno() for _, c in waiting.values())]
                try:
                    pid = _fork_one(conn, ours, fresh_handlers)
                except (OSError, ValueError) as e:  # a client gone mid-request, no fork: it hears, we go on
                    print(f'no child for a request: {e!r}', file=sys.stderr, flush=True)
                    conn.close()
                    continue
                pidfd = os.pidfd_open(pid)
                waiting[pidfd] = (pid, conn)
                selector.register(pidfd, selectors.EVENT_READ, 'child')
            else:
                pid, conn = waiting.pop(key.fd)
                selector.unregister(key.fd)
                os.close(key.fd)
                _, status = os.waitpid(pid, 0)
                try:
                    conn.sendall(b'%d\n' % status)
                except OSError:
                    pass  # the test dropped its handle, as it may with a real subprocess
                conn.close()


def _fork_one(conn: socket.socket, zygote_fds: list[int], fresh_handlers: dict) -> int:
    """Reads a request with its three stdio fds, forks the child, tells the client its pid."""
    data, stdio, _, _ = socket.recv_fds(conn, 1 << 16, 3)
    try:
        size = int.from_bytes(data[:8], 'big')
        while len(data) < 8 + size:
            part = conn.recv(8 + size - len(data))
            if not part:
                raise ConnectionResetError('the request ended early')
            data += part
        request = json.loads(data[8:])
        pid = os.fork()
        if pid == 0:
            become_script(request, stdio, zygote_fds, fresh_handlers)
    finally:
        for fd in set(stdio):
            os.close(fd)
    try:
        conn.sendall(b'%d\n' % pid)
    except OSError:
        pass  # the client went away; the child runs on, as a real one would, and is reaped
    return pid


def become_script(request: dict, stdio: list[int], zygote_fds: list[int], fresh_handlers: dict) -> None:
    """In the forked child: turn into `python SCRIPT ARGS` and never return."""
    try:
        for fd in zygote_fds:
            os.close(fd)
        if request['new_session']:
            os.setsid()
        for target, fd in enumerate(stdio):
            os.dup2(fd, target)
        for fd in set(stdio):
            if fd > 2:
                os.close(fd)
        for signum, handler in fresh_handlers.items():
            signal.signal(signum, handler)
        os.umask(request['umask'])
        os.chdir(request['cwd'])
        os.environ.clear()
        os.environ.update(request['env'])
        script = os.path.abspath(request['argv'][0])
        sys.argv = list(request['argv'])
        sys.orig_argv = [sys.executable, *request['argv']]
        sys.path[0] = os.path.dirname(os.path.realpath(script))
        # the zygote's stdio objects stay (libraries may hold them); they now write to the child's fds
        sys.stdout.reconfigure(line_buffering=sys.stdout.isatty())
        # a fresh interpreter seeds these from the OS; Python's random reseeds itself at a fork
        if 'numpy' in sys.modules:
            sys.modules['numpy'].random.seed()
        if 'torch' in sys.modules:
            sys.modules['torch'].default_generator.seed()
    except BaseException:
        import traceback

        traceback.print_exc()
        os._exit(70)
    os._exit(run_as_main(script))


def run_as_main(script: str) -> int:
    """Run script as __main__ and finalize as the interpreter does; returns the exit status."""
    import atexit
    import builtins
    import types

    main = types.ModuleType('__main__')
    main.__file__, main.__builtins__, main.__cached__ = script, builtins, None
    sys.modules['__main__'] = main
    interrupted = False
    try:
        with open(script, 'rb') as f:
            code = compile(f.read(), script, 'exec')
        exec(code, main.__dict__)
        status = 0
    except SystemExit as e:
        status = _system_exit_status(e)
    except BaseException as e:
        interrupted = isinstance(e, KeyboardInterrupt)
        e.with_traceback(e.__traceback__.tb_next)  # printed without this function's frame
        sys.excepthook(type(e), e, e.__traceback__)
        status = 1
    threading._shutdown()  # as Py_FinalizeEx: non-daemon threads, then atexit, then the std streams
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            status = 120
    if interrupted:  # an uncaught Ctrl-C ends the interpreter by SIGINT itself
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    return status


def _system_exit_status(e: SystemExit) -> int:
    if e.code is None:
        return 0
    if isinstance(e.code, int):
        return e.code & 0xFF
    print(e.code, file=sys.stderr)
    return 1


# --------------------------------------------------------------------------- the client ($PYTHON)


def client(argv: list[str]) -> None:
    """`python ARGS` as a shell script runs it: forked from the zygote at ZYGOTE_SOCKET when ARGS
    is a face and this environment is the one it imported under, else the real interpreter."""
    real = os.environ.get('CHAT_SMALL_T5_TEST_PYTHON') or sys.executable
    request = fork_request([sys.executable, *argv], None, None, -1, False)
    socket_path = os.environ.get(ZYGOTE_SOCKET, '')
    try:
        with open(socket_path + '.env', encoding='utf-8') as f:
            same = [list(kv) for kv in import_time_env(dict(os.environ))] == json.load(f)
    except OSError:
        same = False
    if request is None or not same:
        os.execv(real, [real, *argv])
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(socket_path)
    payload = json.dumps(request).encode()
    socket.send_fds(conn, [len(payload).to_bytes(8, 'big') + payload], [0, 1, 2])

    replies = conn.makefile('rb')  # the pid's line, then the status's (both at once from a child that ends at once)

    def line() -> int:
        got = replies.readline()  # a signal's handler runs, then this goes on (PEP 475)
        if not got.endswith(b'\n'):
            os._exit(70)
        return int(got)

    pid = line()

    def pass_on(signum, frame):
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(signum, pass_on)
    code = os.waitstatus_to_exitcode(line())
    if code < 0:  # ended by a signal: so does this process, as the interpreter's would
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    os._exit(code)


if __name__ == '__main__' and sys.argv[1:2] == ['zygote']:
    serve(int(sys.argv[2]), int(sys.argv[3]))
elif __name__ == '__main__' and sys.argv[1:2] == ['client']:
    client(sys.argv[2:])
