"""Links are storage, not ownership: every output place and input given as a link (to a folder, to
a file, to nothing) and links planted inside the toolkit's own folders. After each command the
whole tree is compared with its state before: only the toolkit's own entries, where the links
point, may have changed; no link was created, renamed, replaced or removed."""

from __future__ import annotations

import hashlib
import os
import shutil
import sys

import pytest

import cli_runner
from conftest import ENV, ROOT, leftover_temps, make_texts, run_train, tiny_flags


def cli(*args, script='train_low_mem.py', timeout=300):
    return cli_runner.run([sys.executable, script, *map(str, args)], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


def snapshot(root) -> dict[str, str]:
    """Every entry under root, links not followed: a link by its target, a file by its hash."""
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
                with open(p, 'rb') as f:
                    out[rel] = hashlib.sha256(f.read()).hexdigest()
    return out


def changed(before, after) -> set[str]:
    return {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}


def assert_only(root, before, *allowed):
    """Nothing changed under root but entries under the allowed places (relative paths); every
    link that was there is still there, unchanged."""
    after = snapshot(root)
    outside = {p for p in changed(before, after)
               if not any(p == a or p.startswith(a.rstrip('/') + '/') for a in allowed)}
    assert not outside, sorted(outside)
    for rel, what in before.items():
        if what.startswith('link -> '):
            assert after.get(rel) == what, rel
    assert not leftover_temps(root), leftover_temps(root)


def one_error(r, *words):
    lines = [line for line in r.stderr.splitlines() if line.startswith('error: ')]
    assert r.returncode == 2 and len(lines) == 1 and 'Traceback' not in r.stderr, r.stderr[-3000:]
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


@pytest.fixture
def world(tmp_path, data):
    """user/ holds the user's own things; scratch/ is the storage links point into."""
    (tmp_path / 'user').mkdir()
    (tmp_path / 'user' / 'notes.txt').write_text('mine')
    (tmp_path / 'user' / 'folder').mkdir()
    (tmp_path / 'user' / 'folder' / 'thesis.txt').write_text('years of work')
    (tmp_path / 'scratch').mkdir()
    src = tmp_path / 'user' / 'qa.jsonl'
    src.write_text(''.join(f'{{"prompt": "{p}", "response": "{r}"}}\n' for p, r in make_texts(60, seed=5)))
    return tmp_path


def test_prepare_data_writes_through_links_and_never_replaces_one(world):
    w = world
    os.symlink(w / 'user' / 'qa.jsonl', w / 'input_link.jsonl')
    os.symlink(w / 'scratch' / 'all.parquet', w / 'dangling.parquet')
    os.symlink(w / 'user' / 'notes.txt', w / 'to_user_file.parquet')
    os.symlink(w / 'user' / 'folder', w / 'to_folder.parquet')
    before = snapshot(w)
    r = cli('convert', w / 'input_link.jsonl', w / 'dangling.parquet', script='prepare_data.py')
    assert r.returncode == 0, r.stderr
    assert_only(w, before, 'scratch/all.parquet')
    before = snapshot(w)
    r = cli('convert', w / 'input_link.jsonl', w / 'dangling.parquet', script='prepare_data.py')  # again: replaced
    assert r.returncode == 0, r.stderr
    assert_only(w, before, 'scratch/all.parquet')
    for out, words in (('to_user_file.parquet', ('not written by this toolkit',)), ('to_folder.parquet', ('folder',))):
        before = snapshot(w)
        one_error(cli('convert', w / 'input_link.jsonl', w / out, script='prepare_data.py'), *words)
        assert_only(w, before)
    # an input pattern through a linked folder: an output where it really points is refused
    os.symlink(w / 'scratch', w / 'data_link')
    before = snapshot(w)
    one_error(cli('split', f'{w}/data_link/*.parquet', f'--train_out={w}/scratch/train.parquet',
                  f'--valid_out={w}/valid.parquet', script='prepare_data.py'), 'matches the input pattern')
    r = cli('split', f'{w}/data_link/*.parquet', f'--train_out={w}/train.parquet', f'--valid_out={w}/valid.parquet',
            script='prepare_data.py')
    assert r.returncode == 0, r.stderr
    assert_only(w, before, 'train.parquet', 'valid.parquet')


def test_tokenizer_dir_as_a_link_or_holding_one(world, data):
    w = world
    train = data['train']
    (w / 'scratch' / 'empty').mkdir()
    cases = {'to an empty folder': w / 'scratch' / 'empty', 'to nothing yet': w / 'scratch' / 'new_tok'}
    for name, target in cases.items():
        link = w / name.replace(' ', '_')
        os.symlink(target, link)
        before = snapshot(w)
        r = cli('train_tokenizer', f'--train_file={train}', f'--tokenizer_dir={link}', '--vocab_size=1000')
        assert r.returncode == 0, (name, r.stderr[-2000:])
        assert_only(w, before, os.path.relpath(target, w))
        assert os.path.isfile(target / 'tokenizer.json')
    link = w / 'to_nothing_yet'  # now a link to a tokenizer of the toolkit's: retrained in place
    before = snapshot(w)
    r = cli('train_tokenizer', f'--train_file={train}', f'--tokenizer_dir={link}', '--vocab_size=1100')
    assert r.returncode == 0, r.stderr[-2000:]
    assert_only(w, before, 'scratch/new_tok')
    # a copy of it, edited, with an empty folder and a link planted inside: the user's now
    copy = w / 'mytok'
    shutil.copytree(w / 'scratch' / 'new_tok', copy)
    (copy / 'tokenizer_config.json').write_text((copy / 'tokenizer_config.json').read_text() + ' ')
    (copy / 'extra').mkdir()
    os.symlink(w / 'user' / 'folder', copy / 'folder_link')
    os.symlink(w / 'user' / 'folder', w / 'to_user_folder')
    for target, words in ((copy, ('tokenizer_config.json (changed', 'extra/', 'folder_link (a link)')),
                          (w / 'to_user_folder', ('did not make',))):
        before = snapshot(w)
        one_error(cli('train_tokenizer', f'--train_file={train}', f'--tokenizer_dir={target}', '--vocab_size=1000'),
                  *words)
        assert_only(w, before)


def test_a_training_run_whose_places_are_links_into_scratch(world, data):
    w = world
    for name in ('out', 'states', 'models', 'logs'):
        (w / 'scratch' / name).mkdir()
        os.symlink(w / 'scratch' / name, w / f'{name}_link')
    os.symlink(os.path.dirname(data['train']), w / 'data_link')
    flags = tiny_flags(data, w / 'out_link', max_steps=4, save_steps=2, eval_steps=2,
                       train_file=f'{w}/data_link/train.parquet', train_state_dir=w / 'states_link',
                       model_file=f'{w}/models_link/m.{{}}.bin', log_dir=w / 'logs_link')
    before = snapshot(w)
    r = run_train(flags)
    assert r.returncode == 0, r.stderr[-3000:]
    assert_only(w, before, 'scratch/out', 'scratch/states', 'scratch/models', 'scratch/logs')
    assert os.path.isdir(w / 'scratch' / 'out' / 'best') and os.listdir(w / 'scratch' / 'states')
    # a link planted in the state folder, and the lock replaced by a link to the user's file
    os.symlink(w / 'user' / 'folder', w / 'scratch' / 'states' / 'state-000000006')
    before = snapshot(w)
    r = run_train(tiny_flags(data, w / 'out_link', max_steps=6, save_steps=2, eval_steps=2,
                             train_file=f'{w}/data_link/train.parquet', train_state_dir=w / 'states_link',
                             model_file=f'{w}/models_link/m.{{}}.bin', log_dir=w / 'logs_link'),
                  '--is_keep_training=True')
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'state-000000006.1' in r.stderr  # stepped around the link, never through it
    assert_only(w, before, 'scratch/out', 'scratch/states', 'scratch/models', 'scratch/logs')
    assert sorted(os.listdir(w / 'user' / 'folder')) == ['thesis.txt']
    lock = w / 'scratch' / 'out' / '.chat_small_t5.lock'
    os.remove(lock)
    os.symlink(w / 'user' / 'notes.txt', lock)
    before = snapshot(w)
    for extra in ('--dry_run=True', ''):
        r = run_train(flags, '--is_keep_training=True', *([extra] if extra else []))
        if extra:
            assert r.returncode == 1 and 'is a link' in r.stdout, r.stdout[-2000:]
        else:
            one_error(r, 'is a link')
    assert_only(w, before)
    assert (w / 'user' / 'notes.txt').read_text() == 'mine'


def test_a_pattern_never_skips_a_match_it_cannot_read(tmp_path, data):
    """A glob's matches are judged as a folder's files are: a link to a file is read through;
    a dangling link, a loop, a link to a folder or a FIFO is one line naming it, not skipped."""
    from model.data.files import resolve_parquet_files
    from model.errors import UserError

    d = tmp_path / 'd'
    os.makedirs(d)
    os.symlink(data['train'], d / 'a.parquet')
    assert resolve_parquet_files(f'{d}/*.parquet') == [f'{d}/a.parquet']
    for name, make, said in (('gone.parquet', lambda p: os.symlink(tmp_path / 'nothing', p), 'a link to nothing'),
                             ('loop.parquet', lambda p: os.symlink(p, p), 'a link to nothing, or in a loop'),
                             ('dir.parquet', lambda p: os.symlink(tmp_path, p), 'not a regular file'),
                             ('fifo.parquet', os.mkfifo, 'not a regular file')):
        make(d / name)
        with pytest.raises(UserError, match=f'{name}: matches .* but is {said}'):
            resolve_parquet_files(f'{d}/*.parquet')
        os.unlink(d / name)


def test_a_fifo_given_as_a_model_is_one_line_not_a_hang(tmp_path, data):
    from model.errors import UserError
    from model.net.model_source import describe_model_source

    os.mkfifo(tmp_path / 'w.bin')
    os.symlink(tmp_path / 'w.bin', tmp_path / 'link.bin')
    for path in ('w.bin', 'link.bin'):
        with pytest.raises(UserError, match='not a regular file'):
            describe_model_source(str(tmp_path / path), data['tok'], '--model_dir')


def test_a_link_into_a_folder_that_is_not_there_is_one_line_before_anything_is_made(tmp_path, data):
    """A dangling output link whose target's folder is missing too (scratch not mounted on this
    node) was followed and the whole chain made: a requeued run started afresh on the wrong disk.
    A link to a place not there yet, in a folder that is, is followed as before."""
    from config import resolve_config
    from model.errors import UserError
    from model.state.ownership import resolve_place
    from model.train import preflight

    unmounted = tmp_path / 'link_to_unmounted'
    os.symlink(tmp_path / 'mnt' / 'scratch' / 'user' / 'run', unmounted)
    with pytest.raises(UserError, match=r'is a link to .*/mnt/scratch/user/run, which is not there; it would go in '
                                        r'.*/mnt/scratch/user, which is not there either \(a filesystem not mounted '):
        resolve_place(str(unmounted / 'sub'), 'output_dir')
    (tmp_path / 'afile').write_text('x')
    os.symlink(tmp_path / 'afile' / 'run', tmp_path / 'link_under_a_file')
    with pytest.raises(UserError, match=r'afile, which is a file, not a folder'):
        resolve_place(str(tmp_path / 'link_under_a_file'), 'output_dir')
    flags = dict(arg[2:].split('=', 1) for arg in tiny_flags(data, unmounted))
    with pytest.raises(UserError, match=r'(model_file|train_state_dir|output_dir|log_dir): .*link_to_unmounted is a link to'):
        preflight.resolve_places(resolve_config(overrides=flags))
    # given only as --output_dir, relative (model_file, train_state_dir and log_dir follow it): named by that flag,
    # as typed (it said "model_file: /abs/link_to_unmounted")
    flags = {k: v for k, v in flags.items() if k not in ('model_file', 'train_state_dir', 'log_dir')}
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        with pytest.raises(UserError) as e:
            preflight.resolve_places(resolve_config(overrides={**flags, 'output_dir': 'link_to_unmounted'}))
    finally:
        os.chdir(cwd)
    assert str(e.value).startswith('output_dir: link_to_unmounted is a link to '), str(e.value)
    assert not os.path.exists(tmp_path / 'mnt')  # nothing made
    (tmp_path / 'scratch').mkdir()
    os.symlink(tmp_path / 'scratch' / 'new_run', tmp_path / 'link_to_new')
    assert resolve_place(str(tmp_path / 'link_to_new'), 'output_dir') == str(tmp_path / 'scratch' / 'new_run')


def test_a_place_given_as_a_link_to_nothing_is_named_as_given_with_the_link_and_its_target(tmp_path, data):
    """--output_dir (or another path) given as a link to a place not there yet: the messages named
    the link's target, a path the user never typed. Now they name the path as given, and say once
    that it is a link to a place not there, naming the target; the dry run notes it too. Nothing is
    made (the link stays a link to nothing)."""
    (tmp_path / 'scratch').mkdir()
    out, target = tmp_path / 'out_link', tmp_path / 'scratch' / 'run'
    os.symlink(target, out)
    flags = [f for f in tiny_flags(data, out) if f.split('=')[0] not in ('--model_file', '--train_state_dir', '--log_dir')]
    said = f'({out} is a link to {target}, which is not there)'
    r = cli('train', *flags, '--is_keep_training=True')
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f'error: --is_keep_training=True but no complete saved state in {out}/train_latest_state {said}; start '
        f'without --is_keep_training (or check --train_state_dir)'], r.stderr
    dry = cli('train', *flags, '--dry_run=True')
    assert dry.returncode == 0, dry.stdout
    assert f'note: output_dir: {out} is a link to {target}, which is not there yet: the run makes it there\n' in dry.stdout
    r = cli('generate', f'--output_dir={out}', f'--tokenizer_dir={data["tok"]}', '--prompts=你好')
    assert r.returncode == 2 and r.stderr.startswith(f'error: no trained model in {out}/best or {out}/final'), r.stderr
    assert said in r.stderr and f'{target}/' not in r.stderr, r.stderr
    train = tmp_path / 'train_link.parquet'  # an input: said the same way, in the dry run's problems and the run's error
    os.symlink(tmp_path / 'scratch' / 'train.parquet', train)
    flags = tiny_flags(data, tmp_path / 'run', train_file=train)
    dry = cli('train', *flags, '--dry_run=True')
    assert dry.returncode == 1 and (f'  - train_file: {train}: no such file ({train} is a link to {tmp_path}/scratch/'
                                    f'train.parquet, which is not there)\n') in dry.stdout, dry.stdout
    r = cli('train', *flags)
    assert r.returncode == 2 and r.stderr.startswith(f'error: train_file: {train}: no such file ({train} is a link to '), \
        r.stderr
    assert os.listdir(tmp_path / 'scratch') == [] and os.path.islink(out) and not os.path.exists(out)


