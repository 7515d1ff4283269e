"""The state contract (model/state/contract.py), in-process on one CPU process: a save loads back
into every named part; the states are judged once into a SavedState; a damaged, partial or
earlier-format state is stepped around; a failed save leaves nothing half-written."""

from __future__ import annotations

import errno
import glob
import json
import os
import tempfile

import pytest
import torch

from model.errors import UserError
from model.state import contract, markers, ownership
from model.state import states as sf


class Position:
    """A stand-in for the loader's position: any Stateful is a part."""

    def __init__(self):
        self.rows = 0

    def state_dict(self) -> dict:
        return {'rows': self.rows}

    def load_state_dict(self, state: dict) -> None:
        self.rows = state['rows']


def live_run(tokenizer, d_model=32):
    """The parts of a tiny run, prepared by accelerate on the CPU."""
    from accelerate import Accelerator
    from transformers import get_scheduler

    from config import T5ModelConfig
    from model.data.tokenizer import save_tokenizer_copy
    from model.net.chat_model import build_model
    from model.train.run_support import Collectives

    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = build_model(T5ModelConfig(d_model=d_model, num_heads=2, d_kv=16, d_ff=64, num_layers=1,
                                      num_decoder_layers=1, dropout_rate=0.0), len(tokenizer))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = get_scheduler('linear', optimizer, num_warmup_steps=2, num_training_steps=10)
    model, optimizer = accelerator.prepare(model, optimizer)
    counters, position = contract.TrainState(), Position()
    parts = contract.StateParts(accelerator, Collectives(accelerator),
                                {'schedule': scheduler, 'data_position': position, 'counters': counters},
                                write_tokenizer=lambda folder: save_tokenizer_copy(tokenizer, folder))
    return model, optimizer, scheduler, counters, position, parts


def train_steps(model, optimizer, scheduler, tokenizer, n):
    batch = tokenizer(['今天天气很好'] * 2, return_tensors='pt')
    for _ in range(n):
        loss = model(input_ids=batch['input_ids'], labels=batch['input_ids']).loss
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()


def remark(folder, step):
    """The state's marker written again to match what is there now."""
    os.remove(os.path.join(folder, markers.MARKER_FILE))
    ownership.write_marker(folder, markers.STATE, step=step)


def describe():
    return contract.describe_run({'train': {'optimizer': 'adamw'}}, {'model_shape': {}}, 1, 'NO')


def save(parts, tokenizer, state_dir, step):
    return parts.save_all_ranks(str(state_dir), step, describe())


def test_a_save_loads_back_into_every_named_part(tmp_path, tokenizer):
    model, optimizer, scheduler, counters, position, parts = live_run(tokenizer)
    train_steps(model, optimizer, scheduler, tokenizer, 3)
    counters.global_step, counters.best_val_loss, position.rows = 3, float('inf'), 24
    path = save(parts, tokenizer, tmp_path / 'states', 3)
    after_save = torch.rand(3)  # the RNG is a part: a resume draws what the run would have drawn
    names = set(os.listdir(path))
    assert {'model.safetensors', 'optimizer.bin', 'random_states_0.pkl', *contract.PART_FILES.values(),
            *contract.RUN_FILES.values(), contract.TOKENIZER_COPY, markers.MARKER_FILE} <= names
    assert not [n for n in names if n.endswith('.pkl') and not n.startswith('random_states')]  # the run's: JSON
    assert json.load(open(os.path.join(path, 'schedule.json')))['last_epoch'] == 3

    report = contract.inspect(str(tmp_path / 'states'), resume=True)
    assert not report.problems and report.resume.path == path and report.resume.step == 3
    assert report.resume.parts['counters']['global_step'] == 3 and report.resume.config['train']['optimizer'] == 'adamw'

    model2, optimizer2, scheduler2, counters2, position2, parts2 = live_run(tokenizer, d_model=32)
    torch.manual_seed(123)
    parts2.load_all_ranks(report.resume)
    assert torch.equal(torch.rand(3), after_save)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    s1, s2 = optimizer.state_dict()['state'], optimizer2.state_dict()['state']
    assert s1.keys() == s2.keys() and all(torch.equal(s1[k]['exp_avg'], s2[k]['exp_avg']) for k in s1)
    assert scheduler2.state_dict() == scheduler.state_dict() and scheduler2.get_last_lr() == scheduler.get_last_lr()
    assert counters2 == counters and position2.rows == 24
    # and training goes on identically from there
    train_steps(model, optimizer, scheduler, tokenizer, 1)
    train_steps(model2, optimizer2, scheduler2, tokenizer, 1)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))


