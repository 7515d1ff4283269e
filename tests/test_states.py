"""Saved states judged before the first step: the newest loadable one is resumed, a damaged or
foreign entry is left alone and stepped around, never replaced or pruned (units, in-process)."""

from __future__ import annotations

import glob
import json
import os
import shutil

import pytest

import cli_runner

from model.errors import UserError
from model.state import contract, markers, ownership as own, previous_runs as pr
from model.state import states as sf

JSON_FILES = {file: '{}' for file in (*contract.PART_FILES.values(), *contract.RUN_FILES.values())}


def make_state(state_dir, step, suffix='', files=None) -> str:
    """A state folder as the toolkit leaves one: its files, then a marker recording them."""
    sf.ensure_state_dir(str(state_dir))
    path = os.path.join(str(state_dir), sf.state_name(step) + suffix)
    os.makedirs(os.path.join(path, 'tokenizer'))
    for rel, text in (files or {'model.safetensors': f'weights {step}', **JSON_FILES,
                                'tokenizer/tokenizer.json': 'tok'}).items():
        with open(os.path.join(path, rel), 'w') as f:
            f.write(text)
    own.write_marker(path, markers.STATE, step=step)
    return path


def names(state_dir) -> list[str]:
    return sorted(n for n in os.listdir(state_dir) if n.startswith('state-'))


def test_a_whole_state_is_loadable_and_wholly_ours(tmp_path):
    path = make_state(tmp_path / 'states', 10)
    verdict = sf.judge_state(path)
    assert verdict.loadable and verdict.wholly_owned and verdict.step == 10
    assert sf.latest_state(str(tmp_path / 'states')) == path


def test_a_stray_entry_leaves_a_state_loadable_but_never_pruned(tmp_path):
    states = tmp_path / 'states'
    old, new = make_state(states, 10), make_state(states, 20)
    (tmp_path / 'notes.txt').write_text('mine')
    os.symlink(tmp_path / 'notes.txt', os.path.join(new, 'link'))
    (open(os.path.join(new, 'stray.pkl'), 'wb')).write(b'not a pickle: never loaded, never judged')
    verdict = sf.judge_state(new)
    assert verdict.loadable and not verdict.wholly_owned
    assert verdict.foreign == ['link (a link)', 'stray.pkl']
    report = contract.inspect(str(states), resume=True)
    assert report.resume_from == new and not report.problems
    assert 'stray.pkl' in report.notes[0] and 'never pruned' in report.notes[0]
    sf._prune_states(str(states), keep=0)
    assert names(states) == ['state-000000020']  # the old one pruned, the one with the stray kept
    assert (tmp_path / 'notes.txt').read_text() == 'mine'
    # a fresh run may not move it aside: one problem, before the first step
    problems = contract.inspect(str(states), resume=False).problems
    assert len(problems) == 1 and 'stray.pkl' in problems[0] and 'move it away yourself' in problems[0]
    assert old not in problems[0]


def test_a_damaged_newest_state_is_stepped_around_not_replaced(tmp_path):
    states = tmp_path / 'states'
    older, newest = make_state(states, 10), make_state(states, 20)
    with open(os.path.join(newest, 'model.safetensors'), 'w') as f:
        f.write('weights 21')  # same size, other content
    before = open(os.path.join(newest, 'model.safetensors')).read()
    report = contract.inspect(str(states), resume=True)
    assert report.resume_from == older
    assert 'is damaged' in report.notes[0] and 'checksum' in report.notes[0]
    # the resumed run reaches step 20 again: its state goes beside the damaged one
    assert sf.free_state_path(str(states), 20).endswith('state-000000020.1')
    saved = make_state(states, 20, '.1')
    assert [p for _, p in sf.list_complete_states(str(states))] == [older, newest, saved]
    assert sf.latest_state(str(states)) == saved
    sf._prune_states(str(states), keep=1)
    assert names(states) == ['state-000000020', 'state-000000020.1']  # damaged: left alone
    assert open(os.path.join(newest, 'model.safetensors')).read() == before


def test_every_state_damaged_or_none_is_one_problem(tmp_path):
    states = tmp_path / 'states'
    assert 'no complete saved state' in contract.inspect(str(states), resume=True).problems[0]
    path = make_state(states, 10)
    os.remove(os.path.join(path, 'model.safetensors'))
    problems = contract.inspect(str(states), resume=True).problems
    assert len(problems) == 1 and 'every saved state is damaged' in problems[0] and 'is missing' in problems[0]
    # a resume and a fresh run word it alike: the newest state's damage, and how many more
    newer = make_state(states, 20)
    with open(os.path.join(newer, 'model.safetensors'), 'w') as f:
        f.write('weights 21')  # same size, other content
    words = (f'every saved state is damaged since this toolkit saved it (the newest, {newer}: model.safetensors '
             f'differs from what was saved (checksum); and 1 more)')
    assert contract.inspect(str(states), resume=True).problems == [f'--is_keep_training=True but {words}']
    assert contract.inspect(str(states), resume=False).problems == [
        f'train_state_dir: {words}: none can be resumed, and a fresh run moves aside only states wholly as saved']


def test_links_and_files_named_like_states_are_never_states(tmp_path):
    states = tmp_path / 'states'
    real = make_state(tmp_path / 'elsewhere', 30)
    sf.ensure_state_dir(str(states))
    os.symlink(real, states / 'state-000000030')
    (states / 'state-000000040').write_text('a file of mine')
    assert sf.list_complete_states(str(states)) == []
    assert sf.free_state_path(str(states), 30).endswith('state-000000030.1')
    sf._prune_states(str(states), keep=0)
    sf.begin_save(str(states), str(states / '.tmp-state-000000050'))  # a save a killed run left half-done
    (states / '.tmp-state-000000050' / 'model.safetensors').write_text('half')
    os.symlink(tmp_path / 'elsewhere', states / '.tmp-state-000000060')
    os.makedirs(states / '.tmp-state-000000070')  # named alike, not a save of the toolkit's
    (states / '.tmp-state-000000070' / 'thesis.txt').write_text('mine')
    sf.sweep_tmp_states(str(states))
    assert sorted(os.listdir(states)) == sorted([markers.MARKER_FILE, '.tmp-state-000000060', '.tmp-state-000000070',
                                                 'state-000000030', 'state-000000040'])
    assert (states / '.tmp-state-000000070' / 'thesis.txt').read_text() == 'mine'
    assert os.path.isdir(real) and sf.judge_state(real).wholly_owned


def test_a_fresh_run_moves_aside_only_whole_states_of_its_own(tmp_path):
    states, out = tmp_path / 'states', tmp_path / 'out'
    make_state(states, 10)
    make_state(states, 20)
    assert not contract.inspect(str(states), resume=False).problems
    archive = pr.archive_previous_run(str(states), str(out / 'm.{}.bin'), str(out), 'stamp')
    assert names(os.path.join(archive, 'states')) == ['state-000000010', 'state-000000020']
    assert names(states) == [] and own.folder_kind(str(states)) == markers.STATE_DIR


def a_model_folder_and_a_step_file(out) -> None:
    import torch

    from model.state.model_files import save_weights_file

    os.makedirs(out / 'best')
    (out / 'best' / 'model.safetensors').write_text('weights')
    own.write_marker(str(out / 'best'), markers.MODEL)
    save_weights_file({'w': torch.zeros(2)}, str(out / 'm.20.bin'), step=20)


def test_states_in_the_output_folder_itself_are_moved_aside_by_what_they_are(tmp_path):
    out = tmp_path / 'out'  # train_state_dir = output_dir = the step files' folder
    make_state(out, 20)
    a_model_folder_and_a_step_file(out)
    archive = pr.archive_previous_run(str(out), str(out / 'm.{}.bin'), str(out), 'stamp')
    assert sorted(os.listdir(archive)) == ['best', 'm.20.bin', 'out']
    assert names(os.path.join(archive, 'out')) == ['state-000000020']
    assert sf.judge_state(os.path.join(archive, 'out', 'state-000000020')).wholly_owned
    assert sorted(os.listdir(out)) == [markers.MARKER_FILE, 'previous_runs']


def test_states_an_earlier_run_kept_in_the_output_folder_go_too_when_the_states_move_elsewhere(tmp_path):
    out = tmp_path / 'out'
    make_state(out, 20)  # an earlier run with --train_state_dir=<output_dir>
    make_state(out / 'train_latest_state', 30)
    a_model_folder_and_a_step_file(out)
    assert pr.state_folders(str(out / 'train_latest_state'), str(out / 'm.{}.bin'), str(out)) == [
        str(out / 'train_latest_state'), str(out)]
    archive = pr.archive_previous_run(str(out / 'train_latest_state'), str(out / 'm.{}.bin'), str(out), 'stamp')
    assert sorted(os.listdir(archive)) == ['best', 'm.20.bin', 'out', 'train_latest_state']
    assert names(os.path.join(archive, 'out')) == ['state-000000020']
    assert names(os.path.join(archive, 'train_latest_state')) == ['state-000000030']
    assert names(out) == [] and names(out / 'train_latest_state') == []


def test_a_state_folder_named_like_a_model_folder_is_archived_beside_it_not_into_it(tmp_path):
    states, out = tmp_path / 'scratch' / 'best', tmp_path / 'out'
    make_state(states, 20)
    a_model_folder_and_a_step_file(out)
    archive = pr.archive_previous_run(str(states), str(out / 'm.{}.bin'), str(out), 'stamp')
    assert sorted(os.listdir(archive)) == ['best', 'best-states', 'm.20.bin']
    assert names(os.path.join(archive, 'best-states')) == ['state-000000020']
    assert own.folder_kind(os.path.join(archive, 'best')) == markers.MODEL


def test_pruning_counts_only_whole_states_so_two_loadable_ones_stay(tmp_path):
    states = tmp_path / 'states'
    older, damaged = make_state(states, 10), make_state(states, 20)
    with open(os.path.join(damaged, 'model.safetensors'), 'w') as f:
        f.write('weights 21')  # same size: only the checksum sees it
    resumed = make_state(states, 20, '.1')  # the resumed run saved beside it
    sf._prune_states(str(states), keep=2)
    assert names(states) == ['state-000000010', 'state-000000020', 'state-000000020.1']
    assert sf.latest_state(str(states)) == resumed and sf.latest_state(str(states), deep=False) == resumed
    sf._prune_states(str(states), keep=1)  # the damaged one is left alone, never counted
    assert names(states) == ['state-000000020', 'state-000000020.1']
    assert os.path.isdir(older) is False


