"""T5's span corruption (model/data/span_corruption.py): lengths, noise statistics, sentinels, round trip."""

from __future__ import annotations

import numpy as np
import pytest

from model.data import span_corruption as sc

EOS = 1
SENTINELS = np.arange(1099, 999, -1)  # <extra_id_0> is the last id, as in T5


@pytest.mark.parametrize('max_seq_len', [32, 64, 192, 512])
def test_the_raw_length_is_the_longest_whose_corrupted_input_fills_the_sequence(max_seq_len):
    raw, target = sc.lengths_for(max_seq_len, 0.15, 3.0)
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, 999, raw)
    inputs, labels = sc.corrupt(tokens, sc.noise_mask(raw, 0.15, 3.0, rng), SENTINELS, EOS)
    assert len(inputs) == max_seq_len and len(labels) == target
    longer = sc.noise_mask(raw + 1, 0.15, 3.0, rng)
    assert len(sc.corrupt(rng.integers(3, 999, raw + 1), longer, SENTINELS, EOS)[0]) > max_seq_len
    if max_seq_len == 512:  # the T5 paper's figures: 568 raw tokens -> 512 inputs, 114 targets
        assert (raw, target) == (568, 114)


def test_noise_density_and_span_length_match_the_settings_over_many_examples():
    density, span, length = 0.15, 3.0, 200
    noise, spans = 0, 0
    for index in range(2000):
        mask = sc.noise_mask(length, density, span, sc.example_rng(7, 0, index))
        assert not mask[0]
        noise += int(mask.sum())
        spans += int((mask & ~np.concatenate([[False], mask[:-1]])).sum())
    assert abs(noise / (2000 * length) - density) < 0.005
    assert abs(noise / spans - span) < 0.1
    lengths = []
    mask = np.concatenate([sc.noise_mask(length, density, span, sc.example_rng(7, 1, i)) for i in range(500)])
    run = 0
    for m in mask:
        if m:
            run += 1
        elif run:
            lengths.append(run)
            run = 0
    assert 1 in lengths and max(lengths) > 6  # random lengths, not all equal to the mean


def test_sentinels_come_in_order_and_the_original_is_rebuilt():
    rng = np.random.default_rng(3)
    for _ in range(200):
        length = int(rng.integers(2, 300))
        tokens = rng.integers(3, 999, length)
        mask = sc.noise_mask(length, 0.15, 3.0, rng)
        inputs, target = sc.corrupt(tokens, mask, SENTINELS, EOS)
        used = [t for t in inputs.tolist() if t in set(SENTINELS.tolist())]
        assert used == SENTINELS[:len(used)].tolist()
        assert [t for t in target.tolist() if t in set(SENTINELS.tolist())] == used
        assert inputs[-1] == EOS and target[-1] == EOS
        assert len(inputs) + len(target) == length + 2 * len(used) + 2
        assert sc.uncorrupt(inputs, target, SENTINELS, EOS).tolist() == tokens.tolist()


def test_the_same_example_is_corrupted_the_same_way_and_others_differently():
    a = sc.noise_mask(100, 0.15, 3.0, sc.example_rng(1, 2, 3))
    assert (a == sc.noise_mask(100, 0.15, 3.0, sc.example_rng(1, 2, 3))).all()
    assert not (a == sc.noise_mask(100, 0.15, 3.0, sc.example_rng(1, 2, 4))).all()
    assert not (a == sc.noise_mask(100, 0.15, 3.0, sc.example_rng(1, 3, 3))).all()


def test_documents_are_packed_into_runs_in_order():
    docs = [np.arange(10), np.arange(100, 105), np.arange(200, 213)]
    runs = sc.pack(docs, 8)
    assert [len(r) for r in runs] == [8, 8, 8, 4]
    assert np.concatenate(runs).tolist() == np.concatenate(docs).tolist()
    assert [len(r) for r in sc.pack([np.arange(9)], 8)] == [8]  # a 1-token tail cannot be corrupted: dropped