def test_states_are_judged_once_newest_first_and_a_damaged_one_stepped_around(tmp_path, tokenizer):
    model, optimizer, scheduler, counters, position, parts = live_run(tokenizer)
    states = tmp_path / 'states'
    old = save(parts, tokenizer, states, 1)
    counters.global_step = 2
    new = save(parts, tokenizer, states, 2)
    # same size, other content: only the checksum (deep) sees it
    target = os.path.join(new, 'optimizer.bin')
    data = bytearray(open(target, 'rb').read())
    data[-20] ^= 0xFF
    open(target, 'wb').write(bytes(data))
    shallow = contract.inspect(str(states), resume=True, deep=False)  # sizes only: passes, reads and says nothing
    assert not shallow.problems and shallow.resume is None and not shallow.notes
    report = contract.inspect(str(states), resume=True)
    assert report.resume.path == old and report.resume.parts['counters']['global_step'] == 0
    assert 'optimizer.bin differs from what was saved (checksum)' in report.notes[0]
    assert os.path.exists(target)  # left alone, never deleted


def test_a_link_named_as_a_state_is_said_and_never_resumed_from(tmp_path, tokenizer):
    """A link put among a run's own states (a newer state elsewhere, linked in) was passed over
    without a word: the resume took the older real state."""
    model, optimizer, scheduler, counters, position, parts = live_run(tokenizer)
    states, elsewhere = tmp_path / 'states', tmp_path / 'elsewhere'
    old = save(parts, tokenizer, states, 1)
    counters.global_step = 2
    newer = save(parts, tokenizer, elsewhere, 2)
    link = states / os.path.basename(newer)
    os.symlink(newer, link)
    report = contract.inspect(str(states), resume=True)
    assert report.resume.path == old and not report.problems
    assert len(report.notes) == 1 and f'{link} is a symbolic link to {newer}' in report.notes[0], report.notes
    assert 'passed over; copy the state in its place: rm ' in report.notes[0]
    older = states / 'state-000000000'  # a link named older than the state resumed: it changes nothing, unsaid
    os.symlink(newer, older)
    assert len(contract.inspect(str(states), resume=True).notes) == 1
    os.remove(older)
    for n in (3, 4):  # more such links: the first said whole, the others named (one sentence each was a page)
        os.symlink(newer, states / f'state-00000000{n}')
    (note,) = contract.inspect(str(states), resume=True).notes
    assert note.count('is a symbolic link') == 1 and note.startswith(f'train_state_dir: {states}/state-000000004 '), note
    assert note.endswith('; and 2 more such links (state-000000003, state-000000002), each to be replaced by its '
                         'state\'s copy or removed the same way'), note
    for n in (3, 4):
        os.remove(states / f'state-00000000{n}')
    os.remove(os.path.join(old, 'counters.json'))  # no real state left: the problem names the link too
    report = contract.inspect(str(states), resume=True)
    assert report.resume is None and f'{link} is a symbolic link' in report.problems[0], report.problems
    assert os.path.isdir(newer) and os.path.islink(link)  # nothing moved or deleted


@pytest.mark.parametrize('damage', ['missing', 'unreadable', 'not an object'])
def test_a_state_whose_json_parts_do_not_read_is_not_loadable(tmp_path, tokenizer, damage):
    model, optimizer, scheduler, counters, position, parts = live_run(tokenizer)
    states = tmp_path / 'states'
    old = save(parts, tokenizer, states, 1)
    new = save(parts, tokenizer, states, 2)
    target = os.path.join(new, 'data_position.json')
    os.remove(target)
    if damage != 'missing':
        open(target, 'w').write('{"rows": ' if damage == 'unreadable' else '[1, 2]')
    # the marker rewritten to match: an earlier version's state, or damage the checksums cannot see
    remark(new, 2)
    report = contract.inspect(str(states), resume=True)
    assert report.resume.path == old, report.notes
    why = {'missing': 'data_position.json is missing',
           'unreadable': 'data_position.json is unreadable', 'not an object': 'data_position.json holds no JSON object'}
    assert why[damage] in report.notes[0]
    os.remove(os.path.join(old, 'counters.json'))
    remark(old, 1)
    problems = contract.inspect(str(states), resume=True).problems
    assert len(problems) == 1 and 'every saved state is damaged' in problems[0]