def test_every_file_output_refuses_a_link_whose_target_is_written_as_a_folder(tmp_path):
    """p.png -> x.png/ was refused for prepare_data's outputs only: plot --out, test --out and every
    file the toolkit writes resolve their place one way (ownership.resolve_place(file=True))."""
    from model.errors import UserError
    from model.state import ownership, writes

    os.symlink('x.png/', tmp_path / 'p.png')
    os.symlink('x.jsonl/.', tmp_path / 'p.jsonl')
    for link in ('p.png', 'p.jsonl'):
        with pytest.raises(UserError, match="a folder's name; the output is a file"):
            ownership.resolve_place(str(tmp_path / link), '--out', file=True)
        assert ownership.resolve_place(str(tmp_path / link), '--out_dir')  # a folder's place: followed as ever
    from model.state.markers import PLOT

    with pytest.raises(UserError, match="a folder's name"):
        with writes.atomic_file(str(tmp_path / 'p.png'), PLOT, 'the plot'):
            pass
    assert not os.path.lexists(tmp_path / 'x.png') and not os.path.lexists(tmp_path / 'x.jsonl')


def test_a_link_to_nothing_made_since_is_no_longer_said_to_lead_nowhere(tmp_path):
    """ownership.as_given said '(<link> is a link to <target>, which is not there)' of a place its
    run had made since; the path is still said as given."""
    from model.state import ownership

    link, target = tmp_path / 'out_link', tmp_path / 'scratch' / 'run'
    (tmp_path / 'scratch').mkdir()
    os.symlink(target, link)
    real = ownership.resolve_place(str(link), 'output_dir')
    try:
        said = ownership.as_given(f'{real}/final: something')
        assert said == f'{link}/final: something ({link} is a link to {target}, which is not there)', said
        target.mkdir()
        assert ownership.as_given(f'{real}/final: something') == f'{link}/final: something'
    finally:
        ownership.PLACES.clear()


