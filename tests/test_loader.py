"""The streaming pipeline: exactly-once coverage, a world-size-free order, exact resume,
tokenization, skipping and padding. Ranks are simulated in-process (one loader per rank),
except in the 2-process test."""

from __future__ import annotations

import itertools
import json
import os
import pickle
import socket

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from model.errors import UserError
from conftest import make_texts, write_parquet
from model.data.epoch_order import length_group_order
from model.data.batches import TokenEncoder
from model.data.loader import LoaderSettings, StreamingLoader

MAX_LEN = 32


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    """Two datasets; `texts` are their rows in global row order (files sorted, then rows)."""
    d = tmp_path_factory.mktemp('data')
    one = make_texts(203, seed=11)
    write_parquet(d / 'one.parquet', one)  # a single row group: fewer row groups than shards
    folder = d / 'folder'
    folder.mkdir()
    parts = [make_texts(150, seed=12), make_texts(77, seed=13), make_texts(31, seed=14)]
    for name, pairs, rg in zip(('a', 'b', 'c'), parts, (40, None, 7)):
        write_parquet(folder / f'{name}.parquet', pairs, row_group_size=rg)
    return {'one': (str(d / 'one.parquet'), one),
            'folder': (str(folder), [p for part in parts for p in part])}


def make_loader(files, tokenizer, **kw):
    args = dict(max_seq_len=MAX_LEN, batch_size=4, shuffle_window_rows=64, return_row_index=True,
                drop_last=False)
    args.update(kw)
    own = {k: args.pop(k) for k in ('rank', 'world_size', 'return_row_index', 'multiprocessing_context') if k in args}
    return StreamingLoader(files, tokenizer, LoaderSettings(**args), **own)


def rows_of(batches) -> list[int]:
    return [i for b in batches for i in b['row_index'].tolist()]


def flat_sequence(files, tokenizer, **kw) -> list[int]:
    """The epoch's global row order, read with one rank."""
    return rows_of(list(make_loader(files, tokenizer, world_size=1, rank=0, **kw)))


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            if torch.is_tensor(x[k]):
                assert torch.equal(x[k], y[k]), k
            else:
                assert x[k] == y[k], k


# --------------------------------------------------------------------------- coverage


@pytest.mark.slow
@pytest.mark.parametrize('workers', [0, 2])
@pytest.mark.parametrize('world', [1, 2, 3])
@pytest.mark.parametrize('which', ['one', 'folder'])
def test_every_row_exactly_once_across_ranks_and_workers(data, tokenizer, which, world, workers):
    files, texts = data[which]
    flat = flat_sequence(files, tokenizer)
    assert sorted(flat) == list(range(len(texts)))
    seen = []
    g = 4 * world
    for rank in range(world):
        batches = list(make_loader(files, tokenizer, rank=rank, world_size=world, num_workers=workers))
        for j, b in enumerate(batches):  # rank r's batch j is its slice of global batch j
            assert b['row_index'].tolist() == flat[j * g + rank * 4: j * g + rank * 4 + 4]
        seen += rows_of(batches)
    assert sorted(seen) == list(range(len(texts)))


def test_batches_hold_the_tokens_of_their_rows(data, tokenizer):
    files, texts = data['folder']
    for b in make_loader(files, tokenizer, batch_size=8):
        rows = b['row_index'].tolist()
        want = tokenizer([texts[i][0] for i in rows], truncation=True, max_length=MAX_LEN,
                         padding='longest', return_tensors='pt')
        assert torch.equal(b['input_ids'], want['input_ids'])
        assert torch.equal(b['attention_mask'], want['attention_mask'].long())
        labels = tokenizer([texts[i][1] for i in rows], truncation=True, max_length=MAX_LEN,
                           padding='longest', return_tensors='pt')['input_ids']
        assert torch.equal(b['labels'], labels.masked_fill(labels == 0, -100))
        assert b['input_ids'].dtype == b['labels'].dtype == torch.int64
        assert b['num_rows'] == len(rows) and b['num_skipped'] == 0