def test_a_state_that_does_not_fit_the_run_is_one_line(tmp_path, tokenizer):
    *_, parts = live_run(tokenizer, d_model=32)
    save(parts, tokenizer, tmp_path / 'states', 1)
    saved = contract.inspect(str(tmp_path / 'states'), resume=True).resume
    *_, other = live_run(tokenizer, d_model=64)
    with pytest.raises(UserError) as raised:
        other.load_all_ranks(saved)
    assert 'does not load into this run' in str(raised.value) and '\n' not in str(raised.value)


def test_a_failed_save_leaves_nothing_half_written_and_the_previous_state(tmp_path, tokenizer, monkeypatch):
    model, optimizer, scheduler, counters, position, parts = live_run(tokenizer)
    states = tmp_path / 'states'
    first = save(parts, tokenizer, states, 1)

    def full_disk(folder, **kw):
        open(os.path.join(folder, 'model.safetensors'), 'wb').write(b'half')
        raise OSError(errno.ENOSPC, 'No space left on device')

    monkeypatch.setattr(parts.accelerator, 'save_state', full_disk)
    with pytest.raises(UserError) as raised:
        save(parts, tokenizer, states, 2)
    assert 'disk full' in str(raised.value) and f'the previous state {first} is intact' in str(raised.value)
    assert sorted(os.listdir(states)) == sorted([markers.MARKER_FILE, os.path.basename(first)])
    assert sf.judge_state(first).wholly_owned


def test_every_part_has_its_file_in_the_contract(tokenizer):
    *_, parts = live_run(tokenizer)
    with pytest.raises(ValueError, match='PART_FILES'):
        contract.StateParts(parts.accelerator, parts.collectives, {**parts.parts, 'ema': Position()}, print)
    with pytest.raises(ValueError, match='PART_FILES'):
        contract.StateParts(parts.accelerator, parts.collectives, {'schedule': parts.parts['schedule']}, print)


def test_a_fingerprint_change_is_refused_or_noted():
    saved = {'model_shape': {'d_model': 32}, 'tokenizer': 'a', 'data': [{'rows': 10}]}
    assert contract.compare_fingerprints(saved, dict(saved), allow_data_change=False) == []
    with pytest.raises(UserError) as raised:
        contract.compare_fingerprints(saved, {**saved, 'model_shape': {'d_model': 64}}, False)
    assert 'd_model: saved 32 -> now 64' in raised.value.message and 'another --train_state_dir' in raised.value.fix
    # a state saved before a shape field existed was built with its default: resumed, not "saved None"
    from config import T5ModelConfig
    from model.net.sizing import model_shape

    now = model_shape(T5ModelConfig(), 1000)
    old = {k: v for k, v in now.items() if k != 'tie_word_embeddings'}
    assert contract.compare_fingerprints({**saved, 'model_shape': old}, {**saved, 'model_shape': now}, False) == []
    with pytest.raises(UserError) as raised:  # and one built otherwise is refused with the flag that fits it
        contract.compare_fingerprints({**saved, 'model_shape': old},
                                      {**saved, 'model_shape': {**now, 'tie_word_embeddings': False}}, False)
    assert 'tie_word_embeddings: saved True -> now False' in raised.value.message
    assert '--tie_word_embeddings=True' in raised.value.fix
    with pytest.raises(UserError) as raised:
        contract.compare_fingerprints(saved, {**saved, 'tokenizer': 'b'}, False)
    assert 'tokenizer' in raised.value.message
    changed = {**saved, 'data': [{'rows': 11}]}
    with pytest.raises(UserError) as raised:
        contract.compare_fingerprints(saved, changed, False)
    assert raised.value.fix == 'pass --allow_data_change=True to continue on the new data anyway'
    assert 'continuing as --allow_data_change=True asks' in contract.compare_fingerprints(saved, changed, True)[0]
    # said file by file, in words (a Python list of dicts before)
    a, b = {'name': 'a.parquet', 'bytes': 379822, 'rows': 900}, {'name': 'b.parquet', 'bytes': 10, 'rows': 1}
    for was, now, said in (([a], [{**a, 'rows': 1200, 'bytes': 400000}],
                            'a.parquet: 900 rows (379,822 bytes) -> 1,200 rows (400,000 bytes)'),
                           ([a, b], [a], 'gone: b.parquet (1 row (10 bytes))'),
                           ([a], [a, b], 'new: b.parquet (1 row (10 bytes))'),
                           ([a, b], [b, a], 'the files are read in another order'),
                           ([a, a], [a, {**a, 'rows': 5}], 'file 2 of 2 (a.parquet): 900 rows (379,822 bytes) -> 5 rows'),
                           ([a, a], [a], '2 file(s) -> 1')):
        with pytest.raises(UserError) as raised:
            contract.compare_fingerprints({**saved, 'data': was}, {**saved, 'data': now}, False)
        assert f'the training data changed since the save ({said}' in raised.value.message, raised.value.message
        assert '{' not in raised.value.message
    # the objective: a state from before it counts as pairs; another one is refused even with changed data allowed
    assert contract.compare_fingerprints(saved, {**saved, 'objective': 'pairs'}, False) == []
    with pytest.raises(UserError) as raised:
        contract.compare_fingerprints({**saved, 'objective': 'span_corruption'}, {**changed, 'objective': 'pairs'}, True)
    assert 'trained --objective=span_corruption' in raised.value.message and '--init_from' in raised.value.fix
    span = {**saved, 'objective': 'span_corruption', 'examples': {'max_seq_len': 128, 'noise_density': 0.15}}
    assert contract.compare_fingerprints(span, dict(span), False) == []
    with pytest.raises(UserError) as raised:
        contract.compare_fingerprints(span, {**span, 'examples': {'max_seq_len': 64, 'noise_density': 0.15}}, True)
    assert 'max_seq_len 128 -> 64' in raised.value.message and '--init_from' in raised.value.fix