@pytest.mark.parametrize('killed_after', ['the save-in-progress file', 'the rename', 'half the removal'])
def test_a_prune_killed_at_any_moment_leaves_no_damaged_state(tmp_path, monkeypatch, killed_after):
    """A SIGKILL while a save pruned the oldest state left it half removed in place: "damaged,
    not written by this toolkit", which a fresh run's checks refused, and RESUME=auto's requeue
    stopped there. Now the state is made a save in progress, renamed, then removed: whatever a kill
    leaves is a whole state or a half-done save, which the next save sweeps."""
    import shutil as real_shutil

    class Killed(BaseException):
        pass

    states = tmp_path / 'states'
    make_state(states, 10)
    make_state(states, 20)
    if killed_after == 'the save-in-progress file':
        monkeypatch.setattr(sf.os, 'rename', lambda *a: (_ for _ in ()).throw(Killed()))
    elif killed_after == 'the rename':
        monkeypatch.setattr(sf.writes, 'fsync_dir', lambda *a: (_ for _ in ()).throw(Killed()))
    else:
        unlink, removed = os.unlink, []

        def half(path, *a, **k):  # one file of the state removed, then the kill (whatever the folder's order)
            if removed:
                raise Killed()
            removed.append(path)
            unlink(path, *a, **k)
        monkeypatch.setattr(sf.os, 'unlink', half)
    with pytest.raises(Killed):
        sf._prune_states(str(states), keep=1)
    monkeypatch.undo()
    if killed_after == 'half the removal':  # the save-in-progress file goes last, whatever rmtree's order
        assert os.path.basename(removed[0]) != markers.SAVING_FILE
    for step, path in sf.list_complete_states(str(states)):
        verdict = sf.judge_state(path)
        assert verdict.loadable and verdict.wholly_owned, (killed_after, path, verdict.problem)
    assert sf.latest_state(str(states)).endswith('state-000000020')
    sf.begin_save(str(states), sf.tmp_path(str(states), 30))  # the next save sweeps what the kill left
    assert sorted(os.listdir(states)) == sorted(
        [markers.MARKER_FILE, '.tmp-state-000000030', 'state-000000020']
        + (['state-000000010'] if killed_after == 'the save-in-progress file' else []))
    real_shutil.rmtree(sf.tmp_path(str(states), 30))


def test_a_state_judged_whole_is_not_hashed_again_until_a_listed_file_changes(tmp_path, monkeypatch):
    path = make_state(tmp_path / 'states', 10)
    hashed = []
    real = markers.file_sha256
    monkeypatch.setattr(markers, 'file_sha256', lambda p: hashed.append(p) or real(p))
    assert sf.judge_state(path).loadable and hashed
    hashed.clear()
    assert sf.judge_state(path).loadable and not hashed  # remembered
    target = os.path.join(path, 'model.safetensors')
    before = os.stat(target)
    with open(target, 'w') as f:
        f.write('weights 99')  # same size, and the mtime put back: only the ctime tells
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
    verdict = sf.judge_state(path)
    assert hashed and 'checksum' in verdict.problem


def write_predictions(path, **header) -> None:
    import json

    from model.state import writes

    with writes.atomic_file(str(path), markers.PREDICTIONS, 'predictions') as tmp:
        with open(tmp, 'w') as f:
            f.write(json.dumps(markers.file_marker_info(markers.PREDICTIONS, **header)) + '\n{"answer": "a"}\n')


def test_predictions_go_with_the_model_they_score_even_after_its_folder_moved(tmp_path):
    from model.state.model_files import model_identity

    out = tmp_path / 'moved_here'
    a_model_folder_and_a_step_file(out)
    best = str(out / 'best')
    cases = {  # file name -> (header, moved with best/)
        'best.predictions.moved.jsonl': ({'model': '/gone/run/best', 'model_id': model_identity(best)}, True),
        'best.predictions.old.jsonl': ({'model': '/gone/run/best'}, False),  # written before identities: unknown
        'best.predictions.other.jsonl': ({'model': '/gone/run/best', 'model_id': 'folder:another'}, False),
        'best.predictions.here.jsonl': ({'model': best, 'model_id': 'folder:an earlier best/ here'}, True),
        'best.predictions.step.jsonl': ({'model': str(out / 'm.20.bin'),
                                         'model_id': model_identity(str(out / 'm.20.bin'))}, False),
        'm.20.bin.predictions.x.jsonl': ({'model': '/gone/run/m.20.bin',
                                          'model_id': model_identity(str(out / 'm.20.bin'))}, True),
    }
    for name, (header, _) in cases.items():
        write_predictions(out / name, **header)
    os.symlink(out / 'best.predictions.here.jsonl', out / 'best.predictions.link.jsonl')
    found = pr.previous_run_artifacts(str(out / 'states'), str(out / 'm.{}.bin'), str(out))
    assert sorted(os.path.basename(p) for p in found if '.predictions.' in p) == sorted(
        name for name, (_, moved) in cases.items() if moved)
    notes = pr.predictions_left_beside(str(out / 'm.{}.bin'), str(out))
    assert len(notes) == 4 and any('best.predictions.link.jsonl' in n and 'a link' in n for n in notes), notes
    assert any('best.predictions.other.jsonl' in n and 'it scores /gone/run/best' in n for n in notes), notes



def test_the_predictions_a_save_leaves_describing_the_model_it_replaced_are_the_ones_of_that_model(tmp_path):
    from model.state.model_files import model_identity

    out = tmp_path / 'run'
    a_model_folder_and_a_step_file(out)
    best = str(out / 'best')
    now = model_identity(best)
    cases = {  # file name -> (header, scores best/ as it is now)
        'best.predictions.now.jsonl': ({'model': best, 'model_id': now}, True),
        'best.predictions.moved.jsonl': ({'model': '/gone/run/best', 'model_id': now}, True),  # by content
        'best.predictions.before.jsonl': ({'model': best, 'model_id': 'folder:an earlier best/ here'}, False),
        'best.predictions.old.jsonl': ({'model': best}, False),  # written before identities: unknown
        'best.predictions.step.jsonl': ({'model': str(out / 'm.20.bin'), 'model_id': now}, False),
        'best.predictions.edited.jsonl': ({'model': best, 'model_id': now}, False),
    }
    for name, (header, _) in cases.items():
        write_predictions(out / name, **header)
    with open(out / 'best.predictions.edited.jsonl', 'a') as f:
        f.write('{"answer": "mine"}\n')
    os.symlink(out / 'best.predictions.now.jsonl', out / 'best.predictions.link.jsonl')
    assert pr.predictions_scoring(best) == sorted(str(out / n) for n, (_, now_) in cases.items() if now_)
    assert pr.predictions_scoring(str(out / 'm.20.bin')) == []  # nothing under its name


def test_a_state_folder_named_like_a_folder_of_an_output_dir_is_renamed_in_the_archive_even_alone(tmp_path):
    out = tmp_path / 'out'
    for name in ('final', 'previous_runs'):  # no final/ moved beside: the archive may be resumed as an output_dir
        make_state(tmp_path / 'scratch' / name, 20)
        archive = pr.archive_previous_run(str(tmp_path / 'scratch' / name), str(out / 'm.{}.bin'), str(out), name)
        assert os.listdir(archive) == [f'{name}-states']


def test_the_moved_run_is_continued_with_its_own_states_only(tmp_path):
    import json
    import shlex

    from model.state.checkpoint import moved_run_advice

    def state_of(folder, output_dir):
        config = {'train': {'output_dir': str(output_dir), 'model_file': f'{output_dir}/m.{{}}.bin',
                            'train_state_dir': 'x'}}
        make_state(folder, 20, files={'model.safetensors': 'w', **JSON_FILES, 'config.json': json.dumps(config),
                                      'tokenizer/tokenizer.json': 'tok'})

    out, archive = tmp_path / 'my run', tmp_path / 'my run' / 'previous_runs' / 't'
    state_of(archive / 'a_states', tmp_path / 'another_run')  # sorted first: another run's states, moved too
    state_of(archive / 's3', out)
    advice, resume = moved_run_advice(str(archive), str(out), str(out / 'm.{}.bin'))
    flags = shlex.split(advice.split("apart from this run's): ")[1].split('; also moved')[0])
    assert shlex.split(resume) == flags
    assert flags == ['--is_keep_training=True', f'--output_dir={archive}', f'--model_file={archive}/m.{{}}.bin',
                     f'--train_state_dir={archive}/s3'], advice
    assert f'also moved: {archive}/a_states, the states of a run whose output_dir was {tmp_path}/another_run' in advice
    shutil.rmtree(archive / 's3')
    advice, resume = moved_run_advice(str(archive), str(out), str(out / 'm.{}.bin'))
    assert resume is None and advice.startswith('no state of the run whose models were here was among what was moved') and \
        '--train_state_dir=' not in advice, advice


def test_states_left_in_the_output_folders_default_state_folder_go_too(tmp_path):
    out = tmp_path / 'out'  # an earlier run given only --output_dir; this one keeps its states in output_dir itself
    make_state(out / 'train_latest_state', 30)
    sf.begin_save(str(out / 'train_latest_state'), str(out / 'train_latest_state' / '.tmp-state-000000040'))
    a_model_folder_and_a_step_file(out)
    archive = pr.archive_previous_run(str(out), str(out / 'm.{}.bin'), str(out), 'stamp')
    assert names(os.path.join(archive, 'train_latest_state')) == ['state-000000030']
    # a half-done save is swept only where this run holds the lock (not in that folder: a run may be saving there)
    assert sorted(os.listdir(out / 'train_latest_state')) == sorted([markers.MARKER_FILE, '.tmp-state-000000040'])


def test_a_save_never_takes_over_or_removes_a_folder_or_link_in_the_way_of_its_temporary_name(tmp_path):
    states = tmp_path / 'states'
    sf.ensure_state_dir(str(states))
    mine = states / '.tmp-state-000000050'  # a user's folder with the name a save of step 50 would use
    mine.mkdir()
    (mine / 'thesis.txt').write_text('mine')
    os.symlink(tmp_path / 'elsewhere', states / '.tmp-state-000000060')  # and a link, to a folder of the user's
    (tmp_path / 'elsewhere').mkdir()
    for step, what in ((50, mine), (60, states / '.tmp-state-000000060')):
        tmp = sf.tmp_path(str(states), step)
        try:
            sf.begin_save(str(states), tmp)
            raise AssertionError('the save went ahead')
        except UserError as e:
            assert 'is in the way of the save of this step' in str(e) and 'this toolkit did not make it' in str(e)
            sf.save_failed(e, str(states), tmp, is_main=True)  # what a failed save does next
        assert os.path.lexists(what)
    assert (mine / 'thesis.txt').read_text() == 'mine' and os.listdir(tmp_path / 'elsewhere') == []
    assert os.path.islink(states / '.tmp-state-000000060')



def test_a_save_killed_before_its_marking_file_or_a_removal_after_it_never_blocks_a_later_save(tmp_path):
    """begin_save makes the folder, then its SAVING file; a removal takes the SAVING file, then the
    folder: a kill between left an empty folder (or one with an empty SAVING file) that every later
    save of that step called "in the way" -- each RESUME=auto requeue stopped there."""
    states = tmp_path / 'states'
    sf.ensure_state_dir(str(states))
    os.mkdir(sf.tmp_path(str(states), 8))
    os.mkdir(sf.tmp_path(str(states), 9))
    open(os.path.join(sf.tmp_path(str(states), 9), markers.SAVING_FILE), 'w').close()
    notes = sf.tmp_path(str(states), 11)  # a user's file of that name, with something in it: never taken
    os.mkdir(notes)
    with open(os.path.join(notes, markers.SAVING_FILE), 'w') as f:
        f.write('my notes, not a lock\n')
    mine = tmp_path / 'mine'  # links of that name, to a user's empty folder and to one holding an empty such file
    (mine / 'empty').mkdir(parents=True)
    (mine / 'marked').mkdir()
    open(mine / 'marked' / markers.SAVING_FILE, 'w').close()
    os.symlink(mine / 'empty', sf.tmp_path(str(states), 12))
    os.symlink(mine / 'marked', sf.tmp_path(str(states), 13))
    links = [os.path.basename(sf.tmp_path(str(states), n)) for n in (12, 13)]
    for step in (8, 9):
        sf.begin_save(str(states), sf.tmp_path(str(states), step))
        assert ownership_saving(sf.tmp_path(str(states), step))
        sf.save_failed(None, str(states), sf.tmp_path(str(states), step), is_main=True)
    assert sorted(os.listdir(states)) == sorted([markers.MARKER_FILE, os.path.basename(notes), *links])
    assert open(os.path.join(notes, markers.SAVING_FILE)).read() == 'my notes, not a lock\n'
    assert os.listdir(mine / 'empty') == [] and os.listdir(mine / 'marked') == [markers.SAVING_FILE]  # never followed