def test_drop_last_gives_full_steps_and_lockstep(data, tokenizer):
    files, texts = data['folder']  # 258 rows; G * accumulation = 4 * 3 * 2 = 24 -> 240 rows
    loaders = [make_loader(files, tokenizer, rank=r, world_size=3, accumulation=2, drop_last=True)
               for r in range(3)]
    per_rank = [list(ld) for ld in loaders]
    assert [len(b) for b in per_rank] == [20, 20, 20] == [len(ld) for ld in loaders]
    assert loaders[0].steps_per_epoch() == 10 and loaders[0].rows_per_epoch() == 240
    seen = [i for batches in per_rank for i in rows_of(batches)]
    assert len(seen) == len(set(seen)) == 240
    assert all(b['input_ids'].shape[0] == 4 for batches in per_rank for b in batches)


def test_len_matches_iteration_when_the_tail_is_short(data, tokenizer):
    files, texts = data['one']  # 203 rows, G = 12: the last global batch has 11 rows
    for rank in range(3):
        ld = make_loader(files, tokenizer, rank=rank, world_size=3)
        batches = list(ld)
        assert len(ld) == len(batches) == 17
        assert [b['num_rows'] for b in batches[-1:]] == [[4, 4, 3][rank]]
    ld = make_loader(files, tokenizer, batch_size=10, rank=1, world_size=2)  # G = 20: 200 + 3
    assert len(ld) == len(list(ld)) == 10  # rank 1 gets no final batch


# --------------------------------------------------------------------------- order


def test_order_depends_on_seed_and_epoch_only(data, tokenizer):
    files, texts = data['folder']
    base = flat_sequence(files, tokenizer, seed=5)
    assert base == flat_sequence(files, tokenizer, seed=5)
    assert base == flat_sequence(files, tokenizer, seed=5, num_workers=2, batch_size=3)
    assert base != flat_sequence(files, tokenizer, seed=6)
    ld = make_loader(files, tokenizer, seed=5)
    ld.set_epoch(1)
    epoch1 = rows_of(list(ld))
    assert epoch1 != base and sorted(epoch1) == sorted(base)
    assert flat_sequence(files, tokenizer, shuffle=False) == list(range(len(texts)))


def test_two_ranks_of_4_see_the_rows_of_one_rank_of_8(data, tokenizer):
    files, _ = data['folder']
    one = list(make_loader(files, tokenizer, batch_size=8))
    two = [list(make_loader(files, tokenizer, batch_size=4, rank=r, world_size=2)) for r in range(2)]
    assert len(one) == len(two[0]) == len(two[1]) + 1  # 258 rows: rank 1 has no 33rd batch
    for i, b in enumerate(one):
        halves = [two[r][i]['row_index'].tolist() if i < len(two[r]) else [] for r in range(2)]
        assert b['row_index'].tolist() == halves[0] + halves[1]


def test_length_grouping_order_does_not_depend_on_world_size(data, tokenizer):
    files, texts = data['folder']
    kw = dict(group_by_length=True, length_group_batches=4)
    flat = flat_sequence(files, tokenizer, **kw)
    assert sorted(flat) == list(range(len(texts)))
    assert flat != flat_sequence(files, tokenizer)
    for world in (2, 3):
        for rank in range(world):
            for j, b in enumerate(make_loader(files, tokenizer, rank=rank, world_size=world, **kw)):
                s = j * 4 * world + rank * 4
                assert b['row_index'].tolist() == flat[s:s + 4]


def test_length_group_order_sorts_blocks_and_keeps_the_partial_block_last():
    lengths = np.array([5, 1, 9, 3, 7, 2, 8, 4, 6, 10, 0])
    order = length_group_order(lengths, np.zeros_like(lengths), 4, np.random.default_rng(0))
    assert sorted(order.tolist()) == list(range(11))
    blocks = [lengths[order[i:i + 4]] for i in (0, 4)]
    assert sorted(np.concatenate(blocks).tolist()) == sorted(lengths[np.argsort(lengths)][:8].tolist())
    assert all(list(b) == sorted(b) for b in blocks)
    assert lengths[order[8:]].tolist() == [8, 9, 10]  # the longest rows, in the partial block


