"""Packing (model/data/packing.py, model/net/chat_model.accept_packed_batches): every pair lands
in exactly one row, whole and in its own segment; a packed batch has the padded batch's loss and
gradients under both attention implementations; the loader packs without changing which pairs a
batch holds."""

from __future__ import annotations

import statistics

import numpy as np
import pytest
import torch

from config import T5ModelConfig
from model.data.batches import batch_from_ids, placeholder_batch, to_torch
from model.data.packing import first_fit, layout_cost, pack_batch, pack_rows
from model.data.tokenizer import LABEL_PAD_ID, PAD_ID
from model.net.chat_model import build_model, token_loss_sum

TINY = T5ModelConfig(d_model=32, num_heads=2, d_kv=16, d_ff=64, num_layers=2, num_decoder_layers=2, dropout_rate=0.0)
VOCAB = 50


def random_batch(rng, n: int, max_len: int, lens=None) -> dict:
    """A padded batch of n pairs with random lengths 1..max_len (eos = 1 last, ids 2..VOCAB-1)."""
    lens = lens if lens is not None else rng.integers(1, max_len + 1, size=(2, n))
    sides = []
    for side in lens:
        seqs = [np.append(rng.integers(2, VOCAB, size=k - 1), 1) for k in side]
        sides.append((np.concatenate(seqs).astype(np.int64), np.asarray(side, dtype=np.int64)))
    return batch_from_ids(sides[0], sides[1], np.arange(n, dtype=np.int64) * 7, 0, 1)


def unpack(packed: dict) -> list[tuple[list[int], list[int], list[int]]]:
    """(prompt, response, decoder input) of every segment, in row then segment order."""
    out = []
    for k in range(len(packed['input_ids'])):
        enc, dec = packed['encoder_segments'][k], packed['decoder_segments'][k]
        for s in range(1, int(enc.max()) + 1):
            assert np.ptp(np.flatnonzero(enc == s)) + 1 == (enc == s).sum()  # contiguous
            assert np.ptp(np.flatnonzero(dec == s)) + 1 == (dec == s).sum()
            out.append((packed['input_ids'][k][enc == s].tolist(), packed['labels'][k][dec == s].tolist(),
                        packed['decoder_input_ids'][k][dec == s].tolist()))
        assert set(np.unique(dec)) - {0} == set(np.unique(enc)) - {0}  # a prompt and its response share a row
    return out


@pytest.mark.parametrize('seed', range(5))
def test_every_pair_lands_once_whole_and_in_fewer_rows(seed):
    rng = np.random.default_rng(seed)
    length = int(rng.integers(4, 40))
    batch = random_batch(rng, int(rng.integers(1, 80)), length)
    packed = pack_batch(batch, length)
    pairs = [(batch['input_ids'][i][batch['attention_mask'][i] == 1].tolist(),
              batch['labels'][i][batch['labels'][i] != LABEL_PAD_ID].tolist()) for i in range(len(batch['input_ids']))]
    segments = unpack(packed)
    assert sorted((p, r) for p, r, _ in segments) == sorted(pairs)
    for _, response, decoder_in in segments:  # each response shifted right behind the start token
        assert decoder_in == [PAD_ID] + response[:-1]
    assert packed['input_ids'].shape[1] <= length and packed['labels'].shape[1] <= length
    assert len(packed['input_ids']) <= len(batch['input_ids'])
    # padding is padding on every side, the mask is the tokens
    assert ((packed['encoder_segments'] > 0) == (packed['attention_mask'] == 1)).all()
    assert (packed['input_ids'][packed['encoder_segments'] == 0] == PAD_ID).all()
    assert (packed['labels'][packed['decoder_segments'] == 0] == LABEL_PAD_ID).all()
    # the batch's bookkeeping is the pairs', not the rows'
    assert packed['num_rows'] == batch['num_rows'] and (packed['row_index'] == batch['row_index']).all()


