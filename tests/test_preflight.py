"""Start-up checks (model/train/preflight.py), in process on temporary folders: each problem a run
would meet is found, named and given its fix before anything is moved or trained -- the same
report the dry run prints. The end-to-end tests (test_nothing_lost, test_links) check the faces."""

from __future__ import annotations

import os
import re

import pytest

from config import resolve_config
from conftest import tiny_flags
from model.errors import UserError
from model.state import contract, markers
from model.train import preflight


def config(data, out, **changed):
    flags = dict(arg[2:].split('=', 1) for arg in tiny_flags(data, out))
    flags.update({k: str(v) for k, v in changed.items()})
    return preflight.resolve_places(resolve_config(overrides=flags))


def problems(report) -> dict[str, str]:
    return {p.name: p.line() for p in report.problems}


def test_a_ready_run_is_counted_and_nothing_is_written(data, tmp_path):
    out = tmp_path / 'run'
    report = preflight.check_train(config(data, out), resume=False, world_size=2)
    assert report.ready, problems(report)
    # 480 rows, 8 a process, 2 processes: 30 optimizer steps in the one epoch
    assert (report.train_rows, report.total_steps, report.vocab_size) == (480, 30, 1100)  # + 100 sentinels
    assert not os.path.exists(out)  # a check makes nothing


def test_missing_inputs_name_the_field_and_the_command_that_makes_them(data, tmp_path):
    cfg = config(data, tmp_path / 'run', train_file=tmp_path / 'nope' / 'train.parquet',
                 tokenizer_dir=tmp_path / 'no_tok')
    found = problems(preflight.check_train(cfg, resume=False, world_size=1))
    assert found['train_file'].startswith('train_file: ') and 'prepare_data.py' in found['train_file']
    assert 'train_tokenizer' in found['tokenizer_dir'] and f'--tokenizer_dir={tmp_path}/no_tok' in found['tokenizer_dir']


def test_outputs_inside_the_tokenizer_or_among_the_inputs_are_problems(data, tmp_path):
    cfg = config(data, tmp_path / 'run', log_dir=os.path.join(data['tok'], 'logs'),
                 model_file=os.path.dirname(data['train']) + '/m.{}.parquet', train_file=os.path.dirname(data['train']))
    found = problems(preflight.check_train(cfg, resume=False, world_size=1))
    assert 'lies inside tokenizer_dir' in found['log_dir']
    assert 'so a later run would read it as input' in found['model_file'], found


def test_a_foreign_file_in_the_state_folder_or_a_planted_lock_link_is_named(data, tmp_path):
    out = tmp_path / 'run'
    os.makedirs(out / 'state')
    (out / 'state' / 'notes.txt').write_text('mine')
    victim = tmp_path / 'thesis.txt'
    victim.write_text('my thesis')
    os.symlink(victim, out / markers.LOCK_FILE)
    found = problems(preflight.check_train(config(data, out), resume=False, world_size=1))
    assert 'did not make and is not empty (it holds notes.txt)' in found['train_state_dir']
    assert 'is a link, not the lock file' in found['output_dir']
    assert victim.read_text() == 'my thesis'


def test_a_warmup_longer_than_the_run_is_a_note_not_a_problem(data, tmp_path):
    report = preflight.check_train(config(data, tmp_path / 'run', warmup_steps=500), resume=False, world_size=1)
    assert report.ready
    assert any('warmup_steps=500 warms up for 500 optimizer steps, all of the run' in note and '--warmup_ratio=0.33' in note for note in report.notes), report.notes


def test_a_warmup_as_long_as_the_run_is_noted_with_its_fix_and_a_long_one_is_not(data, tmp_path):
    """480 rows, 8 a step: 60 optimizer steps. A warmup that ends before the run is never noted
    (bench_recipe: a third to three quarters of the run learned as well as 5% or better)."""
    def warmup_notes(**changed):
        report = preflight.check_train(config(data, tmp_path / 'run', **changed), resume=False, world_size=1)
        assert report.ready and report.total_steps == 60
        return [n for n in report.notes if 'warms up for' in n]

    assert warmup_notes(warmup_steps=6) == warmup_notes(warmup_steps=45) == warmup_notes(warmup_steps=59) == []
    assert warmup_notes(warmup_steps=0, warmup_ratio=0.75) == []
    (note,) = warmup_notes(warmup_steps=60)
    assert "warmup_steps=60 warms up for 60 optimizer steps, all of the run's 60" in note
    assert '--warmup_ratio=0.33 (a share of any run)' in note and '--warmup_steps=20' in note
    (note,) = warmup_notes(warmup_steps=1, warmup_ratio=0.999)  # the ratio replaces the steps
    assert "warmup_ratio=0.999 warms up for 60 optimizer steps, all of the run's 60" in note
    assert '--warmup_steps' not in note and '--warmup_ratio=0.33' in note


def test_a_warmup_on_a_run_of_a_few_steps_is_noted_only_where_it_is_the_whole_run():
    def notes(total, **changed):
        return preflight.warmup_notes(resolve_config(overrides=changed).train, total)

    assert notes(2, warmup_ratio=0.05) == notes(3, warmup_ratio=0.5) == notes(2, warmup_steps=1) == []
    (note,) = notes(2, warmup_steps=2)
    assert note.startswith("warmup_steps=2 warms up for 2 optimizer steps, all of the run's 2")
    assert note.endswith('e.g. --warmup_ratio=0.33 (a share of any run) or --warmup_steps=0')
    # a run of one step learns nothing at all with any warmup
    for ratio in (0.05, 0.33):
        (note,) = notes(1, warmup_ratio=ratio)
        assert note.startswith(f"warmup_ratio={ratio} warms up for 1 optimizer step, all of the run's 1")
        assert note.endswith('its one step is taken at rate 0 and learns nothing: --warmup_ratio=0 --warmup_steps=0')