def ownership_saving(folder) -> bool:
    return own.is_saving_file(os.path.join(folder, markers.SAVING_FILE))


def test_a_prune_that_cannot_remove_a_state_says_so_and_the_save_stands(tmp_path, monkeypatch, caplog):
    """A state the prune could not remove (a permission, a busy file) crashed the run right after a
    good save, with a traceback; the leftover was then never mentioned again."""
    states = tmp_path / 'states'
    make_state(states, 10)
    make_state(states, 20)
    real = sf._remove_half_done

    def fails(path):
        raise PermissionError(13, 'Permission denied', path)
    monkeypatch.setattr(sf, '_remove_half_done', fails)
    with caplog.at_level('WARNING'):
        sf._prune_states(str(states), keep=1)
        sf.sweep_tmp_states(str(states))
        sf.sweep_tmp_states(str(states))
    said = [r.getMessage() for r in caplog.records]
    assert sum('state-000000010 could not be pruned (Permission denied)' in m for m in said) == 1, said
    assert sum('could not be removed (Permission denied)' in m for m in said) == 1  # said once, tried at every save
    assert sf.latest_state(str(states)).endswith('state-000000020')
    monkeypatch.setattr(sf, '_remove_half_done', real)
    sf.sweep_tmp_states(str(states))  # once it can: gone
    assert names(states) == ['state-000000020'] and not [n for n in os.listdir(states) if n.startswith('.tmp')]
    make_state(states, 30)  # a state that cannot even be marked (a folder of another owner): left in place
    monkeypatch.setattr(sf, '_write_saving_file', fails)
    caplog.clear()
    with caplog.at_level('WARNING'):
        for _ in range(3):  # every save tries again; it is said once
            sf._prune_states(str(states), keep=1)
    assert sum('state-000000020 could not be pruned' in r.getMessage() for r in caplog.records) == 1
    assert names(states) == ['state-000000020', 'state-000000030']


def test_a_save_in_progress_is_marked_until_its_state_is_in_place_and_never_part_of_it(tmp_path):
    states = tmp_path / 'states'
    tmp = sf.tmp_path(str(states), 70)
    sf.begin_save(str(states), tmp)
    assert own.is_saving_file(os.path.join(tmp, sf.SAVING))
    for rel, text in {'model.safetensors': 'w', **JSON_FILES}.items():
        with open(os.path.join(tmp, rel), 'w') as f:
            f.write(text)
    final = sf.complete_save(str(states), tmp, 70, keep=2)
    assert not os.path.exists(os.path.join(final, sf.SAVING)) and sf.judge_state(final).wholly_owned
    # a save-in-progress file left in a complete state (its removal failed) is not an entry of its own
    with open(os.path.join(final, sf.SAVING), 'w') as f:
        f.write('host 123\n')
    assert sf.judge_state(final).wholly_owned
    # a file of that name holding something else is the user's: it makes the state theirs
    with open(os.path.join(final, sf.SAVING), 'w') as f:
        f.write('my notes\n')
    assert sf.judge_state(final).foreign == [sf.SAVING]


def test_an_archive_on_a_full_disk_elsewhere_leaves_no_half_copy_and_says_so_in_one_line(tmp_path, monkeypatch):
    out = tmp_path / 'out'
    make_state(out / 'states', 20)
    a_model_folder_and_a_step_file(out)
    real_copy = shutil.copyfile

    def copy_fails_on_the_model(src, dst, **kw):  # previous_runs on another, full disk: the copy fails midway
        if os.path.basename(src) == 'model.safetensors' and 'previous_runs' in str(dst):
            open(dst, 'w').close()  # a half copy
            raise OSError(28, 'No space left on device')
        return real_copy(src, dst, **kw)

    previous_runs_elsewhere(monkeypatch)
    monkeypatch.setattr(shutil, 'copyfile', copy_fails_on_the_model)
    try:
        pr.archive_previous_run(str(out / 'states'), str(out / 'm.{}.bin'), str(out), 'stamp')
        raise AssertionError('the archive went ahead')
    except UserError as e:
        assert 'no space left on the device' in str(e) and 'every item stays where it was' in str(e), e
    monkeypatch.undo()
    archive = out / 'previous_runs' / 'stamp'
    assert names(out / 'states') == ['state-000000020'] and sf.judge_state(str(out / 'states' / 'state-000000020')).wholly_owned
    assert not glob.glob(f'{archive}/**/model.safetensors', recursive=True)  # no half copy of anything
    left = [p for p in ('best', 'm.20.bin') if os.path.exists(out / p)]
    assert left, 'every item was taken from its place'
    # a cut after the state moved (the best model's copy fails), then space freed: the next fresh run moves the
    # rest into the same archive -- one run is never split over two
    out = tmp_path / 'out_cut'
    archive = cut_archive_move(out, monkeypatch)
    left = [p for p in ('best', 'm.20.bin') if os.path.exists(out / p)]
    assert names(out / 'states') == [] and 'best' in left  # the state moved, the best model did not
    items = pr.previous_run_artifacts(str(out / 'states'), str(out / 'm.{}.bin'), str(out))
    assert os.path.isfile(archive / pr.MOVING) and pr.unfinished_archive(str(out), items) == str(archive)
    assert pr.archive_previous_run(str(out / 'states'), str(out / 'm.{}.bin'), str(out), 'stamp2') == str(archive)
    assert os.listdir(out / 'previous_runs') == ['stamp'] and not os.path.exists(archive / pr.MOVING)
    assert not any(os.path.exists(out / p) for p in left) and all(os.path.exists(archive / p) for p in left)
    from model.state.checkpoint import moved_run_advice

    advice, flags = moved_run_advice(str(archive), str(out), str(out / 'm.{}.bin'))
    assert flags and f'--output_dir={archive}' in flags, advice  # its states and its models resume together
    assert pr.unfinished_archive(str(out), items) is None
    # the only item fails: no empty archive (nor previous_runs/, made for it) is left behind
    only = tmp_path / 'only'
    make_state(only / 'states', 20)
    previous_runs_elsewhere(monkeypatch)
    monkeypatch.setattr(shutil, 'copyfile', copy_fails_on_the_model)
    with pytest.raises(UserError, match='no space left on the device'):
        pr.archive_previous_run(str(only / 'states'), str(only / 'm.{}.bin'), str(only), 'stamp')
    monkeypatch.undo()
    assert sorted(os.listdir(only)) == ['states'] and names(only / 'states') == ['state-000000020']


def previous_runs_elsewhere(monkeypatch) -> None:
    """previous_runs/ on another filesystem: a rename into it fails as across devices (EXDEV), one
    inside it goes."""
    real_rename = os.rename

    def rename(src, dst, *a, **kw):
        if (os.sep + 'previous_runs' + os.sep in os.fspath(dst)) != (os.sep + 'previous_runs' + os.sep in os.fspath(src)):
            raise OSError(18, 'Invalid cross-device link')
        return real_rename(src, dst, *a, **kw)

    monkeypatch.setattr(os, 'rename', rename)


def run_state(state_dir, step, run, output_dir=None, saved_in=None) -> str:
    """A state saved by the run with this id (None: before runs had ids) for this output_dir, in
    state_dir (or in saved_in, and moved to state_dir since)."""
    import json

    config = {'train': {'output_dir': str(output_dir or state_dir), 'model_file': f'{output_dir or state_dir}/m.{{}}.bin',
                        'train_state_dir': str(saved_in or state_dir)}}
    return make_state(state_dir, step, files={'model.safetensors': f'weights {step}', **JSON_FILES,
                                              'config.json': json.dumps(config),
                                              'run.json': json.dumps({'run_id': run} if run else {}),
                                              'tokenizer/tokenizer.json': 'tok'})


def run_models(out, run, folders=('best',), steps=()) -> None:
    """Model folders and step files (out/m.<step>.bin) as the run with this id writes them."""
    import torch

    from model.state.model_files import save_weights_file

    for name in folders:
        os.makedirs(out / name)
        (out / name / 'model.safetensors').write_text('weights')
        own.write_marker(str(out / name), markers.MODEL, **({'run_id': run} if run else {}))
    for step in steps:
        save_weights_file({'w': torch.zeros(2)}, str(out / f'm.{step}.bin'), step=step, run_id=run)


def test_the_models_another_run_wrote_are_told_by_their_run_id_either_way(tmp_path):
    from model.state.model_files import holds_run, other_runs_models

    out = tmp_path / 'out'
    run_models(out, 'R', folders=('best',), steps=(10,))
    run_models(out, None, folders=('final',), steps=(20,))  # written before runs had ids
    os.makedirs(out / 'mine')  # a user's folder, and a link to a model: never a run's model
    os.symlink(out / 'best', out / 'm.30.bin')
    pattern = str(out / 'm.{}.bin')
    assert holds_run(str(out), None, 'R') and holds_run(str(out), pattern, 'R') and not holds_run(str(out), None, 'S')
    assert sorted(other_runs_models(str(out), pattern, 'R')) == [(str(out / 'final'), None), (str(out / 'm.20.bin'), None)]
    # a run from before ids writes none with an id: those with one are another run's; its own look like the rest
    assert sorted(other_runs_models(str(out), pattern, None)) == [(str(out / 'best'), 'R'), (str(out / 'm.10.bin'), 'R')]
    assert sorted(p for p, _ in other_runs_models(str(out), pattern, 'S')) == [
        str(out / n) for n in ('best', 'final', 'm.10.bin', 'm.20.bin')]


def test_a_state_folder_is_the_copy_of_a_run_only_inside_the_copy_or_where_the_original_is_gone(tmp_path):
    a, copy = tmp_path / 'a', tmp_path / 'copy'
    run_models(a, 'R', steps=(10,))
    run_models(copy, 'R', folders=(), steps=(10,))  # a copy of its outputs, no best/ yet: its step files tell the run
    inside, outside = copy / 'state', tmp_path / 'shared_states'
    for folder in (inside, outside):
        run_state(folder, 10, 'R', output_dir=a)
    pattern = f'{copy}/m.{{}}.bin'
    assert contract.states_of_output([str(inside)], str(copy), pattern) == str(inside)
    # states outside the copy, their run's models still in a: that run's, never the copy's
    assert contract.states_of_output([str(outside)], str(copy), pattern) is None
    assert contract.run_home(contract.saved_places(str(outside))) == (str(a), f'{a}/m.{{}}.bin')
    # the original's models moved aside by a fresh run there: they are found in its archive
    archive = a / 'previous_runs' / '20261206-000000'
    os.makedirs(archive)
    for name in ('best', 'm.10.bin'):
        shutil.move(str(a / name), str(archive / name))
    run_models(a, 'Z', steps=(10,))
    assert contract.run_home(contract.saved_places(str(outside))) == (str(archive), f'{archive}/m.{{}}.bin')
    assert contract.states_of_output([str(outside)], str(copy), pattern) is None
    shutil.move(str(a), str(tmp_path / 'a_moved'))  # the original moved away by hand: nothing holds them there now
    assert contract.run_home(contract.saved_places(str(outside))) is None
    assert contract.states_of_output([str(outside)], str(copy), pattern) == str(outside)
    # another run's states are no copy
    run_state(tmp_path / 'other', 10, 'S', output_dir=a)
    assert contract.states_of_output([str(tmp_path / 'other')], str(copy), pattern) is None