def test_the_two_stage_sort_pads_less_than_one_length():
    rng = np.random.default_rng(3)
    prompt, response = rng.integers(1, 60, 2048), np.minimum(rng.integers(1, 200, 2048), 128)

    def pad(order):
        b = order[:len(order) // 16 * 16].reshape(-1, 16)
        real = prompt[b].sum() + response[b].sum()
        return 1 - real / (16 * (prompt[b].max(1) + response[b].max(1))).sum()

    two = length_group_order(prompt, response, 16, np.random.default_rng(0))
    one = length_group_order(prompt, response, 16, np.random.default_rng(0), chunk_batches=1)
    assert sorted(two.tolist()) == list(range(2048))
    assert pad(two) < 0.8 * pad(one) and pad(two) < 0.5 * pad(rng.permutation(2048))


def test_grouping_lowers_the_pad_fraction(tmp_path, tokenizer):
    short, long_ = make_texts(300, seed=3, max_len=12), make_texts(300, seed=4, min_len=80, max_len=240)
    pairs = [p for two in zip(short, long_) for p in two]
    f = write_parquet(tmp_path / 'skew.parquet', pairs, row_group_size=100)

    def pad_fraction(grouped):
        real = total = 0
        for b in make_loader(f, tokenizer, batch_size=8, max_seq_len=128, group_by_length=grouped,
                             length_group_batches=8, shuffle_window_rows=600):
            for key in ('attention_mask', 'labels'):
                mask = b[key] != (-100 if key == 'labels' else 0)
                real, total = real + int(mask.sum()), total + mask.numel()
        return 1 - real / total

    plain, grouped = pad_fraction(False), pad_fraction(True)
    assert grouped < 0.5 * plain, (plain, grouped)


# --------------------------------------------------------------------------- resume


@pytest.mark.parametrize('workers', [0, 2])
def test_resume_mid_epoch_equals_the_uninterrupted_run(data, tokenizer, workers):
    files, _ = data['one']
    kw = dict(group_by_length=True, length_group_batches=3, drop_last=True, world_size=2, rank=1,
              seed=7, num_workers=workers)
    full = make_loader(files, tokenizer, **kw)
    reference = list(full) + list(full)  # epochs 0 and 1
    assert full.epoch == 2 and full.rows_consumed == 0
    for k in (0, 10):  # 10 x 8 rows: the resume point lies inside the single row group
        first = make_loader(files, tokenizer, **kw)
        head = list(itertools.islice(first, k))  # takes k batches, draws no (k+1)-th
        state = first.state_dict()
        assert state['epoch'] == 0 and state['rows_consumed'] == k * 8
        resumed = make_loader(files, tokenizer, **kw)
        resumed.load_state_dict(json.loads(json.dumps(state)))  # the state survives JSON
        rest = list(resumed)
        assert resumed.epoch == 1
        rest += list(resumed)
        assert_batches_equal(head + rest, reference)


def test_resume_after_the_last_batch_moves_to_the_next_epoch(data, tokenizer):
    files, _ = data['one']
    ld = make_loader(files, tokenizer, drop_last=True)
    n = 0
    for _ in ld:
        n += 1
        if n == len(ld):
            state = ld.state_dict()
    assert state['epoch'] == 0 and state['rows_consumed'] == ld.rows_per_epoch()
    resumed = make_loader(files, tokenizer, drop_last=True)
    resumed.load_state_dict(state)
    assert list(resumed) == [] and (resumed.epoch, resumed.rows_consumed) == (1, 0)
    resumed.set_epoch(1)  # a trainer calling set_epoch for the current epoch keeps the position
    nxt = make_loader(files, tokenizer, drop_last=True)
    nxt.set_epoch(1)
    assert_batches_equal(list(resumed), list(nxt))


@pytest.mark.parametrize('drop_last', [False, True])
@pytest.mark.parametrize('new_world', [1, 3])
def test_resume_on_another_world_size_neither_repeats_nor_skips(data, tokenizer, new_world, drop_last):
    files, texts = data['folder']
    kw = dict(group_by_length=True, length_group_batches=2, seed=3, drop_last=drop_last)
    flat = flat_sequence(files, tokenizer, **{**kw, 'drop_last': False})
    before, states = [], []
    for rank in range(2):
        ld = make_loader(files, tokenizer, rank=rank, world_size=2, **kw)
        for j, b in enumerate(ld):
            before += b['row_index'].tolist()
            if j == 4:
                break
        states.append(ld.state_dict())
    assert states[0] == states[1] and states[0]['rows_consumed'] == 40
    after = {}
    for rank in range(new_world):
        ld = make_loader(files, tokenizer, rank=rank, world_size=new_world, **kw)
        ld.load_state_dict(states[0])
        after[rank] = [b['row_index'].tolist() for b in ld]
        assert ld.epoch == 1
    counts = {len(v) for v in after.values()}
    if drop_last:
        assert len(counts) == 1  # lockstep
    g = 4 * new_world
    resumed = [i for j in range(max(counts)) for r in range(new_world)
               for i in (after[r][j] if j < len(after[r]) else [])]
    assert sorted(before) == sorted(flat[:40])
    end = len(texts) if not drop_last else 40 + (len(texts) - 40) // g * g
    assert resumed == flat[40:end]
    if not drop_last:
        assert sorted(before + resumed) == list(range(len(texts)))


def test_a_new_batch_size_keeps_the_saved_order_until_the_epoch_ends(data, tokenizer, caplog):
    """The rows keep the saved order to the epoch's end; the batches take the new size at once, and
    the log says both (it said 'batch_size 4 -> 8 from epoch 1 on', read as the batch size's)."""
    import logging

    files, _ = data['folder']
    kw = dict(group_by_length=True, length_group_batches=2, seed=9)
    flat4 = flat_sequence(files, tokenizer, batch_size=4, **kw)
    old = make_loader(files, tokenizer, batch_size=4, **kw)
    for j, _ in enumerate(old):
        if j == 4:
            break
    new = make_loader(files, tokenizer, batch_size=8, **kw)
    with caplog.at_level(logging.INFO):
        new.load_state_dict(old.state_dict())
    assert 'keeps its rows in the saved order' in caplog.text and 'batches take the new size now' in caplog.text
    batches = list(new)
    assert rows_of(batches) == flat4[20:] and len(batches[0]['row_index']) == 8
    fresh = make_loader(files, tokenizer, batch_size=8, **kw)
    fresh.set_epoch(1)
    assert_batches_equal(list(new), list(fresh))
    assert new.state_dict()['batch_size'] == 8


# --------------------------------------------------------------------------- tokens


def test_truncation_keeps_eos_and_never_exceeds_max_seq_len(tmp_path, tokenizer):
    pairs = make_texts(64, seed=21, min_len=100, max_len=400)
    f = write_parquet(tmp_path / 'long.parquet', pairs)
    for b in make_loader(f, tokenizer, max_seq_len=16, batch_size=16):
        for key, pad in (('input_ids', 0), ('labels', -100)):
            ids = b[key]
            assert ids.shape[1] <= 16
            lengths = (ids != pad).sum(1)
            assert (ids[torch.arange(len(ids)), lengths - 1] == 1).all()  # eos is last
        want = tokenizer([pairs[i][1] for i in b['row_index'].tolist()], truncation=True, max_length=16,
                         padding='longest', return_tensors='pt')['input_ids']
        assert torch.equal(b['labels'], want.masked_fill(want == 0, -100))


@pytest.mark.parametrize('start', ['spawn', 'forkserver'])
def test_encoder_survives_pickling_and_spawned_workers(data, tokenizer, start):
    """Workers started by spawn or a forkserver (Python 3.14's default on Linux) serve the same
    batches: their worker_init (die with the main process) tells their parent right."""
    enc = TokenEncoder(tokenizer, MAX_LEN)
    texts = [a for pair in data['one'][1][:50] for a in pair]
    copy = pickle.loads(pickle.dumps(enc))
    assert copy.encode(texts) == enc.encode(texts)
    files, _ = data['one']
    spawned = make_loader(files, tokenizer, num_workers=1, multiprocessing_context=start)
    assert_batches_equal(list(spawned), list(make_loader(files, tokenizer)))


def test_blank_rows_are_skipped_and_counted(tmp_path, tokenizer):
    good = make_texts(10, seed=8)
    blanks = [(None, 'x'), ('', '回答'), ('问题', None), ('  ', '答'), ('问', '\u3000\n'), ('\t', ' ')]
    pairs = [good[0], good[1], *blanks[:2], good[2], *blanks[2:], *good[3:]]  # 16 rows
    table = pa.table({'prompt': [p for p, _ in pairs], 'response': [r for _, r in pairs]})
    pq.write_table(table, tmp_path / 'blank.parquet')
    batches = list(make_loader(str(tmp_path / 'blank.parquet'), tokenizer, shuffle=False, batch_size=3))
    assert sum(b['num_skipped'] for b in batches) == 6
    assert sum(b['num_rows'] for b in batches) == 10
    placeholder = batches[2]  # rows 6..8: all blank
    assert placeholder['num_rows'] == 0 and placeholder['num_skipped'] == 3
    assert placeholder['input_ids'].tolist() == [[1]] and placeholder['attention_mask'].tolist() == [[1]]
    assert placeholder['labels'].tolist() == [[-100]]
    kept = rows_of(batches)
    assert kept == [0, 1, 4, *range(9, 16)]
    for b in batches:
        assert b['input_ids'].shape[0] == max(b['num_rows'], 1)


def test_missing_files_and_columns_are_user_errors(tmp_path, tokenizer):
    with pytest.raises(UserError, match='no such file'):
        make_loader(str(tmp_path / 'nope.parquet'), tokenizer)
    pq.write_table(pa.table({'question': ['a'], 'response': ['b']}), tmp_path / 'bad.parquet')
    with pytest.raises(UserError, match="missing column 'prompt'"):
        make_loader(str(tmp_path / 'bad.parquet'), tokenizer)


# --------------------------------------------------------------------------- 2 processes


def _two_process_worker(index, port, files, tokenizer_dir, out):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port), RANK=str(index), LOCAL_RANK=str(index),
                      WORLD_SIZE='2', LOCAL_WORLD_SIZE='2')
    import torch.distributed as dist
    from accelerate import PartialState

    from model.data.tokenizer import load_tokenizer

    state = PartialState(cpu=True)
    tok = load_tokenizer(tokenizer_dir)
    result = {}
    for drop_last in (False, True):
        settings = LoaderSettings(MAX_LEN, 4, shuffle_window_rows=64, drop_last=drop_last)
        loader = StreamingLoader(files, tok, settings, rank=state.process_index, world_size=state.num_processes,
                                 return_row_index=True)
        result[str(drop_last)] = [b['row_index'].tolist() for b in loader]
    gathered = [None] * state.num_processes
    dist.all_gather_object(gathered, {'rank': state.process_index, 'world': state.num_processes, **result})
    if state.is_main_process:
        with open(out, 'w') as f:
            json.dump(gathered, f)
    state.wait_for_everyone()
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_get_disjoint_rows_covering_everything(data, tokenizer_dir, tmp_path):
    files, texts = data['folder']
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    out = tmp_path / 'rows.json'
    torch.multiprocessing.start_processes(_two_process_worker, args=(port, files, tokenizer_dir, str(out)),
                                          nprocs=2, start_method='spawn')
    ranks = json.loads(out.read_text())
    assert [(r['rank'], r['world']) for r in ranks] == [(0, 2), (1, 2)]
    rows = [[i for b in r['False'] for i in b] for r in ranks]
    assert not set(rows[0]) & set(rows[1])
    assert sorted(rows[0] + rows[1]) == list(range(len(texts)))
    full = [[i for b in r['True'] for i in b] for r in ranks]  # drop_last: lockstep, no repeats
    assert len(ranks[0]['True']) == len(ranks[1]['True'])
    assert len(set(full[0] + full[1])) == len(full[0]) + len(full[1]) == len(texts) // 8 * 8