def test_a_flag_the_runs_length_or_max_seq_len_keeps_from_acting_is_noted_with_what_the_run_does(data, tmp_path):
    """480 rows, 8 a step: 60 optimizer steps. An interval longer than the run never comes round;
    --max_steps beyond the epochs never cuts; --eval_max_new_tokens above max_seq_len is capped."""
    def notes(**changed):
        report = preflight.check_train(config(data, tmp_path / 'run', **changed), resume=False, world_size=1)
        assert report.ready, problems(report)
        return [n for n in report.notes if 'never comes round' in n or ' acts as ' in n]

    assert notes(eval_steps=60, save_steps=60, logging_steps=60, max_steps=60, eval_max_new_tokens=32) == []
    log_note, eval_note, save_note = notes(eval_steps=61, save_steps=100, logging_steps=1000)
    assert log_note == ("--logging_steps=1000 is more than the run's 60 optimizer steps, so it never comes round: "
                        "only its last step is logged (the loss of the whole run in one line); e.g. --logging_steps=3")
    assert eval_note.startswith("--eval_steps=61 is more than the run's 60 optimizer steps, so it never comes round: "
                                "it evaluates only at the end of each epoch and at its last step, as with --eval_steps=0")
    assert save_note.endswith('(a crash before then loses every step); e.g. --save_steps=15')
    (cut,) = notes(max_steps=20, eval_steps=30)  # the run's steps are the ones --max_steps leaves
    assert cut.startswith("--eval_steps=30 is more than the run's 20 optimizer steps, so it never comes round: it "
                          "evaluates only at its last step (it ends before its first epoch does)"), cut
    (epochs,) = notes(max_steps=150, epochs=2)  # 120 steps in 2 epochs of 60
    assert epochs == ('--max_steps=150 is more than the 120 optimizer steps of --epochs=2, so it never comes round: '
                      'the run ends with its epochs; --epochs=3 trains for at least that many steps')
    (capped,) = notes(eval_max_new_tokens=100)
    assert capped.startswith('--eval_max_new_tokens=100 acts as 32 on this run: max_seq_len=32 caps the answers '
                             'generated at an evaluation') and capped.endswith('give --eval_max_new_tokens=32 or less')
    # a resume takes the steps after its state's: an interval is judged by the multiples of it among those
    resumed = config(data, tmp_path / 'run', save_steps=20, max_steps=59, eval_steps=10)
    assert preflight.run_length_notes(resumed, 60, start=30) == []  # saves at 40, evaluates at 40 and 50
    (note,) = preflight.run_length_notes(resumed, 60, start=45)
    assert note == ("--save_steps=20 never comes round in the steps this resume takes (46 to 59; it counts the run's "
                    "steps): it saves its state only at its end or when a signal stops it (a crash before then loses "
                    "every step); e.g. --save_steps=3")
    assert preflight.run_length_notes(resumed, 60, start=59) == []  # nothing left to take: said elsewhere
    # the evaluation's sizes above the validation file's 64 rows: what it does instead (they were capped silently)
    def valid_notes(**changed):
        report = preflight.check_train(config(data, tmp_path / 'run', **changed), resume=False, world_size=1)
        return [n for n in report.notes if "the validation file's" in n]

    assert valid_notes(max_eval_rows=64, bleu_samples=64, show_samples=64) == []
    assert valid_notes(max_eval_rows=100, bleu_samples=500, show_samples=65) == [
        "--max_eval_rows=100 is more than the validation file's 64 rows: the validation loss is taken over all 64",
        "--bleu_samples=500 is more than the validation file's 64 rows: BLEU-4 is scored on those 64 (the eval line "
        "says on how many rows)",
        "--show_samples=65 is more than the validation file's 64 rows: it shows 64"]
    # with no answer to generate it has no effect at all: said once, as that
    report = preflight.check_train(config(data, tmp_path / 'run', eval_max_new_tokens=100, bleu_samples=0,
                                          show_samples=0), resume=False, world_size=1)
    assert [n for n in report.notes if 'eval_max_new_tokens' in n] == [
        '--eval_max_new_tokens=100 has no effect on this run: it caps the answers generated for --bleu_samples and '
        '--show_samples, both 0 here; leave it out']


def test_a_default_or_a_presets_interval_longer_than_the_run_is_not_noted(data, tmp_path):
    """Only a flag given reads as applied (as unused_flags): the defaults' save_steps=5000 and
    eval_max_new_tokens=192 on a 60-step run of max_seq_len 32 are not said."""
    flags = dict(arg[2:].split('=', 1) for arg in tiny_flags(data, tmp_path / 'run'))
    for name in ('save_steps', 'logging_steps'):
        del flags[name]
    report = preflight.check_train(preflight.resolve_places(resolve_config(overrides=flags)), resume=False,
                                   world_size=1)
    assert report.ready and report.total_steps == 60
    assert not [n for n in report.notes if 'never comes round' in n or ' acts as ' in n], report.notes


@pytest.mark.parametrize('optimizer,scale,lr,noted', [
    ('adafactor', False, 1e-4, True),  # the guide's rate: below what the recipe bench found good
    ('adafactor', False, 1e-3, False),
    ('adafactor', False, 1e-2, True),  # good with parameter scaling, far too high without
    ('adafactor', True, 1e-2, False),
    ('adafactor', True, 3e-2, False),  # the best measured with parameter scaling
    ('adafactor', True, 6e-2, True),
    ('adamw', False, 5e-4, False),
    ('adamw', False, 2e-3, True),
])
def test_a_learning_rate_outside_the_measured_range_is_noted(optimizer, scale, lr, noted):
    t = resolve_config(overrides={'optimizer': optimizer, 'adafactor_scale_parameter': scale, 'learn_rate': lr}).train
    low, best, high = preflight.GOOD_LEARN_RATES[optimizer + ('+scale' if scale else '')]
    notes = preflight.learn_rate_notes(t)
    assert bool(notes) is noted
    if noted:
        assert f'learn_rate={lr:g} is outside {low:g} to {high:g}' in notes[0] and 'bench/bench_recipe.py' in notes[0]
        assert f'--learn_rate={best:g}' in notes[0]


@pytest.mark.parametrize('aux,noted', [(0.0, False), (0.005, True), (0.01, False), (0.05, False), (0.2, False),
                                       (0.5, True)])