def test_a_save_prunes_only_its_own_runs_states(tmp_path):
    states = tmp_path / 'states'
    for step, run in ((10, 'R'), (20, 'R'), (30, 'S'), (40, 'R')):
        run_state(states, step, run)
    assert contract.runs_of_states(str(states)) == {'R': [str(states / sf.state_name(s)) for s in (10, 20, 40)],
                                                    'S': [str(states / sf.state_name(30))]}
    sf._prune_states(str(states), keep=1, saved=str(states / sf.state_name(40)))
    assert names(states) == [sf.state_name(30), sf.state_name(40)]  # the other run's state stays


def test_an_archive_move_whose_removal_fails_midway_keeps_the_whole_copy(tmp_path, monkeypatch):
    import errno

    out = tmp_path / 'out'
    a_model_folder_and_a_step_file(out)
    real_rmtree = shutil.rmtree

    def removal_fails_midway(path, *a, **kw):  # previous_runs on another filesystem: copied, then removed there
        if 'previous_runs' in str(path):
            return real_rmtree(path, *a, **kw)
        os.remove(os.path.join(path, 'model.safetensors'))
        raise OSError(errno.EACCES, 'Permission denied')

    previous_runs_elsewhere(monkeypatch)
    monkeypatch.setattr(shutil, 'rmtree', removal_fails_midway)
    with pytest.raises(UserError, match=r'was copied whole into .*but removing it where it was failed'):
        pr.archive_previous_run(str(out / 'states'), str(out / 'm.{}.bin'), str(out), 'stamp')
    monkeypatch.undo()
    # the whole copy is in place; what is left of the item, under the hidden name it took, goes with the next run
    archive = out / 'previous_runs' / 'stamp'
    assert own.kind_of(str(archive / 'best')) == markers.MODEL and not os.path.lexists(out / 'best')
    (left,) = glob.glob(f'{out}/{pr.REMOVING}*')
    assert sorted(os.listdir(left)) == ['chat_small_t5.json']
    assert pr.archive_previous_run(str(out / 'states'), str(out / 'm.{}.bin'), str(out), 'stamp2') is None
    assert not os.path.lexists(left) and sorted(os.listdir(archive)) == ['best', 'm.20.bin']
    assert own.kind_of(str(archive / 'best')) == markers.MODEL


def test_an_archive_never_removes_what_it_did_not_copy_nor_calls_a_half_copy_whole(tmp_path, monkeypatch):
    import builtins
    import errno

    import torch

    from model.state.model_files import save_weights_file

    # two items of one name (a model_file pattern whose best file is named best): both kept, neither replaced
    out, other = tmp_path / 'out', tmp_path / 'other'
    a_model_folder_and_a_step_file(out)
    os.makedirs(other)
    save_weights_file({'w': torch.ones(2)}, str(other / 'best'), step=20)
    archive = pr.archive_previous_run(str(out / 'states'), str(other / '{}'), str(out), 'stamp')
    assert sorted(os.listdir(archive)) == ['best', 'best-1'] and not os.listdir(other)
    assert {own.kind_of(os.path.join(archive, n)) for n in ('best', 'best-1')} == {markers.MODEL, markers.WEIGHTS}
    # a copy that fails midway while the item cannot be judged where it is (a failing disk): the half copy is
    # taken back, never called whole
    out2 = tmp_path / 'out2'
    a_model_folder_and_a_step_file(out2)
    shutil.rmtree(out2 / 'best')
    real_kind, unreadable = own.kind_of, set()

    def half_copy(src, dst, **kw):  # the disk fails midway: half a copy, and the item no longer readable there
        with open(src, 'rb') as f, open(dst, 'wb') as g:
            g.write(f.read(100))
        unreadable.add(os.path.realpath(src))
        raise OSError(errno.EIO, 'Input/output error')

    previous_runs_elsewhere(monkeypatch)
    monkeypatch.setattr(shutil, 'copyfile', half_copy)
    monkeypatch.setattr(own, 'kind_of', lambda p: None if os.path.realpath(p) in unreadable else real_kind(p))
    with pytest.raises(UserError) as e:
        pr.archive_previous_run(str(out2 / 'states'), str(out2 / 'm.{}.bin'), str(out2), 'stamp')
    monkeypatch.undo()
    assert 'copied whole' not in str(e.value) and 'Input/output error' in str(e.value), e.value
    assert not os.path.exists(out2 / 'previous_runs') and real_kind(str(out2 / 'm.20.bin')) == markers.WEIGHTS
    # a save whose save-in-progress file cannot be written leaves no folder of its own behind
    sd = str(tmp_path / 'states')
    sf.ensure_state_dir(sd)
    real_open = builtins.open
    monkeypatch.setattr(builtins, 'open', lambda p, *a, **k: (_ for _ in ()).throw(OSError(28, 'No space left'))
                        if str(p).endswith(sf.SAVING) else real_open(p, *a, **k))
    with pytest.raises(OSError):
        sf.begin_save(sd, sf.tmp_path(sd, 10))
    monkeypatch.undo()
    assert not os.path.lexists(sf.tmp_path(sd, 10))
    sf.begin_save(sd, sf.tmp_path(sd, 10))  # the next save goes ahead


def test_a_half_done_save_is_removed_without_following_a_link_inside_it(tmp_path):
    """The sweep empties a half-done save (its own SAVING file) entry by entry: a link in it -- to a
    user's folder, a file, nothing -- is removed as a link, and what it points to is never touched."""
    states = tmp_path / 'states'
    sf.ensure_state_dir(str(states))
    tmp = sf.tmp_path(str(states), 7)
    sf.begin_save(str(states), tmp)  # the toolkit's own save in progress, then killed
    theirs = tmp_path / 'theirs'
    (theirs / 'sub').mkdir(parents=True)
    (theirs / 'sub' / 'thesis.txt').write_text('mine')
    (theirs / 'notes.txt').write_text('mine too')
    os.makedirs(os.path.join(tmp, 'tokenizer'))
    os.symlink(theirs, os.path.join(tmp, 'to_a_folder'))
    os.symlink(theirs / 'notes.txt', os.path.join(tmp, 'to_a_file'))
    os.symlink(tmp_path / 'nowhere', os.path.join(tmp, 'to_nothing'))
    os.symlink(theirs / 'sub', os.path.join(tmp, 'tokenizer', 'nested'))
    sf.sweep_tmp_states(str(states))
    assert not os.path.lexists(tmp)
    assert (theirs / 'sub' / 'thesis.txt').read_text() == 'mine' and (theirs / 'notes.txt').read_text() == 'mine too'


def test_a_folder_judged_half_done_for_being_empty_keeps_what_was_put_in_it_since(tmp_path):
    """An empty folder of a save's name is swept (a save killed before its SAVING file); one that
    gets a user's file between that judgement and the removal keeps it: only the folder goes, by
    rmdir, and a non-empty file of the SAVING name is never taken."""
    states = tmp_path / 'states'
    sf.ensure_state_dir(str(states))
    for n, name, text in ((3, 'thesis.txt', 'mine'), (4, markers.SAVING_FILE, 'my notes, not a lock\n')):
        folder = sf.tmp_path(str(states), n)
        os.mkdir(folder)
        assert sf._is_half_done_save(folder)  # judged: empty
        with open(os.path.join(folder, name), 'w') as f:  # then the user's file arrives
            f.write(text)
        with pytest.raises(OSError):
            sf._remove_half_done(folder)
        assert open(os.path.join(folder, name)).read() == text
    empty = sf.tmp_path(str(states), 5)
    os.mkdir(empty)
    open(os.path.join(empty, markers.SAVING_FILE), 'w').close()
    sf._remove_half_done(empty)  # nothing of anyone's: gone
    assert not os.path.lexists(empty)


def test_a_state_copied_under_another_steps_name_is_neither_resumed_nor_pruned(tmp_path):
    """A user's copy of state-4 as state-99 (a bookmark) was the newest by name: every RESUME=auto
    resumed step 4 from it, and each save pruned the real newer states around it; copies named
    state-2 and state-3 were pruned without a word. A state is the step its marker records."""
    states = tmp_path / 'states'
    four = make_state(states, 4)
    six = make_state(states, 6)
    for name in ('state-000000099', 'state-000000002'):
        shutil.copytree(four, states / name)
    bookmark = sf.judge_state(str(states / 'state-000000099'))
    assert not bookmark.loadable and 'its marker records step 4, not the 99 of its name' in bookmark.problem
    report = contract.inspect(str(states), resume=True, deep=False)
    assert not report.problems  # the resume steps around the copy, to the newest state that is what it says
    assert sf.latest_state(str(states)) == six
    make_state(states, 8)
    sf._prune_states(str(states), keep=1)
    assert names(states) == ['state-000000002', 'state-000000008', 'state-000000099']  # the copies stay


def cut_archive_move(out, monkeypatch):
    """A run's state, best model and step file, whose move into previous_runs/stamp (on another, full
    disk) was cut after the state moved. -> the archive folder."""
    run_state(out / 'states', 20, 'r1', output_dir=out)
    a_model_folder_and_a_step_file(out)
    real_copy = shutil.copyfile

    def copy_fails_on_the_best_model(src, dst, **kw):
        if os.fspath(src) == str(out / 'best' / 'model.safetensors') and 'previous_runs' in str(dst):
            raise OSError(28, 'No space left on device')
        return real_copy(src, dst, **kw)

    previous_runs_elsewhere(monkeypatch)
    monkeypatch.setattr(shutil, 'copyfile', copy_fails_on_the_best_model)
    with pytest.raises(UserError, match='no space left.*the rest stays where it was.*run the same command again: it moves the rest into'):
        pr.archive_previous_run(str(out / 'states'), str(out / 'm.{}.bin'), str(out), 'stamp')
    monkeypatch.undo()
    return out / 'previous_runs' / 'stamp'


