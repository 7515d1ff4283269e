"""What the toolkit owns, judged by content; links are storage, never ownership (units, in-process,
on temporary folders)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from model.errors import UserError
from model.state import locks, markers, ownership as own, writes
from model.state.markers import DATA, PLOT, PREDICTIONS, TOKENIZER, WEIGHTS


def tree(root) -> dict[str, str]:
    """Every entry under root (links not followed) with what it is: a link's target, a file's bytes."""
    out = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            p = os.path.join(folder, name)
            rel = os.path.relpath(p, root)
            if os.path.islink(p):
                out[rel] = 'link -> ' + os.readlink(p)
            elif os.path.isdir(p):
                out[rel] = 'dir'
            else:
                out[rel] = open(p, 'rb').read().hex()
    return out


def marked_folder(path, kind=TOKENIZER, files=None) -> str:
    os.makedirs(path)
    for rel, text in (files or {'tokenizer.json': '{"a": 1}', 'sub/spm.model': 'pieces'}).items():
        os.makedirs(os.path.dirname(os.path.join(path, rel)), exist_ok=True)
        with open(os.path.join(path, rel), 'w') as f:
            f.write(text)
    own.write_marker(str(path), kind)
    return str(path)


# --------------------------------------------------------------------------- folders


def test_a_folder_marker_records_each_entry_and_an_untouched_folder_is_wholly_ours(tmp_path):
    folder = marked_folder(tmp_path / 'tok')
    info = own.read_marker(folder)
    assert set(info['entries']) == {'tokenizer.json', 'sub', 'sub/spm.model'}
    assert info['entries']['sub'] == {'type': 'dir'}
    assert info['entries']['tokenizer.json']['bytes'] == 8 and len(info['entries']['tokenizer.json']['sha256']) == 64
    assert own.foreign_entries(folder) == []
    assert own.kind_of(folder) == TOKENIZER
    own.check_replaceable(folder, TOKENIZER, 'tokenizer_dir', folder=True)  # no error


@pytest.mark.parametrize('change, named', [
    (lambda d: open(f'{d}/notes.txt', 'w').write('mine'), 'notes.txt'),
    (lambda d: os.mkdir(f'{d}/empty'), 'empty/ (a folder)'),
    (lambda d: os.symlink('/etc', f'{d}/etc_link'), 'etc_link (a link)'),
    (lambda d: os.symlink(f'{d}/tokenizer.json', f'{d}/file_link'), 'file_link (a link)'),
    (lambda d: os.symlink('/nowhere', f'{d}/dangling'), 'dangling (a link)'),
    (lambda d: open(f'{d}/tokenizer.json', 'w').write('{"a": 2}'), 'tokenizer.json (changed'),  # same size
    (lambda d: open(f'{d}/sub/spm.model', 'a').write('!'), 'sub/spm.model (changed'),
    (lambda d: (os.remove(f'{d}/tokenizer.json'), os.mkdir(f'{d}/tokenizer.json')), 'tokenizer.json (replaced'),
])
def test_an_added_entry_a_link_or_a_changed_file_makes_the_folder_the_users(tmp_path, change, named):
    folder = marked_folder(tmp_path / 'tok')
    change(folder)
    found = own.foreign_entries(folder)
    assert any(f.startswith(named) for f in found), found
    before = tree(tmp_path)
    with pytest.raises(UserError, match='not replaced') as e:
        own.check_replaceable(folder, TOKENIZER, 'tokenizer_dir', folder=True)
    assert named.split(' ')[0] in str(e.value)
    assert own.kind_of(folder) is None and writes.remove_owned(folder, TOKENIZER) is False
    assert tree(tmp_path) == before


def test_a_marker_that_lists_names_only_or_wrong_content_protects_nothing(tmp_path):
    """A hand-written marker naming thesis.txt (or one of an earlier version) does not make the
    folder the toolkit's: nothing in it is replaced or deleted."""
    folder = tmp_path / 'mine'
    folder.mkdir()
    (folder / 'thesis.txt').write_text('years of work')
    (folder / markers.MARKER_FILE).write_text(json.dumps({'made_by': 'chat_small_t5', 'kind': 'tokenizer',
                                                      'files': ['thesis.txt']}))
    with pytest.raises(UserError, match='records no content'):
        own.check_replaceable(str(folder), TOKENIZER, 'tokenizer_dir', folder=True)
    assert writes.remove_owned(str(folder), TOKENIZER) is False
    (folder / markers.MARKER_FILE).write_text(json.dumps({'made_by': 'chat_small_t5', 'kind': 'tokenizer', 'entries': {
        'thesis.txt': {'type': 'file', 'bytes': 13, 'sha256': '0' * 64}}}))
    assert own.foreign_entries(str(folder)) == ['thesis.txt (changed since the toolkit wrote it)']
    assert writes.remove_owned(str(folder), TOKENIZER) is False
    assert (folder / 'thesis.txt').read_text() == 'years of work'


def test_a_marker_that_is_a_link_is_not_a_marker(tmp_path):
    real = marked_folder(tmp_path / 'tok')
    fake = tmp_path / 'fake'
    fake.mkdir()
    (fake / 'data.txt').write_text('mine')
    os.symlink(os.path.join(real, markers.MARKER_FILE), fake / markers.MARKER_FILE)
    assert own.read_marker(str(fake)) is None and own.folder_kind(str(fake)) is None
    with pytest.raises(UserError, match='did not make'):
        own.check_replaceable(str(fake), TOKENIZER, 'tokenizer_dir', folder=True)


def test_links_given_as_places_are_never_ours_and_never_replaced(tmp_path):
    real = marked_folder(tmp_path / 'tok')
    os.symlink(real, tmp_path / 'link')
    assert own.folder_kind(str(tmp_path / 'link')) is None  # judged by lstat
    assert own.kind_of(str(tmp_path / 'link')) is None
    assert writes.remove_owned(str(tmp_path / 'link'), TOKENIZER) is False
    os.symlink(tmp_path / 'nowhere', tmp_path / 'dangling')
    os.symlink(tmp_path / 'loop', tmp_path / 'loop')
    for name in ('dangling', 'loop'):
        with pytest.raises(UserError, match='symbolic link'):
            own.check_replaceable(str(tmp_path / name), TOKENIZER, 'tokenizer_dir', folder=True)
    with pytest.raises(UserError, match='loop'):
        own.resolve_place(str(tmp_path / 'loop'), 'tokenizer_dir')
    assert own.resolve_place(str(tmp_path / 'link'), 'x') == real
    assert own.resolve_place(str(tmp_path / 'dangling'), 'x') == str(tmp_path / 'nowhere')