@pytest.mark.parametrize('seed', range(12))
def test_first_fit_scanned_in_numpy_finds_the_same_rows(seed, monkeypatch):
    """Large batches scan the rows in numpy: for any lengths, caps and order, the Python scan's rows."""
    from model.data import packing

    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 700))
    p_, r_ = rng.integers(1, 80, n).tolist(), rng.integers(1, 300, n).tolist()
    order = rng.permutation(n).tolist() if seed % 2 else sorted(range(n), key=lambda i: -(p_[i] + r_[i]))
    in_numpy = {c: packing.first_fit(p_, r_, order, *c) if n >= packing.SCAN_IN_NUMPY_FROM
                else packing._first_fit_arrays(p_, r_, order, *c)
                for c in ((max(p_), max(r_)), (2 * max(p_), 2 * max(r_)), (512, 512))}
    monkeypatch.setattr(packing, 'SCAN_IN_NUMPY_FROM', 10**9)  # the Python scan, at any size
    for caps, rows in in_numpy.items():
        assert rows == packing.first_fit(p_, r_, order, *caps)
        assert sorted(i for row in rows for i in row) == list(range(n))


def test_rows_are_filled_first_fit():
    order = [0, 3, 2, 1]
    assert first_fit([3, 1, 2, 2], [3, 1, 1, 2], order, 4, 4) == [[0, 1], [3, 2]]
    assert first_fit([4, 4], [1, 1], [0, 1], 4, 4) == [[0], [1]]  # the prompts do not fit one row
    with pytest.raises(ValueError, match='longer than the packed length'):
        pack_rows(np.array([5]), np.array([1]), 4)