def test_only_the_toolkits_record_of_a_cut_move_of_these_very_items_is_continued(tmp_path, monkeypatch):
    """A folder is continued only where the toolkit's record names these very items (same files,
    by inode) for this output_dir, and no run has trained in it since: a user's folder holding a file
    of that name, another run's items at the same paths, an archive resumed in place -- each is
    left alone and the move goes into a new folder."""
    def items(out):
        return pr.previous_run_artifacts(str(out / 'states'), str(out / 'm.{}.bin'), str(out))

    out = tmp_path / 'a'
    archive = cut_archive_move(out, monkeypatch)
    user = out / 'previous_runs' / 'zzz_mine'  # sorts after: would be "the newest"
    os.makedirs(user)
    (user / pr.MOVING).write_text('hello\n')
    (user / 'notes.txt').write_text('mine')
    assert pr.unfinished_archive(str(out), items(out)) == str(archive)  # the toolkit's record, not the user's file
    shutil.copytree(archive, out / 'previous_runs' / 'zz_backup', symlinks=True)  # a user's copy, record and all
    assert pr.unfinished_archive(str(out), items(out)) == str(archive)  # the record names its own folder
    shutil.rmtree(out / 'previous_runs' / 'zz_backup')
    assert pr.unfinished_archive(str(tmp_path / 'elsewhere'), items(out)) is None  # another output_dir's
    (archive / markers.LOCK_FILE).write_text('')  # a run continued the archive in place: it is that run's now
    assert pr.unfinished_archive(str(out), items(out)) is None
    os.remove(archive / markers.LOCK_FILE)
    shutil.rmtree(out / 'best')  # another run's best model where the cut one was: not the items recorded
    os.makedirs(out / 'best')
    (out / 'best' / 'model.safetensors').write_text('weights')
    own.write_marker(str(out / 'best'), markers.MODEL)
    assert pr.unfinished_archive(str(out), items(out)) is None
    # every recorded item is gone from its place now (the state and step file moved, the best model replaced), as
    # after a kill between the last move and the record's removal: a dry run leaves the record, a run removes it
    assert os.path.isfile(archive / pr.MOVING)
    moved = pr.archive_previous_run(str(out / 'states'), str(out / 'm.{}.bin'), str(out), 'later')
    assert moved == str(out / 'previous_runs' / 'later')
    assert sorted(os.listdir(user)) == [pr.MOVING, 'notes.txt'] and (user / pr.MOVING).read_text() == 'hello\n'
    assert not os.path.exists(archive / pr.MOVING)


def test_a_cut_moves_record_is_never_read_or_removed_through_a_link(tmp_path, monkeypatch):
    """The record of a cut move (removed once the move ends, or when stale) is the toolkit's only in
    the very archive folder it names, as a plain file: a link in previous_runs/ to a user's folder
    holding a copy of it, or the record replaced by a link to a user's file, is not continued, and
    the user's files stay."""
    out = tmp_path / 'out'
    archive = cut_archive_move(out, monkeypatch)
    items = pr.previous_run_artifacts(str(out / 'states'), str(out / 'm.{}.bin'), str(out))
    record = (archive / pr.MOVING).read_bytes()
    users = tmp_path / 'users'
    os.makedirs(users)
    (users / pr.MOVING).write_bytes(record)
    os.symlink(users, out / 'previous_runs' / 'zzz_link')  # sorts last: would be "the newest"
    assert pr.unfinished_archive(str(out), items, tidy=True) == str(archive)
    os.remove(archive / pr.MOVING)
    os.symlink(users / pr.MOVING, archive / pr.MOVING)  # the record now a link to the user's copy
    assert pr.unfinished_archive(str(out), items, tidy=True) is None
    assert pr.archive_previous_run(str(out / 'states'), str(out / 'm.{}.bin'), str(out), 'later') != str(archive)
    assert (users / pr.MOVING).read_bytes() == record and os.listdir(users) == [pr.MOVING]
    assert os.path.islink(archive / pr.MOVING) and os.path.islink(out / 'previous_runs' / 'zzz_link')


KILL_MID_MOVE = r'''
import os, shutil, signal, sys
sys.path.insert(0, sys.argv[1])
from model.state import previous_runs as pr
out, at = sys.argv[2], sys.argv[3]
states, model_file = (sys.argv[4], sys.argv[5]) if len(sys.argv) > 5 else ('states', 'm.{}.bin')
which = sys.argv[6] if len(sys.argv) > 6 else 'state-'  # the item the kill lands in
real_rename, real_copy, real_rmtree = os.rename, shutil.copyfile, shutil.rmtree
across = lambda src, dst: (os.sep + 'previous_runs' + os.sep in dst) != (os.sep + 'previous_runs' + os.sep in src)
kill = lambda: os.kill(os.getpid(), signal.SIGKILL)

def rename(src, dst, *a, **kw):  # previous_runs on another filesystem: no rename into it
    src, dst = os.fspath(src), os.fspath(dst)
    if across(src, dst):
        raise OSError(18, 'Invalid cross-device link')
    real_rename(src, dst, *a, **kw)
    if which in src and (at == 'renamed' and pr.REMOVING in dst or at == 'placed' and pr.PART in src):
        kill()
    if at == 'putback' and pr.REMOVING in src:  # an item renamed aside taken back to its name, the record still there
        kill()

def copyfile(src, dst, **kw):  # the kill lands halfway through the state's weights
    if at == 'copy' and os.path.basename(src) == 'model.safetensors' and which in os.fspath(src):
        with open(dst, 'w') as f:
            f.write('half')
        kill()
    return real_copy(src, dst, **kw)

def rmtree(path, *a, **kw):  # the kill lands halfway through a removal
    name = os.path.basename(os.fspath(path))
    if at == 'removing' and name.startswith(pr.REMOVING) or at == 'takeback' and name.startswith(pr.PART):
        for root, _, files in os.walk(path):
            if files:
                os.remove(os.path.join(root, sorted(files)[-1]))
                kill()
    return real_rmtree(path, *a, **kw)

os.rename, shutil.copyfile, shutil.rmtree = rename, copyfile, rmtree
pr.archive_previous_run(os.path.join(out, states), os.path.join(out, model_file), out, 'stamp')
'''


def kill_mid_move(out, at: str, *layout: str) -> None:
    """The child above: the move of what out holds, killed at ``at``; layout: (state folder, model
    file pattern) relative to out, and the name of the state the kill lands in."""
    import signal
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, '-c', KILL_MID_MOVE, root, str(out), at, *layout], capture_output=True,
                          text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr


def killed_mid_move(out, at: str = 'copy'):
    """A run's state, best model and step file, whose move into previous_runs/stamp (another
    filesystem) was killed (SIGKILL) with the state at ``at``: halfway through its copy ('copy'),
    its whole copy just renamed into place ('placed'), then itself renamed beside itself ('renamed'),
    halfway through its removal ('removing'), or halfway through the next run taking back its half
    copy ('takeback'). -> the archive folder."""
    run_state(out / 'states', 20, 'r1', output_dir=out)
    a_model_folder_and_a_step_file(out)
    for point in (['copy', 'takeback'] if at == 'takeback' else [at]):
        kill_mid_move(out, point)
    archive = out / 'previous_runs' / 'stamp'
    assert os.path.isfile(archive / pr.COPYING) and os.path.isfile(archive / pr.MOVING)
    return archive


def killed_mid_copy(out):
    archive = killed_mid_move(out, 'copy')
    assert glob.glob(f'{archive}/{pr.PART}*/state-000000020')
    return archive


def files_in(folder) -> dict:
    return {os.path.join(root, n): open(os.path.join(root, n), 'rb').read()
            for root, _, files in os.walk(folder) for n in files}


def hidden_of_the_toolkit(folder) -> list[str]:
    return [os.path.join(root, n) for root, dirs, files in os.walk(folder) for n in dirs + files
            if n.startswith('.chat_small_t5.')]


@pytest.mark.parametrize('at,then', [('copy', 'elsewhere'), ('copy', 'same disk'), ('takeback', 'elsewhere'),
                                     ('renamed', 'elsewhere'), ('placed', 'same disk'), ('removing', 'elsewhere')])
def test_a_move_killed_at_any_point_of_a_copy_is_finished_by_the_next_run_each_item_whole_once(tmp_path, monkeypatch,
                                                                                                 at, then):
    """previous_runs/ on another filesystem, a SIGKILL (preemption) at any point of moving the
    state there -- halfway through its copy, or its removal, between the steps, or halfway through
    the next run taking back a half copy: the next fresh run finishes the move, each item once, whole,
    under its own name (a half copy had taken the name, the whole one then got a `-1`, and the resume
    flags printed were refused: 'not written by this toolkit'; a kill during the removal left half a
    state where it was), and nothing of the move is left behind."""
    from model.state.checkpoint import moved_run_advice

    out = tmp_path / 'out'
    archive = killed_mid_move(out, at)
    assert names(out / 'states') == (['state-000000020'] if at in ('copy', 'takeback', 'placed') else [])
    if then == 'elsewhere':  # the requeued job, on the same node
        previous_runs_elsewhere(monkeypatch)
    moved = pr.archive_previous_run(str(out / 'states'), str(out / 'm.{}.bin'), str(out), 'stamp2')
    monkeypatch.undo()
    assert moved == str(archive) and os.listdir(out / 'previous_runs') == ['stamp']
    assert sorted(os.listdir(archive)) == ['best', 'm.20.bin', 'states'], os.listdir(archive)
    assert names(archive / 'states') == ['state-000000020'] and names(out / 'states') == []
    assert sf.judge_state(str(archive / 'states' / 'state-000000020')).wholly_owned
    assert hidden_of_the_toolkit(out) == []
    advice, flags = moved_run_advice(str(archive), str(out), str(out / 'm.{}.bin'))
    assert flags and f'--train_state_dir={archive / "states"}' in flags, advice
    report = contract.inspect(str(archive / 'states'), resume=True, deep=False)
    assert not report.problems, report.problems


def test_a_move_killed_in_its_last_item_is_finished_by_the_next_run_with_nothing_left_to_move(tmp_path):
    """The state was the only item, killed once renamed beside itself: the next run has nothing to
    move, and still puts the copy in place and removes what is left of the item."""
    out = tmp_path / 'out'
    archive = killed_mid_move(out, 'renamed')
    for item in ('best', 'm.20.bin'):
        shutil.move(str(out / item), str(archive / item))  # as if they had moved before
    assert pr.archive_previous_run(str(out / 'states'), str(out / 'm.{}.bin'), str(out), 'stamp2') is None
    assert names(archive / 'states') == ['state-000000020'] and hidden_of_the_toolkit(out) == []
    assert sf.judge_state(str(archive / 'states' / 'state-000000020')).wholly_owned


def test_a_half_copy_is_taken_back_only_as_its_record_names_it_never_a_users_file_or_a_link(tmp_path):
    """What is taken back of a killed copy is the very folder the toolkit's record names (by the
    copy's random token), a real one: a user's folder of a name like it stays, a link put at its name
    or a user's file at the record's name stops the move in one line and stays as it is. A `cp -al`
    snapshot of the cut archive (its records then have two names) keeps the move in that archive, and
    the snapshot stays whole."""
    import json
    import subprocess

    def items(out):
        return str(out / 'states'), str(out / 'm.{}.bin'), str(out)

    for case in ('beside', 'link', 'record'):
        out = tmp_path / case
        archive = killed_mid_copy(out)
        mine = tmp_path / f'mine_{case}'
        os.makedirs(mine)
        (mine / 'notes.txt').write_text('mine')
        (part,) = glob.glob(f'{archive}/{pr.PART}*')
        if case == 'beside':  # the user's own folder, named like a copy's, and a snapshot of the cut archive
            snapshot = out / 'previous_runs' / 'snapshot'
            subprocess.run(['cp', '-al', str(archive), str(snapshot)], check=True)  # rsnapshot's way: hard links
            before = files_in(snapshot)
            shutil.copytree(mine, archive / (pr.PART + 'mine'))
            pr.archive_previous_run(*items(out), 'stamp2')
            assert sorted(os.listdir(archive)) == [pr.PART + 'mine', 'best', 'm.20.bin', 'states']
            assert (archive / (pr.PART + 'mine') / 'notes.txt').read_text() == 'mine'
            assert sf.judge_state(str(archive / 'states' / 'state-000000020')).wholly_owned
            assert files_in(snapshot) == before and len(before) >= 10  # the records and the half copy too
            continue
        if case == 'record':
            os.remove(archive / pr.COPYING)
            (archive / pr.COPYING).write_text('my own notes\n')
        else:
            assert json.loads((archive / pr.COPYING).read_text())['token'] in part
            shutil.rmtree(part)
            os.symlink(mine, part)
        with pytest.raises(UserError, match='was not (left there|written) by this toolkit: move it away'):
            pr.archive_previous_run(*items(out), 'stamp2')
        assert (mine / 'notes.txt').read_text() == 'mine' and os.listdir(mine) == ['notes.txt']
        if case == 'record':
            assert (archive / pr.COPYING).read_text() == 'my own notes\n' and os.path.isdir(part)
        else:
            assert os.path.islink(part)
        assert names(out / 'states') == ['state-000000020']  # nothing moved meanwhile