def test_an_aux_learning_rate_outside_the_measured_range_is_noted(aux, noted):
    t = resolve_config(preset='demo', overrides={'aux_learn_rate': aux}).train
    notes = preflight.learn_rate_notes(t)
    assert bool(notes) is noted, notes
    if noted:
        assert notes == [f'aux_learn_rate={aux:g} is outside 0.01 to 0.2, the range that learned well per step in '
                         f'bench/bench_recipe.py (best 0.05, beside scaled Adafactor at 3e-2; tiny T5s: '
                         f'bench/RECIPE_NOTES.md); check e.g. --aux_learn_rate=0.05']


def test_a_resume_without_a_state_and_with_a_changed_optimizer_is_refused(data, tmp_path):
    out = tmp_path / 'run'
    found = problems(preflight.check_train(config(data, out), resume=True, world_size=1))
    assert 'is_keep_training' in found, found
    # with a warm start given too: not "--init_from is not used: the run continues from its saved state" (there
    # is none) beside the problem, whose fix -- a fresh run -- is the warm start
    report = preflight.check_train(config(data, out, init_from=tmp_path / 'model'), resume=True, world_size=1)
    assert 'start without --is_keep_training' in problems(report)['is_keep_training'], problems(report)
    assert not [n for n in report.notes if 'init_from' in n], report.notes


def test_a_tokenizer_inside_a_folder_the_run_prunes_is_a_problem(data, tmp_path):
    out = tmp_path / 'run'
    copy = out / 'state' / 'state-000000020' / 'tokenizer'  # where a refused resume's own copy lies
    found = problems(preflight.check_train(config(data, out, tokenizer_dir=copy), resume=False, world_size=1))
    assert 'lies inside train_state_dir' in found['tokenizer_dir'] and 'cp -r' in found['tokenizer_dir'], found


@pytest.mark.parametrize('folder', ['best', 'final'])
@pytest.mark.parametrize('place,value', [('train_state_dir', '{f}'), ('train_state_dir', '{f}/states'),
                                         ('model_file', '{f}/m.{{}}.bin'), ('log_dir', '{f}/logs/run1'),
                                         ('train_state_dir', '{link}/states')])
def test_a_place_inside_a_folder_the_run_replaces_is_a_problem(data, tmp_path, folder, place, value):
    out = tmp_path / 'run'
    os.makedirs(tmp_path / 'scratch')
    os.makedirs(out)  # a link into a folder not there yet is followed where the folder it points into is
    os.symlink(out / folder, tmp_path / 'scratch' / 'link')  # a link that leads into it, made before the folder
    path = value.format(f=out / folder, link=tmp_path / 'scratch' / 'link')
    found = problems(preflight.check_train(config(data, out, **{place: path}), resume=False, world_size=1))
    assert place in found and 'replaced whole by a model folder' in found[place], found
    assert set(found) == {place}, found  # nothing else is said about it


@pytest.mark.parametrize('place,value', [('train_state_dir', '{f}'), ('model_file', '{f}/m.{{}}.bin'),
                                         ('log_dir', '{f}'), ('train_state_dir', '{link}')])
def test_previous_runs_itself_is_no_place_of_a_run(data, tmp_path, place, value):
    out = tmp_path / 'run'
    os.makedirs(tmp_path / 'scratch')
    os.makedirs(out)  # a link into a folder not there yet is followed where the folder it points into is
    os.symlink(out / 'previous_runs', tmp_path / 'scratch' / 'link')
    path = value.format(f=out / 'previous_runs', link=tmp_path / 'scratch' / 'link')
    found = problems(preflight.check_train(config(data, out, **{place: path}), resume=False, world_size=1))
    assert set(found) == {place} and 'which earlier runs are moved into' in found[place], found


@pytest.mark.parametrize('place,value', [('train_state_dir', '{out}'), ('train_state_dir', '{out}/best_states'),
                                         ('model_file', '{out}/final_weights/m.{{}}.bin'),
                                         ('log_dir', '{out}/previous_runs_logs'),
                                         ('train_state_dir', '{out}/previous_runs/20261205-233201/train_latest_state'),
                                         ('model_file', '{out}/previous_runs/x/m.{{}}.bin')])
def test_places_beside_those_folders_or_in_an_earlier_run_are_fine(data, tmp_path, place, value):
    out = tmp_path / 'run'
    report = preflight.check_train(config(data, out, **{place: value.format(out=out)}), resume=False, world_size=1)
    assert report.ready, problems(report)


def test_the_states_of_a_run_of_several_are_judged_deeply_on_main_only_then(data, tmp_path, monkeypatch):
    from model.state import states as sf

    calls = []
    real = sf.judge_state
    monkeypatch.setattr(sf, 'judge_state', lambda path, deep=True, pickles=None: calls.append(deep) or
                        real(path, deep=deep, pickles=pickles))
    out = tmp_path / 'run'
    os.makedirs(out / 'state' / 'state-000000005')
    (out / 'state' / 'state-000000005' / 'x').write_text('x')
    from model.state import ownership
    ownership.write_marker(str(out / 'state' / 'state-000000005'), markers.STATE, step=5)
    ownership.write_marker(str(out / 'state'), markers.STATE_DIR, manifest=False)
    cfg = config(data, out)
    report = preflight.check_train(cfg, resume=True, world_size=2, deep=False)
    assert calls and not any(calls)  # sizes only: nothing read, nothing said of what the state holds
    assert report.ready and report.resume is None and not any('state' in note for note in report.notes)
    calls.clear()
    with pytest.raises(UserError) as raised:  # the main process: deeply, notes and comparisons included
        preflight.judge_states_on_main(cfg, resume=True, fingerprint=report.fingerprint)
    assert f'{contract.PART_FILES["schedule"]} is missing' in str(raised.value)
    assert calls and all(calls)


def _folder_bytes(path) -> int:
    return sum(os.path.getsize(os.path.join(root, n)) for root, _, names in os.walk(path) for n in names)


@pytest.mark.parametrize('optimizer', ['adamw', 'adafactor'])
def test_the_disk_estimate_is_what_a_run_writes(data, tmp_path, optimizer):
    # a state (weights, moments, the tokenizer's copy) and a step file, as a finished run left them
    from conftest import run_train

    out = tmp_path / 'run'
    assert run_train(tiny_flags(data, out, max_steps=2, save_steps=2, optimizer=optimizer)).returncode == 0
    cfg = config(data, out, optimizer=optimizer)
    report = preflight.check_train(cfg, resume=True, world_size=1)
    state, model = preflight.save_bytes(cfg.train, report.parameters)
    (saved,) = [os.path.join(out, 'state', n) for n in os.listdir(out / 'state') if n.startswith('state-')]
    assert 0.8 < state / _folder_bytes(saved) < 1.25, (state, _folder_bytes(saved))
    assert 0.95 < 4 * report.parameters / os.path.getsize(out / 'chat_small_t5.2.bin') < 1.05
    assert 0.9 < model / _folder_bytes(out / 'final') < 1.1, (model, _folder_bytes(out / 'final'))