def test_a_place_given_by_another_flag_inside_a_link_to_nothings_target_keeps_its_own_name(tmp_path):
    """as_given rewrote every path under a link's target, so --train_state_dir=<target>/mystate
    (typed as the real path) was said as out_link/mystate, a path the user never typed: a path is
    said as the longest place it lies in."""
    from model.state import ownership

    link, target = tmp_path / 'out_link', tmp_path / 'scratch' / 'run'
    (tmp_path / 'scratch').mkdir()
    os.symlink(target, link)
    ownership.PLACES.clear()
    try:
        out = ownership.resolve_place(str(link), 'output_dir')
        states = ownership.resolve_place(str(target / 'mystate'), 'train_state_dir')
        said = ownership.as_given(f'{states}/state-000000002 is damaged; {out}/final is kept', fix=f'look in {states}')
        assert said == (f'{target}/mystate/state-000000002 is damaged; {link}/final is kept ({link} is a link to '
                        f'{target}, which is not there); look in {target}/mystate'), said
        assert ownership.as_given(f'{states}: x') == f'{target}/mystate: x'  # no link named where none is said
    finally:
        ownership.PLACES.clear()


def test_an_output_that_is_a_link_to_the_input_is_named_as_given(tmp_path):
    """`convert q.csv lnk.csv`, lnk.csv a link to q.csv: refused, naming the path given and where it leads (it
    named only the input's real path, which the user had not typed as the output)."""
    (tmp_path / 'q.csv').write_text('prompt,response\n问,答\n', encoding='utf-8')
    os.symlink(tmp_path / 'q.csv', tmp_path / 'lnk.csv')
    r = cli('convert', tmp_path / 'q.csv', tmp_path / 'lnk.csv', script='prepare_data.py')
    assert r.returncode == 2 and r.stderr == (f'error: --output: {tmp_path}/lnk.csv (a link to {tmp_path}/q.csv) is '
                                              f'also an input; write to another path\n'), r.stderr
    r = cli('convert', tmp_path / 'q.csv', tmp_path / 'q.csv', script='prepare_data.py')
    assert r.returncode == 2 and r.stderr == f'error: --output: {tmp_path}/q.csv is also an input; write to another ' \
                                             f'path\n', r.stderr
    assert (tmp_path / 'q.csv').read_text(encoding='utf-8') == 'prompt,response\n问,答\n'
    os.symlink(tmp_path, tmp_path / 'dl')  # the file itself no link, a folder on its way one: said so
    r = cli('convert', tmp_path / 'q.csv', tmp_path / 'dl' / 'q.csv', script='prepare_data.py')
    assert r.returncode == 2 and r.stderr == (f'error: --output: {tmp_path}/dl/q.csv (through a link: {tmp_path}/q.csv) '
                                              f'is also an input; write to another path\n'), r.stderr