# --------------------------------------------------------------------------- global mix


def label_file(tmp_path, labels=4, per_label=4096, row_group=1024):
    """A file sorted by a label (the label is the row's position // per_label)."""
    pairs = [(f'标签{i // per_label}问题{i}', f'回答{i}') for i in range(labels * per_label)]
    return write_parquet(tmp_path / 'sorted.parquet', pairs, row_group_size=row_group), per_label, labels


def label_shares(loader, per_label, labels):
    shares = []
    for b in loader:
        lab = np.asarray(b['row_index']) // per_label
        shares.append(np.bincount(lab, minlength=labels) / len(lab))
    return np.array(shares)


def test_a_file_sorted_by_a_label_trains_mixed(tmp_path, tokenizer):
    # the default shape scaled down: windows as large as a row group (65,536 rows each by default)
    f, per_label, labels = label_file(tmp_path)
    kw = dict(batch_size=64, shuffle_window_rows=1024, drop_last=True, max_seq_len=8, group_by_length=False)
    mixed = label_shares(make_loader(f, tokenizer, mix_row_groups=16, **kw), per_label, labels)
    single = label_shares(make_loader(f, tokenizer, mix_row_groups=1, **kw), per_label, labels)
    # every global batch of 64 rows holds every label within 0.25 of its share in the file (0.25):
    # a window takes 1/16 of its rows from each of 16 row groups, so a batch errs by sampling only
    # (sd 0.05); drawn from one row group at a time, a batch is a single label
    assert np.abs(mixed - 1 / labels).max() <= 0.25, np.abs(mixed - 1 / labels).max()
    assert (mixed > 0).all()
    assert np.abs(single - 1 / labels).max() == 0.75
    # still every row once, and the order does not depend on the world size
    flat = flat_sequence(f, tokenizer, mix_row_groups=16, shuffle_window_rows=1024)
    assert sorted(flat) == list(range(labels * per_label))
    two = [list(make_loader(f, tokenizer, rank=r, world_size=2, batch_size=2, mix_row_groups=16,
                            shuffle_window_rows=1024)) for r in range(2)]
    assert [i for j in range(len(two[0])) for r in range(2) if j < len(two[r])
            for i in two[r][j]['row_index'].tolist()] == flat