def test_a_state_of_the_version_before_the_contract_still_loads(tmp_path, tokenizer):
    model, optimizer, scheduler, counters, position, parts = live_run(tokenizer)
    train_steps(model, optimizer, scheduler, tokenizer, 2)
    counters.global_step, position.rows = 2, 16
    path = save(parts, tokenizer, tmp_path / 'states', 2)
    # as that version left it: the schedule and the position pickled by accelerate, the counters in train_state.json
    torch.save(scheduler.state_dict(), os.path.join(path, 'custom_checkpoint_0.pkl'))
    torch.save(position.state_dict(), os.path.join(path, 'custom_checkpoint_1.pkl'))
    os.rename(os.path.join(path, 'counters.json'), os.path.join(path, 'train_state.json'))
    for name in ('schedule.json', 'data_position.json'):
        os.remove(os.path.join(path, name))
    remark(path, 2)
    # a user's folder linked into the state (foreign: never loaded, never deleted)
    mine = tmp_path / 'mine'
    mine.mkdir()
    (mine / 'thesis.txt').write_text('mine')
    os.symlink(mine, os.path.join(path, 'my_link'))
    before = {n: open(os.path.join(path, n), 'rb').read() for n in os.listdir(path)
              if os.path.isfile(os.path.join(path, n)) and not os.path.islink(os.path.join(path, n))}
    views = set(glob.glob(os.path.join(tempfile.gettempdir(), '.chat_small_t5-state-view-*')))
    saved = contract.inspect(str(tmp_path / 'states'), resume=True).resume
    assert saved is not None and saved.parts['data_position'] == {'rows': 16}
    *_, scheduler2, counters2, position2, parts2 = live_run(tokenizer)
    parts2.load_all_ranks(saved)
    assert counters2.global_step == 2 and position2.rows == 16
    assert scheduler2.state_dict() == scheduler.state_dict()
    # the engine's parts were read through a temporary folder of links: gone, and nothing behind any
    # link (the state's files, the user's folder) changed or went with it
    assert set(glob.glob(os.path.join(tempfile.gettempdir(), '.chat_small_t5-state-view-*'))) == views
    assert (mine / 'thesis.txt').read_text() == 'mine' and os.path.islink(os.path.join(path, 'my_link'))
    assert all(open(os.path.join(path, n), 'rb').read() == data for n, data in before.items())