def test_a_full_disk_at_the_archives_own_markers_is_one_line_and_leaves_nothing_half_made(tmp_path, monkeypatch):
    """previous_runs/ full (or out of inodes) when the archive's state folder is marked, or its
    record of the move written: one line, nothing moved, no folder without its marker left in the
    archive (the next run put the states in it and the resume it printed was refused: 'a folder this
    toolkit did not make')."""
    import errno

    from model.state.checkpoint import moved_run_advice

    real_fsync = os.fsync
    for at in (os.path.join('stamp', 'states', markers.MARKER_FILE), os.path.join('stamp', pr.MOVING)):
        out = tmp_path / at.replace(os.sep, '_')
        run_state(out / 'states', 20, 'r1', output_dir=out)
        a_model_folder_and_a_step_file(out)

        def full(fd, at=at):
            if os.readlink(f'/proc/self/fd/{fd}').endswith(at):
                raise OSError(errno.ENOSPC, 'No space left on device')
            return real_fsync(fd)

        previous_runs_elsewhere(monkeypatch)
        monkeypatch.setattr(os, 'fsync', full)
        with pytest.raises(UserError, match=r'\(no space left on the device\): nothing moved') as e:
            pr.archive_previous_run(str(out / 'states'), str(out / 'm.{}.bin'), str(out), 'stamp')
        assert '\n' not in str(e.value)
        monkeypatch.undo()
        assert not os.path.exists(out / 'previous_runs') and names(out / 'states') == ['state-000000020']
        archive = pr.archive_previous_run(str(out / 'states'), str(out / 'm.{}.bin'), str(out), 'stamp')
        assert moved_run_advice(archive, str(out), str(out / 'm.{}.bin'))[1]
        assert not contract.inspect(os.path.join(archive, 'states'), resume=True, deep=False).problems


def test_an_item_whose_name_is_taken_in_the_archive_is_copied_whole_beside_it_across_filesystems(tmp_path,
                                                                                                 monkeypatch):
    """Two items of one name (a model_file pattern whose best file is named best), previous_runs/ on
    another filesystem: both copied whole, the second under a suffix, judged whole under its own name."""
    import torch

    from model.state.model_files import save_weights_file

    out, other = tmp_path / 'out', tmp_path / 'other'
    a_model_folder_and_a_step_file(out)
    os.makedirs(other)
    save_weights_file({'w': torch.ones(2)}, str(other / 'best'), step=20)
    previous_runs_elsewhere(monkeypatch)
    archive = pr.archive_previous_run(str(out / 'states'), str(other / '{}'), str(out), 'stamp')
    monkeypatch.undo()
    assert sorted(os.listdir(archive)) == ['best', 'best-1'] and not os.listdir(other)
    assert {own.kind_of(os.path.join(archive, n)) for n in ('best', 'best-1')} == {markers.MODEL, markers.WEIGHTS}
    assert hidden_of_the_toolkit(tmp_path) == []


def test_a_cut_copy_is_ended_without_loss_whatever_came_since(tmp_path):
    """What the next run meets after a kill mid-move: a folder of the user's made at the item's name
    in the archive (the copy goes beside it, named as a second save of its step, nothing of the
    user's removed -- nor the item, taken for moved because something bore its copy's name); a record or an archive folder's record left empty by a kill while written
    (ended, never 'not written by this toolkit'; an archive folder holding only an empty one carries no
    marker: left); the half copy's folder removed by hand (the item was lost); the item edited after its
    copy took its name (kept as edited); a link or a folder of the user's at the name the item
    takes beside itself (refused, untouched: a folder there was removed); an empty copy folder left by a
    kill before its record (removed; a folder of the user's named like one stays)."""
    def again(out):
        return pr.archive_previous_run(str(out / 'states'), str(out / 'm.{}.bin'), str(out), 'stamp2')

    for case in ('half copy', 'empty copy folder'):  # the kill halfway through the copy, or just before it began
        out = tmp_path / case.replace(' ', '_')
        archive = killed_mid_move(out, 'copy')
        if case == 'empty copy folder':
            (part,) = glob.glob(f'{archive}/{pr.PART}*')
            shutil.rmtree(os.path.join(part, 'state-000000020'))
        os.makedirs(archive / 'states' / 'state-000000020')  # yours, at the name the copy was to take
        (archive / 'states' / 'state-000000020' / 'note').write_text('mine')
        assert again(out) == str(archive)
        assert os.listdir(archive / 'states' / 'state-000000020') == ['note']
        assert sf.judge_state(str(archive / 'states' / 'state-000000020.1')).wholly_owned  # a second save's name
        assert hidden_of_the_toolkit(out) == [] and names(out / 'states') == []

    out = tmp_path / 'empty_record'
    archive = killed_mid_move(out, 'copy')
    pr._take_back_part(str(archive))  # as a run would, then a kill while the next copy's record is written
    open(archive / pr.COPYING, 'w').close()
    os.makedirs(out / 'previous_runs' / 'other')
    open(out / 'previous_runs' / 'other' / pr.MOVING, 'w').close()  # a kill while an archive's record is written
    assert again(out) == str(archive)
    # the folder with the empty record carries no marker of the toolkit's: never continued, never removed
    assert sorted(os.listdir(out / 'previous_runs')) == ['other', 'stamp']
    assert hidden_of_the_toolkit(out) == [str(out / 'previous_runs' / 'other' / pr.MOVING)]
    assert sf.judge_state(str(archive / 'states' / 'state-000000020')).wholly_owned

    out = tmp_path / 'part_removed'  # the half copy's folder removed by hand (to free space), its record left
    archive = killed_mid_move(out, 'copy')
    for part in glob.glob(f'{archive}/{pr.PART}*'):
        shutil.rmtree(part)
    assert again(out) == str(archive)  # the item was taken for copied and removed: lost, both of it and its copy
    assert names(archive / 'states') == ['state-000000020'] and names(out / 'states') == []
    assert sf.judge_state(str(archive / 'states' / 'state-000000020')).wholly_owned

    for at in ('renamed', 'removing'):  # the item renamed beside itself, then its copy removed by hand from the archive
        out = tmp_path / f'copy_removed_{at}'
        archive = killed_mid_move(out, at)
        before = files_in(out / 'states')
        shutil.rmtree(archive / 'states' / 'state-000000020')
        if at == 'renamed':  # whole: back at its name, then moved again, whole (it was removed: no copy anywhere)
            assert again(out) == str(archive)
            assert names(out / 'states') == [] and sf.judge_state(str(archive / 'states' / 'state-000000020')).wholly_owned
            assert hidden_of_the_toolkit(out) == []
        else:  # half removed (its copy was in place then): back at its name, not whole -- kept, never moved or removed
            with pytest.raises(UserError):
                again(out)
            assert names(out / 'states') == ['state-000000020'] and not os.path.lexists(archive / 'states' / 'state-000000020')
            kept = files_in(out / 'states')
            assert kept and all(before[os.path.join(os.path.dirname(p), os.path.basename(p))] == data
                                for p, data in kept.items() if p in before)
    # a kill while putting it back (the item at its name again, its change time changed, the records still there):
    # the next run finishes the move in the same archive, never a second one (the run split over two)
    out = tmp_path / 'putback_killed'
    archive = killed_mid_move(out, 'renamed')
    shutil.rmtree(archive / 'states' / 'state-000000020')
    kill_mid_move(out, 'putback')
    assert names(out / 'states') == ['state-000000020'] and os.path.isfile(archive / pr.COPYING)
    assert again(out) == str(archive) and os.listdir(out / 'previous_runs') == ['stamp']
    assert sf.judge_state(str(archive / 'states' / 'state-000000020')).wholly_owned and names(out / 'states') == []
    assert hidden_of_the_toolkit(out) == []

    # its copy in the archive replaced by a whole state of another run (of the same name): not its copy -- the item
    # back at its name and moved whole beside it (it was removed: the archive held only the other run's state)
    out = tmp_path / 'copy_replaced'
    archive = killed_mid_move(out, 'renamed')
    shutil.rmtree(archive / 'states' / 'state-000000020')
    run_state(tmp_path / 'other' / 'states', 20, 'r2', output_dir=tmp_path / 'other')
    shutil.copytree(tmp_path / 'other' / 'states' / 'state-000000020', archive / 'states' / 'state-000000020')
    assert again(out) == str(archive)
    assert files_in(archive / 'states' / 'state-000000020') == {
        p.replace(str(tmp_path / 'other' / 'states'), str(archive / 'states')): d
        for p, d in files_in(tmp_path / 'other' / 'states' / 'state-000000020').items()}  # the other's, untouched
    assert sf.judge_state(str(archive / 'states' / 'state-000000020.1')).wholly_owned and names(out / 'states') == []
    assert hidden_of_the_toolkit(out) == []

    # the item's name taken since as well: refused, both kept
    out = tmp_path / 'copy_removed_name_taken'
    archive = killed_mid_move(out, 'renamed')
    shutil.rmtree(archive / 'states' / 'state-000000020')
    os.makedirs(out / 'states' / 'state-000000020')
    with pytest.raises(UserError, match='its copy there gone since.*is taken: move that away'):
        again(out)
    assert len([p for p in hidden_of_the_toolkit(out) if pr.REMOVING in p]) == 1

    out = tmp_path / 'rewritten'  # another whole state copied over the item in place (cp -r: the folder's change
    archive = killed_mid_move(out, 'placed')  # time stays): not what was copied -- kept, never removed
    other = run_state(tmp_path / 'other_rewrite', 20, 'r2', output_dir=out)
    import subprocess
    subprocess.run(['cp', '-r', other, str(out / 'states') + '/'], check=True)
    theirs = own.read_marker(str(out / 'states' / 'state-000000020'))
    assert again(out) == str(archive)
    assert [p for p in glob.glob(f'{out}/**/state-*', recursive=True) if own.read_marker(p) == theirs]

    out = tmp_path / 'edited'  # the item edited after its copy took its name: it is no longer what was copied
    archive = killed_mid_move(out, 'placed')
    with open(out / 'states' / 'state-000000020' / 'counters.json', 'a') as f:
        f.write(' ')
    assert again(out) == str(archive)
    assert open(out / 'states' / 'state-000000020' / 'counters.json').read().endswith(' ')  # kept, as edited
    assert sf.judge_state(str(archive / 'states' / 'state-000000020')).wholly_owned  # its copy, whole

    mine = tmp_path / 'mine'
    os.makedirs(mine)
    (mine / 'notes.txt').write_text('mine')
    for case, at in (('link', 'copy'), ('folder', 'placed')):  # yours at the name the item takes beside itself
        out = tmp_path / case
        archive = killed_mid_move(out, at)
        hidden = out / 'states' / (pr.REMOVING + json.loads((archive / pr.COPYING).read_text())['token'])
        if case == 'link':
            os.symlink(mine, hidden)
        else:
            shutil.copytree(mine, hidden)
        with pytest.raises(UserError, match='in the way of the move .* move it away'):
            again(out)
        assert os.listdir(mine) == ['notes.txt'] and os.listdir(hidden) == ['notes.txt']
        assert names(out / 'states') == ['state-000000020']  # the item where it was, whole
        if case == 'link':  # the half copy never took a name
            assert not os.path.lexists(archive / 'states' / 'state-000000020')

    out = tmp_path / 'orphan'  # a kill between a copy's folder and its record: an empty folder, no record
    archive = killed_mid_move(out, 'copy')
    pr._take_back_part(str(archive))
    os.mkdir(archive / (pr.PART + '0' * 32))
    os.mkdir(archive / (pr.PART + 'mine'))  # yours, named like one: stays
    assert again(out) == str(archive)
    assert hidden_of_the_toolkit(out) == [str(archive / (pr.PART + 'mine'))]