def test_room_for_the_saves_is_judged_on_each_disk(data, tmp_path):
    """Small disks of their own (tmpfs): what goes to each is summed there, and named by the first
    of output_dir, train_state_dir, model_file that goes there."""
    import contextlib
    import subprocess

    @contextlib.contextmanager
    def disk(name, size):
        path = tmp_path / name
        path.mkdir()
        if subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs', str(path)],
                          capture_output=True).returncode:
            pytest.skip('cannot mount a small tmpfs here (not root?)')
        try:
            yield path
        finally:
            subprocess.run(['umount', str(path)], check=False)

    def judged(**changed):
        report = preflight.check_train(config(data, tmp_path / 'run', **changed), resume=False, world_size=1)
        return report, [n for n in report.notes if 'may fill up' in n]

    report, _ = judged()
    state, model = preflight.save_bytes(config(data, tmp_path / 'run').train, report.parameters)
    weights = 4 * report.parameters
    assert weights < model < 2 * weights and report.total_steps == 60, 'the tiny model no longer fits this test'
    # best/ and final/ alone on a disk that holds one model folder: a note naming that disk and those only
    with disk('one_model', int(1.5 * model)) as d:
        report, notes = judged(output_dir=d / 'out')
        assert report.ready and len(notes) == 1 and f'disk of {d}/out;' in notes[0] and '(best/ and final/)' in notes[0]
    # a model folder and a step file on one disk, each fits, both do not: a problem, named output_dir
    with disk('shared', int(0.8 * (model + weights))) as d:
        report, _ = judged(output_dir=d / 'out', model_file=f'{d}/steps/m.{{}}.bin')
        (problem,) = report.problems
        assert problem.name == 'output_dir' and problem.line().startswith('output_dir: ') and (
            'the first saves of this model there (a model folder and a step file) need about' in problem.line())
    # --keep_latest_n_ckp=0 keeps every step file: 60 steps saved every 10 are 8 files with the one written
    # and the best, where keep 2 are 4
    with disk('steps', 6 * weights) as d:
        report, notes = judged(model_file=f'{d}/m.{{}}.bin', keep_latest_n_ckp=2)
        assert report.ready and notes == []
        report, notes = judged(model_file=f'{d}/m.{{}}.bin', keep_latest_n_ckp=0)
        assert report.ready and len(notes) == 1 and '(8 step files: --keep_latest_n_ckp=0 keeps every one)' in notes[0]



def test_a_resume_that_finds_its_states_where_they_were_before_output_dir_took_them_says_so(data, tmp_path,
                                                                                            monkeypatch):
    # a run started before --output_dir took the states along: its states are at the default place
    import config as config_module
    from conftest import run_train

    out, old = tmp_path / 'run', tmp_path / 'default_place'
    r = run_train(tiny_flags(data, out, max_steps=2, save_steps=2, train_state_dir=old / 'train_latest_state',
                             model_file=f'{old}/chat_small_t5.{{}}.bin'))
    assert r.returncode == 0, r.stderr[-2000:]
    monkeypatch.setattr(config_module, 'place_before_output_dir',
                        lambda preset, name: {'train_state_dir': str(old / 'train_latest_state'),
                                              'model_file': f'{old}/chat_small_t5.{{}}.bin'}[name])
    flags = {k: v for k, v in (a[2:].split('=', 1) for a in tiny_flags(data, out))
             if k not in ('train_state_dir', 'model_file')}
    cfg = preflight.resolve_places(resolve_config(overrides=flags))
    assert cfg.train.train_state_dir == f'{out}/train_latest_state'
    (problem,) = preflight.check_train(cfg, resume=True, world_size=1).problems
    assert problem.line().endswith(f"this run's states are in {old}/train_latest_state (a run given --output_dir now "
                                   f"keeps its states and step files there unless told otherwise): resume with "
                                   f"--train_state_dir={old}/train_latest_state '--model_file={old}/chat_small_t5.{{}}.bin'")
    # a fresh run there: the earlier run's best/ and final/ are moved aside, and it says how to continue instead
    fresh = preflight.check_train(cfg, resume=False, world_size=1)
    (note,) = [n for n in fresh.notes if 'a previous run saved' in n]
    assert note.startswith('a previous run saved 2 item(s) here') and note.endswith(
        f'to continue it instead: --is_keep_training=True --train_state_dir={old}/train_latest_state '
        f"'--model_file={old}/chat_small_t5.{{}}.bin'"), note
    # another run's states there (another output_dir): the plain advice
    cfg = preflight.resolve_places(resolve_config(overrides={**flags, 'output_dir': str(tmp_path / 'other')}))
    (problem,) = preflight.check_train(cfg, resume=True, world_size=1).problems
    assert problem.line().endswith('start without --is_keep_training (or check --train_state_dir)')
    # a copy of the run's best/ alone (its run's states elsewhere, its output_dir still holding it): moved aside, and
    # nothing promises a resume -- that run's states stay that run's
    import shutil

    shutil.copytree(out / 'best', tmp_path / 'other' / 'best')
    cfg = preflight.resolve_places(resolve_config(overrides={**flags, 'output_dir': str(tmp_path / 'other')}))
    (note,) = [n for n in preflight.check_train(cfg, resume=False, world_size=1).notes if 'a previous run' in n]
    assert 'is_keep_training' not in note and note.endswith('it cannot be continued from there)'), note