def test_a_new_folder_goes_where_a_link_points_and_the_link_stays(tmp_path):
    for target in ('empty', 'ours', 'nothing'):
        real = tmp_path / f'{target}_real'
        if target == 'empty':
            real.mkdir()
        elif target == 'ours':
            marked_folder(real, files={'old.json': 'old'})
        link = tmp_path / f'{target}_link'
        os.symlink(real, link)
        with writes.building_folder(str(link), TOKENIZER, 'tokenizer_dir') as tmp:
            assert os.path.dirname(tmp) == str(tmp_path)  # beside the real target, on its filesystem
            (open(os.path.join(tmp, 'new.json'), 'w')).write('new')
            own.write_marker(tmp, TOKENIZER)
        assert os.path.islink(link) and os.readlink(link) == str(real)
        assert sorted(os.listdir(real)) == [markers.MARKER_FILE, 'new.json']
    assert not [n for n in os.listdir(tmp_path) if writes.TEMP_TAG in n]


@pytest.mark.parametrize('writer', ['file', 'folder'])
def test_a_failed_write_takes_back_only_the_folders_it_made_and_that_are_still_those(tmp_path, writer):
    def write(target, meanwhile=lambda: None):
        with pytest.raises(OSError, match='no room'):
            if writer == 'file':
                with writes.atomic_file(str(target), PREDICTIONS, 'out') as tmp:
                    open(tmp, 'w').write('half')
                    meanwhile()
                    raise OSError('no room')
            else:
                with writes.building_folder(str(target), TOKENIZER, 'out') as tmp:
                    meanwhile()
                    raise OSError('no room')

    write(tmp_path / 'a' / 'b' / 'out')
    assert os.listdir(tmp_path) == []  # a and a/b made for it: gone again

    def users_folder_in_its_place():  # the user moves the write's new folder away and makes one of that name
        os.rename(tmp_path / 'c' / 'd', tmp_path / 'moved')
        os.makedirs(tmp_path / 'c' / 'd')

    def users_file_beside():
        (tmp_path / 'e' / 'notes.txt').write_text('mine')

    write(tmp_path / 'c' / 'd' / 'out', users_folder_in_its_place)
    assert os.path.isdir(tmp_path / 'c' / 'd')  # the user's, though empty: stays, and so does c above it

    def users_link_in_its_place():  # ... or puts a link there, to an empty folder of theirs
        os.rename(tmp_path / 'g' / 'h', tmp_path / 'moved_too')
        os.makedirs(tmp_path / 'theirs')
        os.symlink(tmp_path / 'theirs', tmp_path / 'g' / 'h')

    write(tmp_path / 'g' / 'h' / 'out', users_link_in_its_place)
    assert os.path.islink(tmp_path / 'g' / 'h') and os.listdir(tmp_path / 'theirs') == []
    write(tmp_path / 'e' / 'f' / 'out', users_file_beside)
    assert os.listdir(tmp_path / 'e') == ['notes.txt']  # f went; e holds the user's file: stays


def test_a_name_too_long_is_one_line_before_anything_is_made(tmp_path):
    long = 'x' * 300
    with pytest.raises(UserError, match='has 300 bytes, more than the 255 a name may have there'):
        own.resolve_place(str(tmp_path / 'a' / long / 'out'), 'output_dir')
    with pytest.raises(UserError, match='more than a path may be'):
        own.resolve_place(str(tmp_path / '/'.join(['y' * 200] * 25)), 'output_dir')
    # met only while making the folders (here: not resolved first): those made so far go again
    with pytest.raises(UserError, match=f'cannot make the folder {tmp_path}/a/{long} .File name too long'):
        with writes.folders_for(str(tmp_path / 'a' / long / 'out')):
            pass
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------- files


def write_marked(path, kind) -> str:
    """A file of each format the toolkit writes, through atomic_file (which seals it)."""
    with writes.atomic_file(str(path), kind, 'out') as tmp:
        if kind == DATA:
            w = pq.ParquetWriter(tmp, pa.schema([('prompt', pa.string()), ('response', pa.string())]))
            w.write_table(pa.table({'prompt': ['问'] * 50, 'response': ['答'] * 50}))
            w.add_key_value_metadata(markers.parquet_marker(DATA))
            w.close()
        elif kind == WEIGHTS:
            import torch
            from safetensors.torch import save_file

            save_file({'w': torch.arange(12.0).reshape(3, 4)}, tmp, metadata=markers.weights_metadata(step=1))
        elif kind == PLOT:
            import matplotlib

            matplotlib.use('Agg')
            import matplotlib.pyplot as plt

            fig = plt.figure(figsize=(1, 1))
            fig.savefig(tmp, format='png', metadata={markers.MARKER_KEY: json.dumps(markers.file_marker_info(PLOT))})
            plt.close(fig)
        else:
            with open(tmp, 'w') as f:
                f.write(json.dumps(markers.file_marker_info(PREDICTIONS)) + '\n{"prompt": "问", "answer": "答"}\n')
    return str(path)


@pytest.mark.parametrize('kind, name', [(DATA, 'a.parquet'), (WEIGHTS, 'm.bin'), (PLOT, 'p.png'),
                                        (PREDICTIONS, 'p.jsonl')])