@pytest.mark.parametrize('seed', range(30))
def test_packing_never_computes_more_than_padding(seed):
    """Whatever the lengths (short prompts and long answers, equal lengths, long rows): the layout
    kept has no more positions and no more attention cells than the padded batch, is no worse
    than first fit at 1x caps, and holds every pair once."""
    rng = np.random.default_rng(seed)
    n, length = int(rng.integers(1, 70)), int(rng.integers(8, 512))
    kind = seed % 3
    if kind == 0:  # short prompts, long answers
        p, r = rng.integers(1, max(2, length // 4), size=n), rng.integers(1, length + 1, size=n)
    elif kind == 1:  # all alike, as length grouping makes them
        k = int(rng.integers(1, length // 4 + 1))
        p, r = np.full(n, k), np.full(n, k)
    else:
        p, r = rng.integers(1, length + 1, size=n), rng.integers(1, length + 1, size=n)
    rows = pack_rows(p, r, length)
    assert sorted(i for row in rows for i in row) == list(range(n))
    assert all(sum(p[i] for i in row) <= length and sum(r[i] for i in row) <= length for row in rows)
    p_, r_ = p.tolist(), r.tolist()
    positions, cells = layout_cost(rows, p_, r_)
    padded = layout_cost([[i] for i in range(n)], p_, r_)
    assert positions <= padded[0] and cells <= padded[1]
    order = sorted(range(n), key=lambda i: -(p_[i] + r_[i]))
    assert positions <= layout_cost(first_fit(p_, r_, order, max(p_), max(r_)), p_, r_)[0]


@pytest.mark.parametrize('seed', range(30))
@pytest.mark.parametrize('width', [32, 128, 768])
def test_with_the_model_width_the_cheapest_layout_is_kept(seed, width):
    """An attention cell weighs 1/width of a position: the layout kept costs no more than the
    padded batch or first fit at 1x caps, and holds every pair once."""
    rng = np.random.default_rng(seed)
    n, length = int(rng.integers(1, 70)), int(rng.integers(8, 512))
    p, r = rng.integers(1, length // (1 + seed % 4) + 1, size=n), rng.integers(1, length + 1, size=n)
    p_, r_ = p.tolist(), r.tolist()

    def cost(rows):
        positions, cells = layout_cost(rows, p_, r_)
        return positions + cells / width

    rows = pack_rows(p, r, length, width)
    assert sorted(i for row in rows for i in row) == list(range(n))
    order = sorted(range(n), key=lambda i: -(p_[i] + r_[i]))
    assert cost(rows) <= cost([[i] for i in range(n)])
    assert cost(rows) <= cost(first_fit(p_, r_, order, max(p_), max(r_)))


def test_alike_pairs_are_not_packed_into_long_rows():
    """16 pairs of 64 + 64 tokens at max length 1024: one row of 1024 would compute as many
    positions and 16x the attention (the review measured 0.30 s -> 1.88 s a step); they stay a
    row each, by either rule. Short rows of a narrow model, where attention is cheap, do pack."""
    for width in (0, 128, 768):
        assert len(pack_rows(np.full(16, 64), np.full(16, 64), 1024, width)) == 16
    rng = np.random.default_rng(0)  # the numbers task's shape: 64 pairs of 3-12 and 2-8 tokens, max length 32
    assert len(pack_rows(rng.integers(3, 13, 64), rng.integers(2, 9, 64), 32, 128)) < 40


def test_a_placeholder_batch_is_left_as_it_is():
    empty = batch_from_ids((np.zeros(0, np.int64), np.zeros(0, np.int64)),
                           (np.zeros(0, np.int64), np.zeros(0, np.int64)), None, 3, 1)
    assert pack_batch(empty, 8) is empty
    assert 'decoder_segments' not in pack_batch(empty, 8)
    assert 'decoder_segments' not in placeholder_batch(1)


@pytest.mark.parametrize('attention', ['sdpa', 'eager'])
@pytest.mark.parametrize('seed', [0, 1])
def test_a_packed_batch_has_the_padded_batch_loss_and_gradients(attention, seed):
    torch.manual_seed(seed)
    model = build_model(TINY, VOCAB)
    model.config._attn_implementation = attention
    rng = np.random.default_rng(seed)
    # lengths that fill a row exactly, one-token pairs, and a mix
    lens = np.array([[12, 1, 5, 7, 3, 1, 12, 2, 9, 4], [1, 12, 6, 2, 8, 1, 12, 3, 2, 10]])
    batch = random_batch(rng, lens.shape[1], 12, lens)
    packed = pack_batch(batch, 12)
    assert len(packed['input_ids']) < len(batch['input_ids'])

    def loss_and_grads(b):
        model.zero_grad()
        loss = token_loss_sum(model, to_torch(b), 'cpu')
        loss.backward()
        return float(loss.detach()), [p.grad.clone() for p in model.parameters()]

    padded_loss, padded_grads = loss_and_grads(batch)
    packed_loss, packed_grads = loss_and_grads(packed)
    assert np.isfinite(packed_loss)
    assert packed_loss == pytest.approx(padded_loss, rel=1e-5)
    for a, b in zip(padded_grads, packed_grads):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5 * float(a.abs().max()) + 1e-8)


def test_a_packed_pair_does_not_see_its_neighbours():
    """Change one pair's tokens: the loss of the other pairs in its row stays what it was."""
    torch.manual_seed(0)
    model = build_model(TINY, VOCAB).eval()
    rng = np.random.default_rng(3)
    batch = random_batch(rng, 6, 10, np.array([[9, 3, 3, 3, 3, 3], [6, 2, 2, 2, 2, 2]]))
    packed = pack_batch(batch, 10)
    assert packed['encoder_segments'].max(1).tolist() == [1, 3, 2]  # the long pair alone, then 3 and 2

    def per_token(b):
        t = to_torch(b)
        with torch.no_grad():
            logits = model(input_ids=t['input_ids'], decoder_input_ids=t['decoder_input_ids'],
                           encoder_segments=t['encoder_segments'], decoder_segments=t['decoder_segments']).logits
        return torch.nn.functional.cross_entropy(logits.transpose(1, 2), t['labels'].clamp(min=0), reduction='none')

    before = per_token(packed)
    changed = dict(packed, input_ids=packed['input_ids'].copy())
    first = packed['encoder_segments'][1] == 1
    changed['input_ids'][1][first] = (changed['input_ids'][1][first] + 5) % VOCAB
    after = per_token(changed)
    segments = torch.as_tensor(packed['decoder_segments'][1])
    assert torch.equal(before[1][segments > 1], after[1][segments > 1])
    assert not torch.equal(before[1][segments == 1], after[1][segments == 1])
    assert torch.equal(before[0], after[0]) and torch.equal(before[2], after[2])


def test_a_saved_packing_model_is_a_plain_t5(tmp_path):
    from transformers import T5ForConditionalGeneration

    model = build_model(TINY, VOCAB)
    model.save_pretrained(tmp_path)
    loaded = T5ForConditionalGeneration.from_pretrained(tmp_path)
    assert not getattr(loaded, '_accepts_packed_batches', False)
    ids = torch.tensor([[5, 6, 1]])
    torch.testing.assert_close(loaded(input_ids=ids, decoder_input_ids=ids).logits,
                               model(input_ids=ids, decoder_input_ids=ids).logits)


@pytest.mark.parametrize('grouped', [False, True])
def test_the_loader_packs_the_same_pairs_in_the_same_order(tmp_path, tokenizer, grouped):
    from conftest import make_texts, write_parquet
    from model.data.loader import LoaderSettings, StreamingLoader

    path = write_parquet(tmp_path / 'train.parquet', make_texts(150, seed=5, min_len=1, max_len=40), row_group_size=40)

    def batches(packing, **kw):
        settings = LoaderSettings(max_seq_len=48, batch_size=8, shuffle_window_rows=64, group_by_length=grouped,
                                  length_group_batches=4, drop_last=False, packing=packing, **kw)
        return list(StreamingLoader([path], tokenizer, settings, return_row_index=True))

    plain, packed = batches(False), batches(True)
    assert len(plain) == len(packed)
    def computed(batches):
        return sum(b['input_ids'].numel() + b['labels'].numel() for b in batches)

    assert computed(packed) <= computed(plain) if grouped else computed(packed) < 0.9 * computed(plain)
    for a, b in zip(plain, packed):
        assert 'decoder_segments' in b and 'decoder_segments' not in a
        assert torch.equal(a['row_index'], b['row_index']) and a['num_rows'] == b['num_rows']
        assert int((a['labels'] != LABEL_PAD_ID).sum()) == int((b['labels'] != LABEL_PAD_ID).sum())
        assert int(a['attention_mask'].sum()) == int(b['attention_mask'].sum())
        assert b['input_ids'].shape[1] <= 48 and b['labels'].shape[1] <= 48
    # a worker process packs what the main process would
    in_worker = batches(True, num_workers=1)
    for a, b in zip(packed, in_worker):
        for key in ('input_ids', 'labels', 'decoder_input_ids', 'encoder_segments', 'decoder_segments'):
            assert torch.equal(a[key], b[key])


@pytest.mark.slow
def test_training_packed_follows_training_padded(tmp_path, tokenizer_dir):
    """The same run (no dropout) packed and padded: the same losses step by step and the same
    weights at the end, to float rounding; the packed one computes far less padding."""
    from conftest import assert_same_weights, logged_losses, make_texts, run_train, tiny_flags, write_parquet

    data = {'train': write_parquet(tmp_path / 'train.parquet', make_texts(480, seed=11, min_len=1, max_len=60),
                                   row_group_size=100),
            'valid': write_parquet(tmp_path / 'valid.parquet', make_texts(64, seed=12, min_len=1, max_len=60)),
            'tok': tokenizer_dir}
    runs = {}
    for packing in (False, True):
        out = tmp_path / f'packing_{packing}'
        r = run_train(tiny_flags(data, out, dropout_rate=0.0, packing=packing, save_steps=1000, eval_steps=0,
                                          max_seq_len=48, group_by_length=False))
        assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
        runs[packing] = (out, logged_losses(out))
    (plain_out, plain), (packed_out, packed) = runs[False], runs[True]
    assert plain.keys() == packed.keys() and len(plain) >= 50
    for step in plain:
        assert packed[step] == pytest.approx(plain[step], rel=2e-3, abs=2e-3)
    assert_same_weights(f'{plain_out}/final/model.safetensors', f'{packed_out}/final/model.safetensors', atol=2e-3)

    def filled(out):  # the share of computed positions that held a token, as the log reports it
        import re

        from conftest import run_logs

        return [int(x) for x in re.findall(r'(\d+)% filled', open(run_logs(out)[-1], encoding='utf-8').read())]

    assert statistics.median(filled(packed_out)) > statistics.median(filled(plain_out)) + 10


def test_a_model_without_the_hooks_is_refused_a_packed_batch():
    """transformers ignores arguments it does not know: without the hooks the pairs would mix."""
    from transformers import T5ForConditionalGeneration

    from model.net.chat_model import build_t5_config

    plain = T5ForConditionalGeneration(build_t5_config(TINY, VOCAB))
    rng = np.random.default_rng(0)
    packed = pack_batch(random_batch(rng, 8, 12, np.array([[12, 2, 2, 2, 2, 2, 2, 2], [12, 2, 2, 2, 2, 2, 2, 2]])), 12)
    assert 'decoder_segments' in packed and packed['encoder_segments'].max() > 1
    with pytest.raises(RuntimeError, match='accept_packed_batches'):
        token_loss_sum(plain, to_torch(packed), 'cpu')

    class Wrapper(torch.nn.Module):  # as DDP holds the model: .module, forward passed through
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, **kwargs):
            return self.module(**kwargs)

    model = build_model(TINY, VOCAB)
    with torch.no_grad():
        assert float(token_loss_sum(Wrapper(model), to_torch(packed), 'cpu')) == float(
            token_loss_sum(model, to_torch(packed), 'cpu'))