def test_a_fresh_run_names_the_states_of_the_run_whose_models_it_moves_and_no_others(data, tmp_path):
    import json

    from test_states import JSON_FILES, make_state

    def state_of(folder, step, output_dir):
        config = {'train': {'output_dir': str(output_dir), 'model_file': f'{output_dir}/m.{{}}.bin',
                            'train_state_dir': str(folder)}}
        make_state(folder, step, files={'model.safetensors': 'w', **JSON_FILES, 'config.json': json.dumps(config),
                                        'tokenizer/tokenizer.json': 'tok'})

    def note(out, **places):
        report = preflight.check_train(config(data, out, **places), resume=False, world_size=1)
        assert report.ready, problems(report)
        (found,) = [n for n in report.notes if 'a previous run saved' in n]
        return found

    out = tmp_path / 'run'
    state_of(out, 20, out)  # an earlier run of this output_dir with --train_state_dir=<output_dir>
    assert note(out, train_state_dir=out / 'train_latest_state').endswith(
        f'to continue it instead: --is_keep_training=True --train_state_dir={out}')
    # the states in this run's train_state_dir are another output_dir's: never offered as this one's
    other = tmp_path / 'other'
    state_of(tmp_path / 'shared_states', 30, tmp_path / 'elsewhere')
    found = note(other, train_state_dir=tmp_path / 'shared_states')
    assert 'is_keep_training' not in found and found.endswith('it cannot be continued from there)'), found
    # ... while that output_dir holds that run (its models; a run from before ids here): another run's states,
    # which a fresh run would take from it
    from test_states import run_models

    os.makedirs(tmp_path / 'elsewhere')
    assert note(other, train_state_dir=tmp_path / 'shared_states') == found  # an empty folder holds no run
    run_models(tmp_path / 'elsewhere', None)
    found = problems(preflight.check_train(config(data, other, train_state_dir=tmp_path / 'shared_states'),
                                           resume=False, world_size=1))
    assert f'holds the states of another run, whose models are in {tmp_path}/elsewhere' in found['train_state_dir']
    assert found['train_state_dir'].endswith(f'that run resumes with --is_keep_training=True '
                                             f'--output_dir={tmp_path}/elsewhere '
                                             f"'--model_file={tmp_path}/elsewhere/m.{{}}.bin' "
                                             f'--train_state_dir={tmp_path}/shared_states)'), found


def test_step_files_or_logs_in_another_runs_model_folder_or_a_name_too_long_are_found_before_the_work(data, tmp_path):
    from model.state import ownership

    theirs = tmp_path / 'another_run' / 'best'  # a model folder of the toolkit's (an edited copy would be too)
    os.makedirs(theirs)
    (theirs / 'config.json').write_text('{}')
    ownership.write_marker(str(theirs), markers.MODEL)
    out = tmp_path / 'run'
    for place, value, said in (('model_file', f'{theirs}/m.{{}}.bin', 'lies inside'), ('log_dir', theirs, 'is a model'),
                               ('log_dir', theirs / 'logs', 'lies inside')):
        found = problems(preflight.check_train(config(data, out, **{place: value}), resume=False, world_size=1))
        assert set(found) == {place} and said in found[place] and 'replaced whole' in found[place], found
    found = problems(preflight.check_train(config(data, out, model_file=f'{out}/{"a" * 250}{{}}.bin'),
                                           resume=False, world_size=1))
    assert 'more than the 255 a name may have there' in found['model_file'], found
    assert sorted(os.listdir(theirs)) == ['chat_small_t5.json', 'config.json']  # nothing written there


def test_a_rank_of_a_run_of_several_that_stops_anyway_says_first_that_the_place_is_in_use(data, tmp_path):
    from model.state import locks

    out = tmp_path / 'run'
    cfg = config(data, out)
    held = locks.PlaceLock([cfg.train.train_state_dir, cfg.train.output_dir, preflight.model_folder(cfg.train)],
                           'training run').acquire()  # a live run there, that has saved no state yet
    try:
        # a resume's rank (no lock probe while its main process may be taking them): it stops anyway, and says why
        report = preflight.check_train(cfg, resume=True, world_size=2, locks=False, deep=False)
        with pytest.raises(UserError, match=r'is in use by another run .*; wait for it to end'):
            report.raise_first()
        # a fresh run's rank that finds nothing wrong goes on: its own main process may hold the locks by now
        assert preflight.check_train(cfg, resume=False, world_size=2, locks=False, deep=False).ready
    finally:
        held.release()


def test_the_states_of_a_live_run_are_not_judged_while_it_prunes_and_saves_them(data, tmp_path):
    """A check beside a live run judged its states as that run pruned them (a file gone mid-read):
    "every saved state is damaged", and its advice to start without --is_keep_training, beside
    the place in use. Now the place in use is said alone, and a state not read."""
    from model.state import locks
    from test_states import run_state

    out = tmp_path / 'run'
    cfg = config(data, out)
    run_state(cfg.train.train_state_dir, 4, None, output_dir=out)
    os.remove(f'{cfg.train.train_state_dir}/state-000000004/model.safetensors')  # as a prune in progress leaves it
    held = locks.PlaceLock([cfg.train.train_state_dir, cfg.train.output_dir, preflight.model_folder(cfg.train)],
                           'training run').acquire()
    try:
        for resume in (True, False):
            found = problems(preflight.check_train(cfg, resume=resume, world_size=1))
            assert set(found) == {'train_state_dir', 'output_dir'}, found
            assert all('is in use by another run' in m and 'damaged' not in m for m in found.values()), found
    finally:
        held.release()
    found = problems(preflight.check_train(cfg, resume=True, world_size=1))  # the lock gone: judged as ever
    assert 'every saved state is damaged' in found['is_keep_training'], found


def test_a_resume_among_another_runs_states_or_models_is_refused_whichever_has_an_id(data, tmp_path):
    from test_states import run_models, run_state

    out = tmp_path / 'run'
    run_state(out / 'state', 10, None, output_dir=out)  # a run from before runs had ids ...
    run_models(out, 'R', folders=('best',))  # ... and best/ of a run with one: not its own
    found = problems(preflight.check_train(config(data, out), resume=True, world_size=1))
    assert f'output_dir: {out}/best is the model of another run (R), not of the run this resumes (from before ' \
           f'runs had ids' in found['output_dir'] and found['output_dir'].endswith('move it out of the way (or give '
           "this resume the --output_dir and --model_file that hold this run's models)"), found
    # the states of two runs in one train_state_dir: a resume would continue the newest among the other's
    run_state(out / 'state', 20, 'S', output_dir=out)
    found = problems(preflight.check_train(config(data, out), resume=True, world_size=1))
    assert f'holds the states of more than one run (run from before runs had ids: state-000000010; run S: ' \
           f'state-000000020); this resume would continue the newest, {out}/state/state-000000020' in \
           found['train_state_dir'], found