@pytest.mark.parametrize('at', ['copy', 'placed', 'renamed', 'removing'])
def test_a_resume_where_a_fresh_runs_move_was_cut_ends_the_copy_and_keeps_the_item_whole(tmp_path, at):
    """A fresh run killed in the middle of a move, then the earlier run resumed instead: the copy in
    progress is ended -- a copy not yet in place goes, the item stays where it is (a copy already in
    place stays in the archive, beside the item that stays: the earlier run goes on with it); an item
    already leaving is removed, its whole copy in the archive -- and the move's record goes (an archive
    folder into which nothing had moved goes too): nothing hidden is left."""
    out = tmp_path / 'out'
    archive = killed_mid_move(out, at)
    pr.end_cut_copies(str(out))
    if at == 'copy':
        assert os.listdir(out / 'previous_runs') == []
    else:
        assert sorted(os.listdir(archive)) == ['states'] and names(archive / 'states') == ['state-000000020']
        assert sf.judge_state(str(archive / 'states' / 'state-000000020')).wholly_owned
    assert names(out / 'states') == ([] if at in ('renamed', 'removing') else ['state-000000020'])
    if names(out / 'states'):
        assert sf.judge_state(str(out / 'states' / 'state-000000020')).wholly_owned
    assert hidden_of_the_toolkit(out) == []


def test_ending_a_cut_move_removes_only_the_archives_own_marker_only_folders(tmp_path):
    """A resume ends a cut move (nothing moved yet): the archive folder goes only while each folder in
    it is a real state folder holding its marker alone -- a link there to a folder of the user's
    holding only a copy of such a marker, or a user's folder holding more, keeps all of it."""
    mine = tmp_path / 'mine'
    os.makedirs(mine)
    for case in ('link', 'more'):
        out = tmp_path / case
        archive = killed_mid_move(out, 'copy')
        pr._take_back_part(str(archive))  # the half copy gone: only the state folder's marker is in the archive
        if case == 'link':
            shutil.copy(archive / 'states' / markers.MARKER_FILE, mine / markers.MARKER_FILE)
            os.symlink(mine, archive / 'linked')
        else:
            (archive / 'states' / 'notes.txt').write_text('mine')
        pr.end_cut_copies(str(out))
        assert os.listdir(mine) == [markers.MARKER_FILE] and os.path.isdir(archive / 'states')
        if case == 'more':
            assert (archive / 'states' / 'notes.txt').read_text() == 'mine'
        assert names(out / 'states') == ['state-000000020']  # the item whole where it was
        assert sf.judge_state(str(out / 'states' / 'state-000000020')).wholly_owned
    assert pr._holds_only_its_marker(str(tmp_path / 'link' / 'previous_runs' / 'stamp' / 'states'))
    assert not pr._holds_only_its_marker(str(tmp_path / 'link' / 'previous_runs' / 'stamp' / 'linked'))


def test_a_resumed_run_ends_the_copy_a_cut_fresh_runs_move_left(data, tmp_path):
    """End to end: a run saves two states; a fresh run over it is killed (SIGKILL) while moving them
    to previous_runs/ on another filesystem, the first copied whole into place and leaving its
    name; the earlier run is resumed instead: it trains on, and nothing of the move is left hidden
    (the first state stayed hidden beside the others for good, and the next fresh run archived the
    rest into a second folder); the archive keeps the whole copy of the first state."""
    from conftest import run_train, tiny_flags

    out = tmp_path / 'out'
    flags = tiny_flags(data, out, max_steps=10, save_steps=5)
    assert run_train(flags).returncode == 0
    assert names(out / 'state') == ['state-000000005', 'state-000000010']
    kill_mid_move(out, 'renamed', 'state', 'chat_small_t5.{}.bin')
    assert names(out / 'state') == ['state-000000010']  # the other is hidden beside it
    r = run_train(tiny_flags(data, out, max_steps=12, save_steps=5), '--is_keep_training=True')
    assert r.returncode == 0, r.stderr[-3000:]
    assert names(out / 'state') == ['state-000000010', 'state-000000012']
    assert [p for p in hidden_of_the_toolkit(out) if not p.endswith(markers.LOCK_FILE)] == []
    (archive,) = glob.glob(f'{out}/previous_runs/*')
    assert sf.judge_state(os.path.join(archive, 'state', 'state-000000005')).wholly_owned

    # the kill in the newest state, after its copy took its name in the archive: a resume finds no state here
    # and says how to finish the move (it said only "start without --is_keep_training")
    out = tmp_path / 'newest'
    assert run_train(tiny_flags(data, out, max_steps=10, save_steps=5)).returncode == 0
    kill_mid_move(out, 'renamed', 'state', 'chat_small_t5.{}.bin', 'state-000000010')
    (archive,) = glob.glob(f'{out}/previous_runs/*')
    r = run_train(tiny_flags(data, out, max_steps=12, save_steps=5), '--is_keep_training=True')
    assert r.returncode == 2 and f'was moving the earlier run into {archive} and was cut short' in r.stderr, r.stderr
    from conftest import ENV
    from test_trainer import finished, start_script  # a requeue of the batch job (RESUME=auto, no terminal)
    env = cli_runner.script_env({**ENV, 'PATH': '/usr/bin:/bin', 'NUM_GPUS': '0', 'RESUME': 'auto'})
    r = finished(start_script(tiny_flags(data, out, max_steps=12, save_steps=5), env))
    assert r.returncode == 1 and f'moving that run into {archive}/ and was cut short, its states already there: ' \
        'RESUME=no finishes that move' in r.stderr, r.stderr[-3000:]
    # what the script reads it from: the dry run's machine-readable lines, not its notes' wording
    dry = run_train(tiny_flags(data, out, max_steps=12, save_steps=5), '--dry_run=True').stdout.splitlines()
    items = [int(x.split('=')[1].split()[0]) for x in dry if x.startswith('  run.previous_items=')]
    assert f'  path.states_moved_to={archive}' in dry and items and items[0] > 0, dry
    r = run_train(tiny_flags(data, out, max_steps=1, save_steps=5))  # as they say: the move finished there
    assert r.returncode == 0, r.stderr[-3000:]
    assert glob.glob(f'{out}/previous_runs/*') == [archive] and names(os.path.join(archive, 'state')) == [
        'state-000000005', 'state-000000010'] and os.path.isdir(os.path.join(archive, 'best'))
    assert [p for p in hidden_of_the_toolkit(out) if not p.endswith(markers.LOCK_FILE)] == []

    # the kill in the first state's copy (none whole in the archive yet), then the states out of reach (node-local
    # scratch this node lacks): no "its states already there" -- RESUME=no would start over with nothing archived
    for cut_in in ('state-000000005', 'state-000000010'):  # the first state's copy, or the second's (the first there)
        out = tmp_path / f'out_of_reach_{cut_in}'
        assert run_train(tiny_flags(data, out, max_steps=10, save_steps=5)).returncode == 0
        kill_mid_move(out, 'copy', 'state', 'chat_small_t5.{}.bin', cut_in)
        shutil.move(str(out / 'state'), str(tmp_path / f'scratch_elsewhere_{cut_in}'))
        dry = run_train(tiny_flags(data, out, max_steps=12, save_steps=5), '--dry_run=True').stdout.splitlines()
        assert '  path.states_moved_to=none' in dry, dry
        r = finished(start_script(tiny_flags(data, out, max_steps=12, save_steps=5), env))
        assert r.returncode == 1 and 'make them reachable' in r.stderr and 'already there' not in r.stderr, \
            r.stderr[-3000:]


def test_a_free_name_in_the_archive_keeps_a_state_a_state(tmp_path):
    """A name taken in the archive: a state gets the next free second-save name of its step (one
    already suffixed too: state-000000020.1 -> .2, never .1.1, which is no state name); anything else
    -1, -2."""
    for name in ('state-000000020', 'state-000000020.1', 'state-000000020.2', 'best', 'best-1'):
        os.makedirs(tmp_path / name)
    assert pr._free_name(str(tmp_path / 'state-000000020')) == str(tmp_path / 'state-000000020.3')
    assert pr._free_name(str(tmp_path / 'state-000000020.1')) == str(tmp_path / 'state-000000020.3')
    assert pr._free_name(str(tmp_path / 'state-000000030')) == str(tmp_path / 'state-000000030')
    assert pr._free_name(str(tmp_path / 'best')) == str(tmp_path / 'best-2')


def test_a_cut_move_counts_its_states_all_moved_only_when_none_is_left_where_it_was(tmp_path):
    """Two state folders with a state of one name (output_dir's and train_state_dir's): the move cut in
    the second one's copy has not moved them all, though a state of that name is in the archive."""
    out = tmp_path / 'out'
    run_state(out, 20, 'r1', output_dir=out)
    run_state(out / 'states', 20, 'r1', output_dir=out)
    a_model_folder_and_a_step_file(out)
    kill_mid_move(out, 'copy', 'states', 'm.{}.bin', os.sep + 'out' + os.sep + 'state-')
    archive = out / 'previous_runs' / 'stamp'
    assert not pr.states_all_moved(str(archive), str(out))
    os.rename(out / 'state-000000020', tmp_path / 'out_of_reach')  # gone from here, yet not in the archive either
    assert not pr.states_all_moved(str(archive), str(out))