def test_the_mixing_reader_holds_a_bounded_number_of_rows(tmp_path, tokenizer):
    from model.data.epoch_order import EpochPlan, OrderParams
    from model.data.batches import TokenEncoder
    from model.data.loader import ParquetStreamDataset
    from model.data.window_reader import WindowReader

    f, per_label, labels = label_file(tmp_path, labels=8, per_label=4000, row_group=1000)  # 32 row groups
    ds = ParquetStreamDataset([f], TokenEncoder(tokenizer, 8))
    order = OrderParams(seed=1, shuffle=True, shuffle_window_rows=4096, group_by_length=False, length_group_batches=1,
                        batch_size=64, mix_row_groups=8)
    plan = EpochPlan(ds.row_groups, order, 0, ds.num_rows)
    reader = WindowReader([f], plan)
    held, seen = [], []
    for start in range(0, ds.num_rows, 64):
        positions = np.arange(start, min(start + 64, ds.num_rows))
        reader.release_below(start)
        seen += reader.take(positions)[1].tolist()
        held.append(sum(len(w.perm) for w in reader.loaded.values())
                    + sum(s[2].num_rows for s in reader._streams.values() if s[2] is not None))
    assert sorted(seen) == list(range(ds.num_rows))
    # two windows while a batch straddles them, plus one read-ahead batch per open row group
    # (window / mix rows, at least 1024): flat in the rows of the file (32,000 here)
    assert max(held) <= 2 * 4096 + 8 * 1024, max(held)