def test_a_copy_of_a_runs_outputs_alone_never_resumes_its_states_and_a_copy_with_them_is_that_run(data, tmp_path):
    import shutil

    from test_states import run_models, run_state

    a, copy, shared = tmp_path / 'a', tmp_path / 'copy', tmp_path / 'shared_states'
    run_models(a, 'R', steps=(10,))
    run_state(shared, 10, 'R', output_dir=a)  # its states outside its output_dir
    shutil.copytree(a, copy)
    found = problems(preflight.check_train(config(data, copy, train_state_dir=shared), resume=True, world_size=1))
    assert found['output_dir'].startswith(f'output_dir: the run whose state this resumes ({shared}/state-000000010) '
                                          f'has its models in {a}; resumed with --output_dir={copy} it would go on '
                                          f'apart from them'), found
    assert found['output_dir'].endswith(f"resume with --output_dir={a} '--model_file={a}/m.{{}}.bin', or move {a} "
                                        f'away first to continue here'), found
    # into a new, empty output_dir: the run goes on there (a changed place, not a copy)
    assert 'output_dir' not in problems(preflight.check_train(config(data, tmp_path / 'new_out', train_state_dir=shared),
                                                              resume=True, world_size=1))
    shutil.move(str(a), str(tmp_path / 'a_moved'))  # moved by hand: the copy is the run's only place now
    assert 'output_dir' not in problems(preflight.check_train(config(data, copy, train_state_dir=shared),
                                                              resume=True, world_size=1))
    # a run's folder holding its outputs and its states side by side, copied whole: the copy's states went along
    run_models(tmp_path / 'root' / 'out', 'T', steps=(10,))
    run_state(tmp_path / 'root' / 'state', 10, 'T', output_dir=tmp_path / 'root' / 'out')
    shutil.copytree(tmp_path / 'root', tmp_path / 'root2')
    for resume in (True, False):
        found = problems(preflight.check_train(config(data, tmp_path / 'root2' / 'out',
                                                      train_state_dir=tmp_path / 'root2' / 'state'),
                                               resume=resume, world_size=1))
        assert 'output_dir' not in found and 'train_state_dir' not in found, found
    # a run from before ids copied with its states inside: that run, not another's; a fresh run there moves them aside
    old, old_copy = tmp_path / 'old', tmp_path / 'old_copy'
    run_models(old, None, steps=(10,))
    run_state(old / 'state', 10, None, output_dir=old)
    shutil.copytree(old, old_copy)
    assert 'train_state_dir' not in problems(preflight.check_train(
        config(data, old_copy, train_state_dir=old_copy / 'state'), resume=False, world_size=1))
    found = problems(preflight.check_train(config(data, tmp_path / 'third', train_state_dir=old / 'state'),
                                           resume=False, world_size=1))  # while old holds it: not a third run's
    assert f'holds the states of another run, whose models are in {old}' in found['train_state_dir'], found


def test_the_states_of_a_run_whose_models_were_moved_aside_go_with_them_not_with_the_next_run(data, tmp_path):
    import shutil

    from test_states import run_models, run_state

    out, states = tmp_path / 'out', tmp_path / 'states_of_x'
    run_models(out, 'X', steps=(10,))
    run_state(states, 10, 'X', output_dir=out)
    archive = out / 'previous_runs' / '20261206-000000'  # a fresh run here with other states moved X's models
    os.makedirs(archive)
    for name in ('best', 'm.10.bin'):
        shutil.move(str(out / name), str(archive / name))
    run_models(out, 'Z', steps=(10,))
    # X's command again, fresh: its states would go into another archive than its models
    found = problems(preflight.check_train(config(data, out, train_state_dir=states), resume=False, world_size=1))
    assert f'holds the states of another run, whose models are in {archive}' in found['train_state_dir'], found
    assert found['train_state_dir'].endswith(f"--output_dir={archive} '--model_file={archive}/m.{{}}.bin' "
                                             f'--train_state_dir={states})'), found
    # a resume that finds no state: the run moved aside from this very train_state_dir is offered, no other
    run = tmp_path / 'run'
    moved = run / 'previous_runs' / '20261206-000001'
    run_models(moved, 'Y', steps=(10,))
    run_state(moved / 'state', 10, 'Y', output_dir=run, saved_in=run / 'elsewhere')  # (a copy's: <its run>/state)
    found = problems(preflight.check_train(config(data, run), resume=True, world_size=1))
    assert 'moved aside' not in found['is_keep_training'], found  # its states came from another train_state_dir
    shutil.rmtree(moved / 'state')
    run_state(moved / 'state', 10, 'Y', output_dir=run, saved_in=run / 'state')
    found = problems(preflight.check_train(config(data, run), resume=True, world_size=1))
    assert found['is_keep_training'].endswith(f'or continue the newest earlier run moved aside from here, to {moved}, '
                                              f'with --is_keep_training=True --output_dir={moved} '
                                              f"'--model_file={moved}/chat_small_t5.{{}}.bin' "
                                              f'--train_state_dir={moved}/state'), found


@pytest.mark.parametrize('changed', [dict(tie_word_embeddings=False), dict(feed_forward_proj='gated-gelu'),
                                     dict(relative_attention_max_distance=64)])