def test_a_step_saved_again_replaces_its_own_earlier_save_and_keeps_the_older_state(tmp_path, caplog):
    """A stop that cuts the last step's evaluation saves that step again (its evaluation pending),
    and so does the resume once it has done it: each save of the step went beside the last as
    state-<step>.<n> with a warning that the run's own state was something it 'may not replace',
    and the pruning kept the copies of that step and removed the older state, the one to fall back
    to. Now a later save of a step replaces the run's own earlier saves of it; another run's state
    or a user's folder of that name is still stepped around, never replaced."""
    import logging

    from model.state.model_files import RUN_ID

    states = tmp_path / 'states'

    def files(run):
        return {'model.safetensors': 'weights', **JSON_FILES, sf.RUN_JSON: json.dumps({RUN_ID: run}),
                'tokenizer/tokenizer.json': 'tok'}

    def save(step, run='run-a'):
        tmp = sf.tmp_path(str(states), step)
        sf.begin_save(str(states), tmp)
        os.makedirs(os.path.join(tmp, 'tokenizer'))
        for rel, text in files(run).items():
            with open(os.path.join(tmp, rel), 'w') as f:
                f.write(text)
        return sf.complete_save(str(states), tmp, step, keep=2)

    save(5)
    save(10)
    with caplog.at_level(logging.INFO):
        again = save(10)  # the stop: step 10 with its evaluation pending
        assert names(states) == ['state-000000005', 'state-000000010.1'], names(states)
        resumed = save(10)  # the resume did the evaluation: step 10 once more
    assert names(states) == ['state-000000005', 'state-000000010.2'], names(states)
    assert sf.latest_state(str(states)) == resumed and not os.path.exists(again)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    # not the run's own: another run's state of that step, a user's folder of that name -- kept, said
    caplog.clear()
    make_state(states, 20, files=files('run-b'))
    user = states / 'state-000000030'
    user.mkdir()
    (user / 'notes.txt').write_text('mine')
    with caplog.at_level(logging.WARNING):
        save(20)
        save(30)
    assert (user / 'notes.txt').read_text() == 'mine' and (states / 'state-000000020').is_dir()
    assert sum('may not replace' in r.getMessage() for r in caplog.records) == 2, caplog.text
    assert sf.latest_state(str(states)).endswith('state-000000030.1')
    # a link named like the run's own earlier save of a step, to a copy of it elsewhere: never pruned through
    # (neither the link nor what it points at), the new save goes beside it
    elsewhere = tmp_path / 'elsewhere'
    elsewhere.mkdir()
    save(40)
    os.rename(states / 'state-000000040', elsewhere / 'state-000000040')
    os.symlink(elsewhere / 'state-000000040', states / 'state-000000040')
    save(40)
    assert os.path.islink(states / 'state-000000040') and (elsewhere / 'state-000000040' / 'model.safetensors').exists()
    assert sf.latest_state(str(states)).endswith('state-000000040.1')


def test_states_copied_by_hand_into_a_new_folder_are_resumed_there_and_one_state_given_names_its_folder(tmp_path):
    path = make_state(tmp_path / 'run' / 'states', 10)
    newer = make_state(tmp_path / 'run' / 'states', 20)
    copy = tmp_path / 'scratch' / 'states'  # made by hand, without the folder's marker
    copy.mkdir(parents=True)
    shutil.copytree(path, copy / os.path.basename(path))
    shutil.copytree(newer, copy / os.path.basename(newer))
    (copy / 'logs').mkdir()  # an empty folder of the user's beside them
    own.check_replaceable(str(copy), markers.STATE_DIR, 'train_state_dir', folder=True)  # adopted: no error
    sf.ensure_state_dir(str(copy))
    assert own.folder_kind(str(copy)) == markers.STATE_DIR
    assert contract.inspect(str(copy), resume=True).resume.path == str(copy / os.path.basename(newer))
    # one state given as the folder of states: the message names the folder that holds it
    with pytest.raises(UserError, match=f'is one saved state, not a folder of states; give the folder that holds '
                                        f'it: --train_state_dir={copy}$'):
        own.check_replaceable(str(copy / os.path.basename(newer)), markers.STATE_DIR, 'train_state_dir', folder=True)
    # beside a file of the user's, or a folder of the user's holding one, or a state's copy under another name
    # (a save in progress's, which a run sweeps whole): not adopted (a run would mark the folder its own)
    for i, extra in enumerate(('notes.txt', 'mine/notes.txt', '.tmp-state-000000030')):
        other = tmp_path / f'other_{i}'
        shutil.copytree(path, other / os.path.basename(path))
        if extra.startswith('.tmp-'):
            shutil.copytree(path, other / extra)
        else:
            os.makedirs(os.path.dirname(other / extra), exist_ok=True)
            (other / extra).write_text('mine')
        with pytest.raises(UserError, match='is a folder this toolkit did not make and is not empty'):
            own.check_replaceable(str(other), markers.STATE_DIR, 'train_state_dir', folder=True)


def test_a_link_among_states_copied_by_hand_is_refused_in_one_line_naming_it_and_the_copy_to_make(tmp_path):
    """`ln -s OLD/state-N NEW/` beside (or instead of) copies: the link was passed over without a word and the
    folder called one "this toolkit did not make". A state is only ever a real folder of its train_state_dir (in
    the run's own folder a link named as one is never listed, loaded or pruned through), so the link is refused,
    named, with the copy that takes its place; nothing is written or marked."""
    good = make_state(tmp_path / 'old' / 'states', 10)
    newer = make_state(tmp_path / 'old' / 'states', 20)
    new = tmp_path / 'scratch' / 's'
    new.mkdir(parents=True)
    shutil.copytree(good, new / os.path.basename(good))
    link = new / os.path.basename(newer)
    os.symlink(newer, link)  # the natural thing on scratch storage
    with pytest.raises(UserError) as e:
        own.check_replaceable(str(new), markers.STATE_DIR, 'train_state_dir', folder=True)
    assert str(e.value) == (f'train_state_dir: {link} is a symbolic link to {newer}; a state is read only from a folder '
                            f'of its own in train_state_dir, never through a link; copy the state in its place: '
                            f'rm {link} && cp -r {newer} {link}'), str(e.value)
    assert sorted(os.listdir(new)) == ['state-000000010', 'state-000000020']  # nothing marked, nothing moved
    report = contract.inspect(str(new), resume=True)  # the dry run's resume: refused (above), not also "passed over"
    assert not [n for n in report.notes + report.problems if 'symbolic link' in n], report
    renamed = new / 'state-000000090'  # a link under another name: the copy goes under the state's own (its step)
    os.rename(link, renamed)
    with pytest.raises(UserError) as e:
        own.check_replaceable(str(new), markers.STATE_DIR, 'train_state_dir', folder=True)
    assert str(e.value).endswith(f'rm {renamed} && cp -r {newer} {new}/state-000000020 (under its own name: a state '
                                 f'is named by its step, state-000000020)'), str(e.value)
    os.rename(renamed, link)
    os.remove(link)  # as told: the copy is adopted and the newest state resumed
    shutil.copytree(newer, link)
    os.symlink(new / 'state-000000010', new / 'state-000000091')  # to a state of this folder: the link goes, no copy
    with pytest.raises(UserError) as e:
        own.check_replaceable(str(new), markers.STATE_DIR, 'train_state_dir', folder=True)
    assert str(e.value).endswith(f'remove the link (rm {new}/state-000000091): the state it leads to is in this folder '
                                 f'already'), str(e.value)
    os.remove(new / 'state-000000091')
    os.symlink(tmp_path / 'old' / 'states' / 'state-000000010', new / 'state-000000092')  # a state of that step is here:
    with pytest.raises(UserError) as e:  # `cp -r` would copy it inside that one
        own.check_replaceable(str(new), markers.STATE_DIR, 'train_state_dir', folder=True)
    assert str(e.value).endswith(f'remove the link (rm {new}/state-000000092): this folder holds {new}/state-000000010 '
                                 f'already, a state of the same step; to resume from the linked one instead, move that '
                                 f'one away first, then cp -r {good} {new}/state-000000010'), str(e.value)
    os.remove(new / 'state-000000092')
    # several links: the newest said whole, the others named (the user met them one run at a time)
    os.symlink(newer, new / 'state-000000093')
    os.symlink(newer, new / 'state-000000094')
    with pytest.raises(UserError) as e:
        own.check_replaceable(str(new), markers.STATE_DIR, 'train_state_dir', folder=True)
    assert str(e.value).startswith(f'train_state_dir: {new}/state-000000094 is a symbolic link') and str(e.value).endswith(
        '; and 1 more such link (state-000000093), each to be replaced by its state\'s copy or removed the same way'), \
        str(e.value)
    os.remove(new / 'state-000000094')
    os.symlink(newer, new / 'state-100')  # the newest by step, not by name as text (state-100 < state-000000093)
    with pytest.raises(UserError) as e:
        own.check_replaceable(str(new), markers.STATE_DIR, 'train_state_dir', folder=True)
    assert str(e.value).startswith(f'train_state_dir: {new}/state-100 is a symbolic link'), str(e.value)
    os.remove(new / 'state-100')
    # a link to a state kept under another name: the copy takes the step its marker records, not that name
    kept = tmp_path / 'kept' / 'my_state'
    shutil.copytree(newer, kept)
    os.rename(new / 'state-000000020', tmp_path / 'set_aside')
    os.remove(new / 'state-000000093')
    os.symlink(kept, new / 'state-000000095')
    with pytest.raises(UserError) as e:
        own.check_replaceable(str(new), markers.STATE_DIR, 'train_state_dir', folder=True)
    assert str(e.value).endswith(f'rm {new}/state-000000095 && cp -r {kept} {new}/state-000000020 (under its own name: '
                                 f'a state is named by its step, state-000000020)'), str(e.value)
    os.symlink(newer, new / 'state-000000020')  # that name a link too: both go (it said the state was there already)
    with pytest.raises(UserError) as e:
        own.check_replaceable(str(new), markers.STATE_DIR, 'train_state_dir', folder=True)
    assert f'copy the state in place of both links: rm {new}/state-000000095 {new}/state-000000020 && cp -r ' \
           f'{kept} {new}/state-000000020' in str(e.value), str(e.value)
    os.remove(new / 'state-000000020')
    os.remove(new / 'state-000000095')
    os.symlink(kept, new / 'state-000000020.1')  # a later save of step 20, linked: its .1 kept in the copy's name
    with pytest.raises(UserError) as e:
        own.check_replaceable(str(new), markers.STATE_DIR, 'train_state_dir', folder=True)
    assert str(e.value).endswith(f'rm {new}/state-000000020.1 && cp -r {kept} {new}/state-000000020.1'), str(e.value)
    os.remove(new / 'state-000000020.1')
    os.rename(tmp_path / 'set_aside', new / 'state-000000020')
    own.check_replaceable(str(new), markers.STATE_DIR, 'train_state_dir', folder=True)
    sf.ensure_state_dir(str(new))
    assert contract.inspect(str(new), resume=True).resume.path == str(link)
    # a link to nothing (its state since removed, or a scratch disk not mounted here): named, with what to do
    gone = tmp_path / 'gone' / 's'
    gone.mkdir(parents=True)
    os.symlink(tmp_path / 'nowhere' / 'state-000000030', gone / 'state-000000030')
    with pytest.raises(UserError) as e:
        own.check_replaceable(str(gone), markers.STATE_DIR, 'train_state_dir', folder=True)
    assert str(e.value) == (f'train_state_dir: {gone}/state-000000030 is a symbolic link to '
                            f'{tmp_path}/nowhere/state-000000030, which is not there; a state is read only from a '
                            f'folder of its own in train_state_dir, never through a link; remove the link (rm '
                            f'{gone}/state-000000030), and copy the state itself there to resume from it'), str(e.value)
    assert os.listdir(gone) == ['state-000000030']