def test_a_file_is_ours_while_its_content_matches_its_sealed_hash(tmp_path, kind, name):
    path = write_marked(tmp_path / name, kind)
    info = markers.file_marker(path)
    assert info['kind'] == kind and info[markers.CONTENT_KEY] != markers.PLACEHOLDER
    assert markers.file_kind(path) == kind
    copy = tmp_path / f'copy_{name}'
    copy.write_bytes(open(path, 'rb').read())
    assert markers.file_kind(str(copy)) == kind  # an exact copy is what the toolkit wrote
    data = bytearray(open(path, 'rb').read())
    a, b = (markers._layout(open(path, 'rb'), len(data))).content[-1]
    data[(a + b) // 2] ^= 1  # one bit of the content
    changed = tmp_path / f'changed_{name}'
    changed.write_bytes(bytes(data))
    assert markers.file_marker(str(changed)) is not None and markers.file_kind(str(changed)) is None
    with pytest.raises(UserError, match='changed since'):
        own.check_replaceable(str(changed), kind, '--out', folder=False)
    link = tmp_path / f'link_{name}'
    os.symlink(path, link)
    assert markers.file_kind(str(link)) is None and writes.remove_owned(str(link), kind) is False
    assert os.path.exists(path)
    assert writes.remove_owned(str(changed), kind) is False and changed.exists()
    assert writes.remove_owned(path, kind) is True and not os.path.exists(path)


def test_a_table_read_from_our_file_and_written_again_is_not_ours(tmp_path):
    path = write_marked(tmp_path / 'a.parquet', DATA)
    pq.write_table(pq.read_table(path), tmp_path / 'b.parquet')
    assert markers.file_marker(str(tmp_path / 'b.parquet')) is None
    # the marker copied into another file's footer: the content does not match it
    raw = pq.read_metadata(path).metadata[markers.MARKER_KEY.encode()].decode()
    w = pq.ParquetWriter(tmp_path / 'c.parquet', pa.schema([('prompt', pa.string()), ('response', pa.string())]))
    w.write_table(pa.table({'prompt': ['x'], 'response': ['y']}))
    w.add_key_value_metadata({markers.MARKER_KEY: raw})
    w.close()
    assert markers.file_marker(str(tmp_path / 'c.parquet'))['kind'] == DATA
    assert markers.file_kind(str(tmp_path / 'c.parquet')) is None


def test_a_file_written_through_a_link_lands_where_it_points(tmp_path):
    (tmp_path / 'scratch').mkdir()
    os.symlink(tmp_path / 'scratch' / 'new.jsonl', tmp_path / 'dangling.jsonl')
    write_marked(tmp_path / 'dangling.jsonl', PREDICTIONS)
    assert os.path.islink(tmp_path / 'dangling.jsonl')
    assert markers.file_kind(str(tmp_path / 'scratch' / 'new.jsonl')) == PREDICTIONS
    write_marked(tmp_path / 'dangling.jsonl', PREDICTIONS)  # again: replaces the file, keeps the link
    assert os.path.islink(tmp_path / 'dangling.jsonl')
    (tmp_path / 'user.jsonl').write_text('{"mine": 1}\n')
    os.symlink(tmp_path / 'user.jsonl', tmp_path / 'to_user.jsonl')
    with pytest.raises(UserError, match='not written by this toolkit'):
        write_marked(tmp_path / 'to_user.jsonl', PREDICTIONS)
    assert (tmp_path / 'user.jsonl').read_text() == '{"mine": 1}\n'


# --------------------------------------------------------------------------- locks


def test_a_lock_file_is_never_written_through_a_link_or_a_second_name(tmp_path):
    user_file = tmp_path / 'precious.txt'
    user_file.write_text('mine')
    cases = {'link': lambda p: os.symlink(user_file, p), 'hard link': lambda p: os.link(user_file, p),
             'foreign content': lambda p: open(p, 'w').write('not a lock'),
             'a folder': lambda p: os.mkdir(p), 'a fifo': lambda p: os.mkfifo(p)}
    for name, plant in cases.items():
        place = tmp_path / name.replace(' ', '_')
        place.mkdir()
        plant(place / markers.LOCK_FILE)
        with pytest.raises(UserError, match=markers.LOCK_FILE.replace('.', r'\.')):
            locks.PlaceLock([str(place)]).acquire()
        with pytest.raises(UserError):
            locks.is_locked(str(place))
    assert user_file.read_text() == 'mine'


def test_one_run_per_place_and_a_dead_holder_leaves_no_lock(tmp_path):
    place = str(tmp_path / 'run')
    with locks.PlaceLock([place], 'training run'):
        assert 'pid' in (locks.is_locked(place) or '')
        with pytest.raises(UserError, match='in use by another training run'):
            locks.PlaceLock([place], 'training run').acquire()
    assert locks.is_locked(place) is None
    with locks.PlaceLock([place]):  # the same file, taken again
        pass
    assert markers.LOCK_FILE not in own.list_entries(place) and own.list_entries(place) == {}


def test_a_lock_file_removed_while_held_is_never_taken_by_one_who_opened_it_before(tmp_path):
    """A start that takes back its new folder removes its lock file while it holds it: a run that
    opened that file meanwhile and gets the flock once it is released holds a file nobody else can
    reach, and must stop; the file's name then leads to a new file, which a later run takes."""
    import fcntl

    place, other = str(tmp_path / 'run'), str(tmp_path / 'other')
    lock = locks.PlaceLock([place, other]).acquire()
    early = os.open(os.path.join(place, markers.LOCK_FILE), os.O_RDWR)  # another start opened it meanwhile
    try:
        lock.release(remove_in=(place,))
        assert not os.path.lexists(os.path.join(place, markers.LOCK_FILE))  # removed, as the start asked
        assert os.path.isfile(os.path.join(other, markers.LOCK_FILE))  # a place not asked for keeps its file
        fcntl.flock(early, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the other start's flock now succeeds ...
        assert not locks._still_the_file(place, early)  # ... on a file that is no longer the place's lock
        open(os.path.join(place, markers.LOCK_FILE), 'w').close()  # a third start made the name again
        assert not locks._still_the_file(place, early)
    finally:
        os.close(early)
    with locks.PlaceLock([place]):  # taken by a new start, on the new file
        assert 'pid' in (locks.is_locked(place) or '')


def test_a_start_refused_at_its_locks_takes_back_the_lock_files_it_made_in_its_own_new_folders(tmp_path):
    mine, shared = str(tmp_path / 'mine'), str(tmp_path / 'shared')
    os.makedirs(mine)  # made by the refused start itself
    with locks.PlaceLock([shared], 'training run'):  # another run holds the shared place
        with pytest.raises(UserError, match='in use by another training run'):
            locks.PlaceLock([mine, shared], 'training run').acquire(take_back=(mine,))
        assert os.listdir(mine) == []  # its new folder holds nothing of it: the folder can go again
        assert markers.LOCK_FILE in os.listdir(shared)  # the holder's file untouched
        assert 'pid' in (locks.is_locked(shared) or '')


def test_a_start_whose_lock_file_is_taken_back_between_its_open_and_its_flock_stops(tmp_path, monkeypatch):
    place = str(tmp_path / 'run')
    opened = locks._open_lock

    def open_then_taken_back(folder, flags):
        fd = opened(folder, flags)
        os.unlink(os.path.join(folder, markers.LOCK_FILE))  # the failing start removes it, still holding it
        return fd

    monkeypatch.setattr(locks, '_open_lock', open_then_taken_back)
    with pytest.raises(UserError, match='in use by another training run .*starting there a moment ago'):
        locks.PlaceLock([place], 'training run').acquire()


KILLED_WITH_A_WORKER = """
import os, signal, sys, time, torch
from model.state import locks
from model.stopping import ignore_in_worker

def outliving(worker_id):  # a worker that does not die with its parent (another OS, or before the fix)
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, signal.SIG_IGN)

class Slow(torch.utils.data.IterableDataset):
    def __iter__(self):
        yield os.getpid()
        time.sleep(120)
        yield 0

lock = locks.PlaceLock([sys.argv[1]], 'training run').acquire()
init = outliving if sys.argv[2] == 'outliving' else ignore_in_worker  # the loader's own
loader = iter(torch.utils.data.DataLoader(Slow(), batch_size=None, num_workers=1, worker_init_fn=init))
print(int(next(loader)), flush=True)  # the worker's pid, the worker alive and sleeping
time.sleep(120)
"""


def kill_a_run_with_a_worker(place: str, init: str):
    """(the run's process, its DataLoader worker's pid) once the run holds the lock; the run is SIGKILLed."""
    import signal

    proc = subprocess.Popen([sys.executable, '-c', KILLED_WITH_A_WORKER, place, init], stdout=subprocess.PIPE, text=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    worker = int(proc.stdout.readline())
    assert 'pid' in (locks.is_locked(place) or '')  # held while the run lives
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return proc, worker


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_killed_runs_dataloader_worker_does_not_hold_its_lock(tmp_path):
    """SIGKILL to a run whose DataLoader worker lives on: the worker closed its copy of the lock at
    the fork, so the lock is free at once and the resume right after the kill is not refused."""
    import signal

    place = str(tmp_path / 'run')
    proc, worker = kill_a_run_with_a_worker(place, 'outliving')
    try:
        assert alive(worker)  # the worker outlives the run ...
        assert locks.is_locked(place) is None  # ... and holds no lock
        with locks.PlaceLock([place], 'training run'):
            pass
    finally:
        proc.kill()
        if alive(worker):
            os.kill(worker, signal.SIGKILL)


def test_a_killed_runs_dataloader_worker_dies_with_it(tmp_path):
    """The loader's worker_init: the worker is killed with its run (else it would wait for ever to
    hand its batch to a pipe nobody reads, ignoring SIGTERM, holding its memory)."""
    import signal
    import time

    proc, worker = kill_a_run_with_a_worker(str(tmp_path / 'run'), 'loader')
    try:
        deadline = time.monotonic() + 10
        while alive(worker) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(worker), f'the worker {worker} outlived its killed run by 10 s'
    finally:
        if alive(worker):
            os.kill(worker, signal.SIGKILL)


# --------------------------------------------------------------------------- temporaries


def test_only_temporaries_provably_of_a_dead_run_of_this_target_are_swept(tmp_path):
    target = str(tmp_path / 'out.parquet')
    dead = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'], capture_output=True,
                          text=True).stdout.strip()
    host = writes._host_tag()
    names = {'dead': f'.out.parquet.{writes.TEMP_TAG}-{host}-{dead}-0123abcd',
             'dead folder': f'.out.parquet.{writes.TEMP_TAG}-{host}-{dead}-0123abce',
             'alive': f'.out.parquet.{writes.TEMP_TAG}-{host}-{os.getppid()}-0123abcd',
             'other host': f'.out.parquet.{writes.TEMP_TAG}-ffffffff-{dead}-0123abcd',
             'other target': f'.other.parquet.{writes.TEMP_TAG}-{host}-{dead}-0123abcd',
             'a link': f'.out.parquet.{writes.TEMP_TAG}-{host}-{dead}-0123abcf',
             'not ours': '.out.parquet.12345.0123abcd.tmp'}
    for what, name in names.items():
        path = tmp_path / name
        if what == 'dead folder':
            path.mkdir()
            os.symlink('/etc', path / 'inside')  # removed as a link, never followed
        elif what == 'a link':
            os.symlink(tmp_path / 'precious', path)
        else:
            path.write_text('x')
    (tmp_path / 'precious').write_text('mine')
    assert writes.sweep_stale_temps(target) == sorted(str(tmp_path / names[k]) for k in ('dead', 'dead folder'))
    left = set(os.listdir(tmp_path))
    assert {names[k] for k in ('alive', 'other host', 'other target', 'a link', 'not ours')} <= left
    assert writes.sweep_stale_temps(target, place_locked=True) == sorted(
        str(tmp_path / names[k]) for k in ('alive', 'other host'))
    assert (tmp_path / 'precious').read_text() == 'mine' and os.path.isdir('/etc')


def test_a_fifo_under_a_marker_or_a_file_name_is_read_as_nothing_at_once(tmp_path):
    """Opening a FIFO for reading waits for a writer: every read of a marker (folder or sealed
    file) opens without waiting, so a planted FIFO is just not the toolkit's."""
    import signal

    os.mkfifo(tmp_path / own.MARKER_FILE)
    os.mkfifo(tmp_path / 'w.safetensors')

    def hung(signum, frame):
        raise AssertionError('a read of a FIFO waited for a writer')

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(10)
    try:
        assert own.read_marker(str(tmp_path)) is None and own.folder_kind(str(tmp_path)) is None
        assert markers.file_marker(str(tmp_path / 'w.safetensors')) is None
        assert own.kind_of(str(tmp_path)) is None
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# --------------------------------------------------------------------------- locks between machines

ON_A_MACHINE = """
import errno, fcntl, os, socket, sys, time
from model.state import locks
from model.errors import UserError

place, host, flock, action = sys.argv[1:5]
socket.gethostname = lambda: host  # this process plays that machine
if len(sys.argv) > 5:  # and its clock, this many seconds off
    clock = time.time
    time.time = lambda: clock() + float(sys.argv[5])
locks.BEAT_S = 0.3
real = fcntl.flock
if flock == 'local':  # a filesystem whose locks do not reach other machines: each one gets it
    fcntl.flock = lambda fd, op: None
elif flock == 'none':  # no flock at all (Lustre mounted without flock)
    def no_flock(fd, op):
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))
    fcntl.flock = no_flock
if os.environ.get('BOOT_ID'):  # this machine's kernel (containers on two machines may share a host name)
    locks.BOOT_ID = os.environ['BOOT_ID']
if os.environ.get('FAKE_PID'):  # containers sharing a host name, each with its own pid 7
    os.getpid = lambda: int(os.environ['FAKE_PID'])
if os.environ.get('START_AT'):  # several machines starting together
    time.sleep(max(0.0, float(os.environ['START_AT']) - time.time()))
start = time.monotonic()
try:
    lock = locks.PlaceLock([place], 'training run').acquire()
except UserError as e:
    print('refused', round(time.monotonic() - start, 2), e, flush=True)
    sys.exit(3)
print('held', round(time.monotonic() - start, 2), flush=True)
if action == 'hold':
    time.sleep(60)
elif action == 'release':
    lock.release()
"""


def on_a_machine(place, host, flock, action, *skew, env=None):
    return subprocess.Popen([sys.executable, '-c', ON_A_MACHINE, str(place), host, flock, action, *map(str, skew)],
                            env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def holding(place, host, flock, *skew):
    proc = on_a_machine(place, host, flock, 'hold', *skew)
    assert proc.stdout.readline().startswith('held'), proc.stderr.read()
    return proc


def outcome(place, host, flock, action='exit'):
    proc = on_a_machine(place, host, flock, action)
    out, err = proc.communicate(timeout=60)
    return proc.returncode, out, err


@pytest.mark.parametrize('flock,skew', [('local', 0), ('none', 0), ('local', -3600)])
def test_a_run_on_another_machine_is_refused_while_the_holders_heartbeat_goes_on(tmp_path, flock, skew):
    # the second machine's flock succeeds (or there is none): the heartbeat is what stops it, whatever
    # the holder's clock says (an hour behind: its beats look old, and it runs)
    place = tmp_path / 'run'
    holder = holding(place, 'nodeA', 'real', skew)
    try:
        code, out, err = outcome(place, 'nodeB', flock)
        assert code == 3 and 'is in use by another training run (pid' in out and 'on nodeA' in out, (out, err)
        if flock == 'local':
            assert 'its heartbeat goes on from nodeA: the locks of this filesystem do not reach between machines' in out
        assert 'waiting up to' in err  # it watched the heartbeat before it said so
        assert 'on nodeA' in (locks.is_locked(str(place)) or '')
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize('flock', ['real', 'local', 'none'])
def test_a_killed_holder_on_another_machine_is_taken_over_once_its_heartbeat_stops(tmp_path, flock):
    # a preempted run SIGKILLed on one node, requeued on another: its lock file still names it
    place = tmp_path / 'run'
    holder = holding(place, 'nodeA', 'real')
    holder.kill()
    holder.wait()
    code, out, err = outcome(place, 'nodeB', flock, 'release')
    assert code == 0 and out.startswith('held') and 'waiting' in err, (out, err)
    assert float(out.split()[1]) < 5  # about one beat and a half of watching
    # released cleanly: the next one, anywhere, takes it at once
    code, out, err = outcome(place, 'nodeC', flock)
    assert code == 0 and 'waiting' not in err, (out, err)


def test_without_flock_a_holder_on_this_machine_is_known_by_its_pid_and_heartbeat(tmp_path):
    place = tmp_path / 'run'
    holder = holding(place, 'nodeA', 'none')
    try:
        code, out, err = outcome(place, 'nodeA', 'none')  # its pid lives and it beats: refused
        assert code == 3 and 'in use by another training run' in out and 'waiting' in err, (out, err)
        assert 'has no flock (Function not implemented)' in err and 'heartbeat alone' in err
    finally:
        holder.kill()
        holder.wait()
    code, out, err = outcome(place, 'nodeA', 'none')  # its pid is gone: taken at once
    assert code == 0 and 'waiting' not in err, (out, err)


def gave_way(proc, timeout=10):
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        return None
    return proc.returncode == locks.GAVE_WAY and 'the later start goes on and this run stops now without saving' in err


def test_a_holder_paused_past_the_watch_and_taken_over_gives_way_when_it_wakes(tmp_path):
    # a frozen VM or a blocked filesystem: the other machine saw no heartbeat and took over
    import signal

    place = tmp_path / 'run'
    outcomes = tmp_path / 'outcomes'  # as under the SLURM script (scripts/rank_outcome.py)
    outcomes.mkdir()
    first = on_a_machine(place, 'nodeA', 'local', 'hold', env={**os.environ, 'RANK_OUTCOME_DIR': str(outcomes)})
    assert first.stdout.readline().startswith('held')
    first.send_signal(signal.SIGSTOP)
    second = on_a_machine(place, 'nodeB', 'local', 'hold')
    try:
        assert second.stdout.readline().startswith('held')
        first.send_signal(signal.SIGCONT)
        assert gave_way(first), 'the earlier run must stop at its next beat'
        assert (outcomes / 'rank-0').read_text() == f'{locks.GAVE_WAY}\n'  # a failure the job does not requeue
        time.sleep(1)
        assert second.poll() is None and 'on nodeB' in (locks.is_locked(str(place)) or '')
    finally:
        for proc in (first, second):
            proc.kill()
            proc.wait()


def test_a_run_on_another_machine_with_the_same_host_name_is_refused_while_its_heartbeat_goes_on(tmp_path):
    """Containers on two machines with one host name, on a filesystem whose flock does not reach
    between them: the second took the place at once (a flock it got, from a holder of its own host
    name, read as the holder's death), moved the live run's states aside, and both wrote there.
    A machine is its kernel's boot id, not its host name."""
    place = tmp_path / 'run'
    holder = on_a_machine(place, 'pod', 'real', 'hold', env={**os.environ, 'BOOT_ID': 'machine-a'})
    assert holder.stdout.readline().startswith('held'), holder.stderr.read()
    try:
        second = on_a_machine(place, 'pod', 'local', 'exit', env={**os.environ, 'BOOT_ID': 'machine-b'})
        out, err = second.communicate(timeout=60)
        assert second.returncode == 3 and 'is in use by another training run' in out, (out, err)
        assert 'waiting up to' in err and 'do not reach between machines' in out
        same = on_a_machine(place, 'pod', 'real', 'exit', env={**os.environ, 'BOOT_ID': 'machine-a'})
        out, err = same.communicate(timeout=60)  # on the holder's own machine the kernel's lock says it at once
        assert same.returncode == 3 and 'waiting up to' not in err, (out, err)
    finally:
        holder.kill()
        holder.wait()


def test_two_starts_at_once_where_flock_does_not_reach_leave_one_run(tmp_path):
    # both read an empty lock file and both get the flock: at the first beats, the one that
    # started first gives way (or, a moment late, the second one is refused at its start)
    place = tmp_path / 'run'
    together = {**os.environ, 'START_AT': str(time.time() + 2)}
    runs = [on_a_machine(place, host, 'local', 'hold', env=together) for host in ('nodeA', 'nodeB')]
    try:
        deadline = time.time() + 6
        while time.time() < deadline and all(proc.poll() is None for proc in runs):
            time.sleep(0.1)
        time.sleep(1)
        alive = [proc for proc in runs if proc.poll() is None]
        (ended,) = [proc for proc in runs if proc.poll() is not None]
        assert len(alive) == 1 and ended.returncode in (3, locks.GAVE_WAY), ended.communicate()
        assert alive[0].stdout.readline().startswith('held')
    finally:
        for proc in runs:
            proc.kill()
            proc.wait()


def test_a_woken_holder_keeps_the_place_when_the_run_that_took_it_is_gone(tmp_path):
    import signal

    place = tmp_path / 'run'
    first = holding(place, 'nodeA', 'local')
    first.send_signal(signal.SIGSTOP)
    second = holding(place, 'nodeB', 'local')
    second.kill()  # killed without releasing: its content stays
    second.wait()
    try:
        first.send_signal(signal.SIGCONT)
        time.sleep(2)  # a beat, the watch of the dead one's heartbeat, and beats again
        assert first.poll() is None and 'on nodeA' in (locks.is_locked(str(place)) or '')
    finally:
        first.kill()
        first.wait()


def test_two_containers_with_one_host_name_and_one_pid_leave_one_run(tmp_path):
    place = tmp_path / 'run'
    together = {**os.environ, 'START_AT': str(time.time() + 2), 'FAKE_PID': '7'}
    runs = [on_a_machine(place, 'pod', 'local', 'hold', env=together) for _ in range(2)]
    try:
        deadline = time.time() + 6
        while time.time() < deadline and all(proc.poll() is None for proc in runs):
            time.sleep(0.1)
        time.sleep(1)
        assert sorted(proc.poll() is None for proc in runs) == [False, True]
    finally:
        for proc in runs:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize('content', [
    '{"pid": 1, "host": ["gpu7"], "started": "s", "beat": 1}',
    '{"pid": 1, "host": "gpu7", "started": {}, "beat": 1}',
    '{"pid": 1, "host": "gpu7", "started": "s", "beat": NaN}',
    '{"pid": "1", "host": "gpu7", "started": "s"}',
    '{"pid": 0, "host": "gpu7", "started": "s", "beat": 1}',  # os.kill(0) would ask this process's group
    '{"pid": -1, "host": "gpu7", "started": "s", "beat": 1}',
])
def test_a_lock_file_edited_by_hand_is_one_line_never_a_crash_or_a_wait(tmp_path, content):
    place = tmp_path / 'run'
    place.mkdir()
    (place / markers.LOCK_FILE).write_text(content)
    with pytest.raises(UserError, match='is not a lock file this toolkit wrote'):
        locks.PlaceLock([str(place)]).acquire()
    with pytest.raises(UserError, match='is not a lock file this toolkit wrote'):
        locks.is_locked(str(place))


def test_a_stopped_heartbeat_is_watched_once_for_all_the_places_of_its_run(tmp_path):
    places = ','.join(str(tmp_path / name) for name in ('state', 'out', 'models'))
    script = ON_A_MACHINE.replace('[place]', 'place.split(",")')  # one lock of three places, as a run takes them
    cwd = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    holder = subprocess.Popen([sys.executable, '-c', script, places, 'nodeA', 'real', 'hold'], stdout=subprocess.PIPE,
                              text=True, cwd=cwd)
    assert holder.stdout.readline().startswith('held')
    holder.kill()
    holder.wait()
    r = subprocess.run([sys.executable, '-c', script, places, 'nodeB', 'real', 'release'], capture_output=True,
                       text=True, cwd=cwd, timeout=60)
    assert r.returncode == 0 and r.stderr.count('waiting up to') == 1, (r.stdout, r.stderr)


def test_a_lock_file_this_user_cannot_write_is_one_line_at_the_check_and_at_the_start(tmp_path):
    place = tmp_path / 'run'
    locks.PlaceLock([str(place)]).acquire().release()
    lock = place / markers.LOCK_FILE
    if subprocess.run(['chattr', '+i', str(lock)], capture_output=True).returncode:
        pytest.skip('chattr +i is not available here (another user\'s file is the same case)')
    try:
        for attempt in (lambda: locks.is_locked(str(place)), lambda: locks.PlaceLock([str(place)]).acquire()):
            with pytest.raises(UserError, match=r'cannot be opened for writing \(Operation not permitted\)'):
                attempt()
    finally:
        subprocess.run(['chattr', '-i', str(lock)], check=False)


@pytest.mark.parametrize('planted', ['nothing', 'a file of mine', 'a link to my file', 'a folder'])
def test_a_rank_outcome_replaces_only_an_outcome_never_a_users_file_or_a_link(tmp_path, monkeypatch, capsys, planted):
    from model import run_outcome

    monkeypatch.setenv('RANK_OUTCOME_DIR', str(tmp_path))
    monkeypatch.setenv('RANK', '3')
    path = run_outcome.path_of_this_rank()
    mine = tmp_path / 'notes.txt'
    mine.write_text('my notes')
    if planted == 'a file of mine':
        (tmp_path / 'rank-3').write_text('my notes')
    elif planted == 'a link to my file':
        os.symlink(mine, path)
    elif planted == 'a folder':
        os.mkdir(path)
    run_outcome.record(path, 'running node7 42')
    run_outcome.record(path, '75')  # an outcome replaces an outcome: the record's life under the job
    err = capsys.readouterr().err
    assert mine.read_text() == 'my notes' and not [n for n in os.listdir(tmp_path) if n.endswith('.tmp')]
    if planted == 'nothing':
        assert open(path).read() == '75\n' and err == ''
    else:
        assert 'cannot record this rank\'s outcome' in err
        assert (os.path.islink(path) if planted == 'a link to my file' else os.path.isdir(path) if planted == 'a folder'
                else open(path).read() == 'my notes')


def test_a_start_takes_back_only_the_real_folders_it_made_never_a_users_or_a_link(tmp_path):
    """take_back_made_folders (a fresh run stopped before its first step) removes a lock file, the
    state folder's marker and the folder -- only in a folder it made that is still that folder, a
    real one: one a user made in its place since (same path, holding a marker and a lock file of
    that name), or a link put there to a user's folder, loses nothing."""
    from model.state import states as sf, writes
    from model.train.factory import take_back_made_folders

    def user_folder(path):
        os.makedirs(path)
        own.write_marker(str(path), markers.STATE_DIR, manifest=False)  # a copy of the toolkit's own, say
        (path / markers.LOCK_FILE).write_text('')
        return snapshot_of(path)

    def snapshot_of(path):
        return sorted((n, open(os.path.join(path, n), 'rb').read()) for n in os.listdir(path))

    for case in ('made again', 'link'):
        base = tmp_path / case.replace(' ', '_')
        state = base / 'state'
        made = writes.make_folders(str(state))
        lock = locks.PlaceLock([str(state)]).acquire()
        sf.ensure_state_dir(str(state))
        os.rename(state, base / 'was')  # the made folder moved away; a user's stands in its place
        users = base / 'users'
        if case == 'made again':
            before = user_folder(state)
        else:
            before = user_folder(users)
            os.symlink(users, state)
        take_back_made_folders(lock, made, str(state))
        target = users if case == 'link' else state
        assert snapshot_of(target) == before, case  # marker and lock file of the user's folder kept
        assert os.path.lexists(state) and (case != 'link' or os.path.islink(state))


def test_a_start_takes_back_the_folders_it_made_and_nothing_beside(tmp_path):
    from model.state import states as sf, writes
    from model.train.factory import take_back_made_folders

    out = tmp_path / 'new' / 'out'
    made = writes.make_folders(str(out / 'state'))
    lock = locks.PlaceLock([str(out / 'state'), str(out)]).acquire()
    sf.ensure_state_dir(str(out / 'state'))
    (tmp_path / 'beside.txt').write_text('mine')
    take_back_made_folders(lock, made, str(out / 'state'))
    assert os.listdir(tmp_path) == ['beside.txt']  # new/, out/, state/ and their files gone; nothing else


def test_a_lock_file_swapped_for_a_link_is_not_removed_with_the_folder_it_made(tmp_path):
    place, user_file = str(tmp_path / 'run'), tmp_path / 'mine.txt'
    user_file.write_text('mine')
    lock = locks.PlaceLock([place]).acquire()
    os.symlink(user_file, os.path.join(place, 'tmp-link'))
    os.replace(os.path.join(place, 'tmp-link'), os.path.join(place, markers.LOCK_FILE))  # the name now a link
    lock.release(remove_in=(place,))
    assert os.path.islink(os.path.join(place, markers.LOCK_FILE)) and user_file.read_text() == 'mine'


def test_places_that_cannot_all_be_made_leave_none_of_the_folders_made(tmp_path):
    from model.train.factory import make_places

    (tmp_path / 'afile').write_text('mine')
    with pytest.raises(UserError, match='cannot make the folder'):
        make_places([str(tmp_path / 'new' / 'state'), str(tmp_path / 'afile' / 'out')])  # a file in the way
    assert sorted(os.listdir(tmp_path)) == ['afile'] and (tmp_path / 'afile').read_text() == 'mine'


def test_a_users_file_or_folder_named_like_the_marker_is_refused_in_one_line_never_replaced(tmp_path):
    """A folder named chat_small_t5.json opened like a file (a traceback, in the dry run and in
    generate too); a user's own chat_small_t5.json in an empty train_state_dir was taken as room to
    mark (a FileExistsError at start-up). Both are the user's: said in one line, left as they are."""
    from model.state import states as sf

    as_folder = tmp_path / 'a'
    os.makedirs(as_folder / markers.MARKER_FILE)
    assert own.read_marker(str(as_folder)) is None and own.folder_kind(str(as_folder)) is None
    target = tmp_path / 'mine.json'
    target.write_text('{"mine": 1}')
    for name, plant in {'a folder': lambda p: os.makedirs(p), 'a file': lambda p: p.write_text('{"mine": 1}'),
                        'a link': lambda p: os.symlink(target, p)}.items():
        state = tmp_path / name.replace(' ', '_')
        os.makedirs(state)
        plant(state / markers.MARKER_FILE)
        with pytest.raises(UserError, match='holds a chat_small_t5.json this toolkit did not write'):
            sf.ensure_state_dir(str(state))
        assert os.listdir(state) == [markers.MARKER_FILE]
    assert target.read_text() == '{"mine": 1}'


def test_a_marker_cut_by_a_full_disk_leaves_no_file_in_the_way(tmp_path, monkeypatch):
    """A marker or record whose write fails (a full disk) is not left empty or cut under its name:
    it would be no marker, and in the way of the next run ('not written by this toolkit')."""
    import errno

    real_fsync = os.fsync

    def full(fd):
        if os.readlink(f'/proc/self/fd/{fd}').endswith(('chat_small_t5.json', '.record')):
            raise OSError(errno.ENOSPC, 'No space left on device')
        return real_fsync(fd)

    os.makedirs(tmp_path / 'm')
    monkeypatch.setattr(os, 'fsync', full)
    for name in (markers.MARKER_FILE, 'x.record'):
        with pytest.raises(OSError, match='No space left'):
            own.write_marker(str(tmp_path / 'm'), markers.MODEL, name=name)
    assert os.listdir(tmp_path / 'm') == []
    # the name swapped for a link to a user's file (or the user's own file) before the write failed: only what
    # this call made is removed, never a link or a file at that name since
    (tmp_path / 'mine.txt').write_text('mine')

    def swapped(fd):
        path = os.readlink(f'/proc/self/fd/{fd}')
        os.replace(str(tmp_path / 'link'), path)
        raise OSError(errno.ENOSPC, 'No space left on device')

    os.symlink(tmp_path / 'mine.txt', tmp_path / 'link')
    monkeypatch.setattr(os, 'fsync', swapped)
    with pytest.raises(OSError, match='No space left'):
        own.write_marker(str(tmp_path / 'm'), markers.MODEL)
    monkeypatch.undo()
    assert os.path.islink(tmp_path / 'm' / markers.MARKER_FILE) and (tmp_path / 'mine.txt').read_text() == 'mine'
    os.remove(tmp_path / 'm' / markers.MARKER_FILE)
    own.write_marker(str(tmp_path / 'm'), markers.MODEL)  # space freed: the next write goes ahead
    assert own.kind_of(str(tmp_path / 'm')) == markers.MODEL


def test_a_folder_that_cannot_be_made_on_a_full_disk_says_to_free_space(tmp_path, monkeypatch):
    import errno

    def full(path, *a, **kw):
        raise OSError(errno.ENOSPC, 'No space left on device')

    monkeypatch.setattr(os, 'mkdir', full)
    with pytest.raises(UserError, match=r'\(No space left on device\); free space there and run again'):
        writes.make_folders(str(tmp_path / 'new'))


def test_a_recorded_identity_tells_the_very_folder_across_a_kill_and_the_held_one_only_while_held(tmp_path):
    """still_as_recorded (a record read by a later process) knows the folder a record names from a
    folder made again at its name -- an inode number is soon reused, a change time is not -- and
    from a link there; still_the_one (device and inode, while held) knows a link, not a re-made one."""
    folder = tmp_path / 'item'
    folder.mkdir()
    recorded = own.recorded_identity(str(folder))
    held = own.identity(os.lstat(folder))
    assert recorded[0] == os.path.realpath(folder) and own.still_as_recorded(str(folder), *recorded[1:])
    assert own.still_the_one(str(folder), held)
    (folder / 'new').write_text('x')  # a write into it: no longer as recorded, still the one held
    assert not own.still_as_recorded(str(folder), *recorded[1:]) and own.still_the_one(str(folder), held)
    recorded = own.recorded_identity(str(folder))
    for _ in range(20):  # removed and made again: often the same inode, never the same change time
        (folder / 'new').unlink()
        folder.rmdir()
        time.sleep(0.002)
        folder.mkdir()
        (folder / 'new').write_text('x')
        assert not own.still_as_recorded(str(folder), *recorded[1:])
    recorded = own.recorded_identity(str(folder))
    held = own.identity(os.lstat(folder))
    os.rename(folder, tmp_path / 'away')
    os.symlink(tmp_path / 'away', folder)  # a link at its name leads to it, and is not it
    assert not own.still_as_recorded(str(folder), *recorded[1:]) and not own.still_the_one(str(folder), held)
    assert own.recorded_identity(str(folder))[0] == os.path.realpath(tmp_path / 'away')


def test_judging_a_place_reads_no_further_than_it_must_and_an_entry_gone_meanwhile_is_no_error(tmp_path, monkeypatch):
    # a place given by mistake may be a folder of millions of files (a dataset, /): a user's file at its top
    # refuses it without a walk through the rest
    big = tmp_path / 'dataset'
    for i in range(50):
        (big / f'part{i}').mkdir(parents=True)
        for j in range(20):
            (big / f'part{i}' / f'{j}.txt').write_text('x')
    (big / 'README').write_text('mine')
    looked = []
    real_lstat = os.lstat
    monkeypatch.setattr(own.os, 'lstat', lambda p, *a, **k: looked.append(p) or real_lstat(p, *a, **k))
    with pytest.raises(UserError, match='is a folder this toolkit did not make and is not empty'):
        own.check_replaceable(str(big), markers.STATE_DIR, 'train_state_dir', folder=True)
    assert len(looked) < 200, len(looked)  # 1,051 entries there
    # an entry that another process removes between the listing and its look is not there: no traceback
    monkeypatch.setattr(own.os, 'lstat', lambda p, *a, **k: (_ for _ in ()).throw(FileNotFoundError(p))
                        if p.endswith('/3.txt') else real_lstat(p, *a, **k))
    entries = own.list_entries(str(big))
    assert len(entries) == 1051 - 50 and not any(r.endswith('/3.txt') for r in entries)