def test_a_warm_start_from_a_model_of_another_shape_is_refused_whatever_field_differs(data, tmp_path, changed):
    """Every field of the model's shape counts (sizing.SHAPE_FIELDS), for a model folder and a
    weights file alike: an output scaling that differs (tie_word_embeddings, kept by transformers 5
    as scale_decoder_outputs) loaded silently and began from another function (loss 62 against 7.9)."""
    from model.data.tokenizer import load_tokenizer
    from model.net.chat_model import build_model
    from model.net.sizing import model_shape
    from accelerate import PartialState

    from model.state import model_files

    PartialState()  # save_weights_file logs through accelerate, as a run does
    base = config(data, tmp_path / 'run')
    tok = load_tokenizer(data['tok'])
    model = build_model(base.model, len(tok))
    folder, weights = str(tmp_path / 'src' / 'best'), str(tmp_path / 'src' / 'm.best.bin')
    model_files.save_model_folder(model, model.state_dict(), tok, folder, tag='best', step=1)
    model_files.save_weights_file(model.state_dict(), weights, step=1, tag='best',
                                  model_shape=model_shape(base.model, len(tok)))
    for source in (folder, weights):
        same = preflight.check_train(config(data, tmp_path / 'same', init_from=source), resume=False, world_size=1)
        assert same.ready, problems(same)
        other = preflight.check_train(config(data, tmp_path / 'other', init_from=source, **changed), resume=False,
                                      world_size=1)
        (name, value), = changed.items()
        line = problems(other)['init_from']
        assert 'the model shape differs' in line and f'{name} {getattr(base.model, name)} in {source}' in line, line
        assert f'{value} in this run' in line
        assert line.endswith(f'warm-start a run of the same shape: --{name}={getattr(base.model, name)}'), line
        fixed = config(data, tmp_path / 'fixed', init_from=source, **{name: getattr(base.model, name)})
        assert preflight.check_train(fixed, resume=False, world_size=1).ready  # the flags it names: ready


def test_the_shape_a_model_folder_describes_is_the_shape_it_was_built_with():
    """sizing.shape_of_t5_config inverts chat_model.build_t5_config for every shape field."""
    import dataclasses
    import json

    from config import T5ModelConfig
    from model.net.chat_model import build_t5_config
    from model.net.sizing import SHAPE_FIELDS, model_shape, shape_of_t5_config

    variants = [T5ModelConfig(), T5ModelConfig(tie_word_embeddings=False, feed_forward_proj='gated-gelu', d_model=512,
                                               num_heads=8, relative_attention_num_buckets=16)]
    for m in variants:
        spec = json.loads(build_t5_config(m, 1300).to_json_string())  # as config.json holds it
        assert shape_of_t5_config(spec) == model_shape(m, 1300)
    assert set(SHAPE_FIELDS) == {f.name for f in dataclasses.fields(T5ModelConfig)} - {'dropout_rate'} | {'vocab_size'}
    assert shape_of_t5_config({'tie_word_embeddings': False})['tie_word_embeddings'] is False  # transformers 4's


def test_a_resume_names_as_applied_only_the_changes_it_makes(data, tmp_path):
    """A change the resume refuses (the optimizer, the model's shape, what a span-corruption
    example is made of) is a problem, never also a note that says it is applied from the saved
    step on (the dry run said both)."""
    from conftest import run_train

    out = tmp_path / 'run'
    assert run_train(tiny_flags(data, out, max_steps=2, save_steps=2)).returncode == 0
    report = preflight.check_train(config(data, out, learn_rate=0.5, d_ff=96, optimizer='adafactor'), resume=True,
                                   world_size=1)
    (applied,) = [n for n in report.notes if 'applied from step 2 on' in n]
    assert 'learn_rate' in applied and 'd_ff' not in applied and 'optimizer' not in applied, applied
    assert 'd_ff' in problems(report)['is_keep_training'] and 'optimizer' in problems(report)
    # a flag that does nothing with the run's other settings is said to do nothing, not also "applied"
    report = preflight.check_train(config(data, out, learn_rate=0.5, noise_density=0.2), resume=True, world_size=1)
    (applied,) = [n for n in report.notes if 'applied from step 2 on' in n]
    assert 'learn_rate' in applied and 'noise_density' not in applied, applied
    assert [n for n in report.notes if n.startswith('--noise_density=0.2 has no effect on this run')], report.notes
    # a step file of the run's, damaged since: said so, not "not written by this toolkit"
    step_file = out / 'chat_small_t5.2.bin'
    raw = bytearray(step_file.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    step_file.write_bytes(bytes(raw))
    found = problems(preflight.check_train(config(data, out), resume=False, world_size=1))['model_file']
    assert 'chat_small_t5.2.bin matches the model_file pattern and was written by this toolkit but changed since' \
        in found, found
    assert contract.fixed_fields({'model_shape': {'d_ff': 1}, 'examples': {'max_seq_len': 8}}) == {
        'd_ff', 'objective', 'max_seq_len'}  # under pairs max_seq_len may change: its fingerprint has no examples


def test_a_folder_or_link_named_like_a_save_in_progress_is_named_before_any_step(data, tmp_path):
    """One that is not the toolkit's stopped the save of its step (after the steps since the last
    save were trained: lost); a half-done save of the toolkit's is swept, never named."""
    from model.state import states as sf

    out = tmp_path / 'run'
    sf.ensure_state_dir(str(out / 'state'))
    (tmp_path / 'mine').mkdir()
    os.symlink(tmp_path / 'mine', out / 'state' / '.tmp-state-000000030')
    sf.begin_save(str(out / 'state'), sf.tmp_path(str(out / 'state'), 40))  # a killed save's: the toolkit's
    line = problems(preflight.check_train(config(data, out), resume=False, world_size=1))['train_state_dir']
    assert '.tmp-state-000000030 is named like a save in progress but this toolkit did not make it' in line, line
    assert '000000040' not in line and os.listdir(tmp_path / 'mine') == []


@pytest.mark.parametrize('place', ['output_dir', 'train_state_dir', 'model_file', 'log_dir'])
def test_a_place_that_holds_much_else_is_no_place_for_a_run(data, tmp_path, monkeypatch, place):
    # the filesystem's root, the home folder, the toolkit (its folder, one holding it, a copy, a link to it), its code
    monkeypatch.setenv('HOME', str(tmp_path / 'home'))
    (tmp_path / 'home' / 'runs').mkdir(parents=True)
    copy = tmp_path / 'toolkit_copy'
    (copy / 'model').mkdir(parents=True)
    (copy / 'train_low_mem.py').write_text('')
    os.symlink(preflight.PROJECT_ROOT, tmp_path / 'link_to_toolkit')
    shared = {'/': "the filesystem's root", str(tmp_path / 'home'): 'the home folder',
              preflight.PROJECT_ROOT: "the toolkit's own folder", str(tmp_path / 'link_to_toolkit'): "the toolkit's own",
              os.path.dirname(preflight.PROJECT_ROOT): 'a folder that holds the toolkit',
              str(copy): 'a copy of the toolkit', os.path.join(preflight.PROJECT_ROOT, 'model', 'x'): "toolkit's model/",
              str(copy / 'tests'): "inside a copy of the toolkit's tests/ folder", str(copy / 'model' / 'x'): 'copy',
              str(copy / '.git' / 'x'): "copy of the toolkit's .git/",
              os.path.join(preflight.PROJECT_ROOT, '.git'): "toolkit's .git/"}
    out = tmp_path / 'run'
    for folder, said in shared.items():
        value = os.path.join(folder, 'm.{}.bin') if place == 'model_file' else folder
        report = preflight.check_train(config(data, out, **{place: value}), resume=False, world_size=1)
        found = [p.line() for p in report.problems if 'a folder of its own' in p.line()]
        # said first of that place; output_dir's own states and step files (in it, for the same reason) not again
        assert len(found) == 1 and found[0].startswith(f'{place}: ') and said in found[0], (folder, found)
        with pytest.raises(UserError, match=f'^{place}: .*{re.escape(said)}'):
            report.raise_first()
    for fine in (tmp_path / 'home' / 'runs', os.path.join(preflight.PROJECT_ROOT, 'model_save', 'never_made'),
                 os.path.join(preflight.PROJECT_ROOT, 'bench', 'out', 'never_made'),  # where the benches' runs go
                 copy / 'model_save', tmp_path / 'elsewhere'):
        value = os.path.join(fine, 'm.{}.bin') if place == 'model_file' else str(fine)
        report = preflight.check_train(config(data, out, **{place: value}), resume=False, world_size=1)
        assert report.ready, (fine, problems(report))


def test_the_way_on_from_damaged_states_moves_only_the_states_where_they_lie_among_the_models(data, tmp_path):
    out = tmp_path / 'run'
    apart = config(data, out).train  # states in out/state: the folder goes whole
    assert preflight.damaged_states_fix(apart, apart.train_state_dir).startswith(  # out of output_dir: not its clutter
        f'move it away yourself (e.g. mv {out}/state {out}.damaged_states), then start afresh')
    together = config(data, out, train_state_dir=out).train  # states beside the models, best/, final/, logs/
    fix = preflight.damaged_states_fix(together, together.train_state_dir, ' without --is_keep_training')
    assert fix.startswith(f'move its states away yourself (e.g. mkdir -p {out}.damaged_states && mv {out}/state-* '
                          f'{out}.damaged_states/), then start afresh without --is_keep_training'), fix
    elsewhere = config(data, out, train_state_dir=tmp_path / 'scratch' / 's').train  # beside the states folder
    assert preflight.damaged_states_fix(elsewhere, elsewhere.train_state_dir).startswith(
        f'move it away yourself (e.g. mv {tmp_path}/scratch/s {tmp_path}/scratch/s.damaged), then start afresh')
    # a second time: the name is taken by the first time's states, which a mv would nest them into
    os.makedirs(f'{out}.damaged_states')
    assert preflight.damaged_states_fix(apart, apart.train_state_dir).startswith(
        f'move it away yourself (e.g. mv {out}/state {out}.damaged_states-2), then start afresh')


def test_a_missing_data_file_is_told_the_command_that_makes_that_file():
    """The demo preset's fix for a missing train file was `prepare_data.py demo --out_dir=<its folder>`
    whatever its name; the demo writes only train.parquet and valid.parquet there."""
    demo = resolve_config(preset='demo')
    assert preflight.data_fix(demo) == (f'create it with: python prepare_data.py demo --out_dir='
                                        f'{os.path.dirname(demo.train.train_file)}')
    moved = resolve_config(preset='demo', overrides={'train_file': 'work/d/train.parquet',
                                                     'validation_file': 'work/d/valid.parquet'})
    assert preflight.data_fix(moved) == 'create it with: python prepare_data.py demo --out_dir=work/d'
    other = resolve_config(preset='demo', overrides={'train_file': 'work/outlink/x.parquet'})
    assert preflight.data_fix(other).startswith('create it with: python prepare_data.py convert YOUR_DATA.jsonl '), \
        preflight.data_fix(other)
    assert '--train_out=work/outlink/x.parquet' in preflight.data_fix(other)


def test_a_file_given_as_train_state_dir_is_one_problem(data, tmp_path):
    """A file at --train_state_dir was two problems with two pieces of advice ('never replaced: move it away'
    and 'choose a folder path')."""
    (tmp_path / 'afile').write_text('mine')
    report = preflight.check_train(config(data, tmp_path / 'run', train_state_dir=tmp_path / 'afile'), resume=False,
                                   world_size=1)
    said = [p.line() for p in report.problems if p.name == 'train_state_dir']
    assert len(said) == 1 and 'is a file, not a folder' in said[0], said


def test_a_state_saved_before_aux_learn_rate_reads_as_0_and_says_so():
    """A saved train config without aux_learn_rate (saved before the field existed) reads as 0: a
    resume at 0 is not refused; one that asks for a second group is, naming the state's age; one
    saved with the field is named plainly."""
    old = {'optimizer': 'adafactor', 'learn_rate': 1e-3}
    assert preflight.resume_refusals(old, resolve_config(overrides={'aux_learn_rate': 0}).train) == []
    (refused,) = preflight.resume_refusals(old, resolve_config(overrides={'aux_learn_rate': 0.05}).train)
    assert refused.name == 'aux_learn_rate' and refused.line().startswith(
        '--aux_learn_rate=0.05 but the saved run trained with aux_learn_rate=0.0 (it was saved before '
        '--aux_learn_rate existed: read as its default) (it is 0 in one and not the other'), refused.line()
    assert 'resume with --aux_learn_rate=0.0' in refused.line()
    (refused,) = preflight.resume_refusals({**old, 'aux_learn_rate': 0.05}, resolve_config().train)
    assert 'trained with aux_learn_rate=0.05 (it is 0 in one' in refused.line(), refused.line()
    assert preflight.resume_refusals({**old, 'aux_learn_rate': 0.05},
                                     resolve_config(overrides={'aux_learn_rate': 0.1}).train) == []
