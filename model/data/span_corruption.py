"""T5's span corruption: the pretraining objective of the T5 paper, on raw text.

A run of ``raw_length`` tokens cut from concatenated documents is corrupted: ``noise_density`` of
its tokens, in spans of ``mean_noise_span_length`` tokens on average, are dropped from the input
and each span replaced by one sentinel (``<extra_id_0>``, ``<extra_id_1>``, ...); the target is
each sentinel followed by the tokens it replaced. Both end with eos. ``raw_length`` is chosen so
that the corrupted input is exactly ``max_seq_len`` tokens (the T5 reference's
``compute_input_and_target_lengths``), so inputs fill the sequence. The masks come from a numpy
Generator seeded by (seed, epoch, example index): the same example is corrupted the same way for
any number of ranks or workers, and again after a resume.

Pure numpy, no torch: model/data/loader.py turns the ids into batches.
"""

from __future__ import annotations

import numpy as np

SENTINEL_COUNT = 100  # T5's extra ids; model/data/span_stream.py refuses lengths that need more
_TAG = 4  # seed-stream tag of the noise masks (model/data/epoch_order.py uses 1-3)


def sentinel_token(i: int) -> str:
    return f'<extra_id_{i}>'


MAX_NOISE_DENSITY = 0.5  # above it a target outgrows its input (and, without a bound, memory)


def lengths_for(max_seq_len: int, noise_density: float, mean_noise_span_length: float) -> tuple[int, int]:
    """(raw tokens per example, target tokens) such that the corrupted input is at most
    max_seq_len tokens (eos included): the longest raw run whose input still fits, counted with
    :func:`noise_mask`'s own rules. ValueError when no run of two tokens fits."""
    def corrupted(raw: int) -> tuple[int, int]:
        noise = noise_count(raw, noise_density)
        spans = span_count(raw, noise_density, mean_noise_span_length)
        return raw - noise + spans + 1, noise + spans + 1

    if corrupted(2)[0] > max_seq_len:
        raise ValueError(f'max_seq_len={max_seq_len} is too short for span corruption (a run of 2 tokens '
                         f'corrupts to {corrupted(2)[0]})')
    raw = 2
    while corrupted(raw + 1)[0] <= max_seq_len:
        raw += 1
    return raw, corrupted(raw)[1]


def noise_count(length: int, noise_density: float) -> int:
    """Noise tokens of a run of ``length`` tokens: at least one, never all."""
    return min(max(int(round(length * noise_density)), 1), length - 1) if length >= 2 else 0


def span_count(length: int, noise_density: float, mean_noise_span_length: float) -> int:
    """Noise spans of a run of ``length`` tokens (as :func:`noise_mask` draws them)."""
    if length < 2:
        return 0
    noise = noise_count(length, noise_density)
    return min(max(1, int(round(noise / mean_noise_span_length))), noise, length - noise)


def noise_mask(length: int, noise_density: float, mean_noise_span_length: float,
               rng: np.random.Generator) -> np.ndarray:
    """Which of ``length`` tokens are noise: ``round(length * noise_density)`` of them (at least
    one, never all), in ``round(noise / mean span)`` spans (at least one), the spans and the
    gaps between them of random lengths, the first token never noise (as in T5)."""
    if length < 2:
        return np.zeros(length, dtype=bool)
    noise = noise_count(length, noise_density)
    spans = span_count(length, noise_density, mean_noise_span_length)

    def segments(items: int, count: int) -> np.ndarray:
        """``items`` cut into ``count`` non-empty parts at random."""
        cuts = np.sort(rng.choice(np.arange(1, items), size=count - 1, replace=False)) if count > 1 else []
        return np.diff(np.concatenate([[0], cuts, [items]])).astype(np.int64)

    noise_lengths, keep_lengths = segments(noise, spans), segments(length - noise, spans)
    mask = np.zeros(length, dtype=bool)
    position = 0
    for keep, span in zip(keep_lengths, noise_lengths):
        position += keep
        mask[position:position + span] = True
        position += span
    return mask


def example_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    return np.random.default_rng([_TAG, seed & 0xFFFF_FFFF_FFFF_FFFF, epoch, index])


def corrupt(tokens: np.ndarray, mask: np.ndarray, sentinel_ids: np.ndarray, eos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(input ids, target ids): each noise span replaced by the next sentinel in the input; the
    target lists each sentinel then the tokens it replaced; both end with eos."""
    starts = mask & ~np.concatenate([[False], mask[:-1]])  # first token of each noise span
    span_index = np.cumsum(starts) - 1
    if span_index.size and span_index.max() >= len(sentinel_ids):
        raise ValueError(f'{int(span_index.max()) + 1} noise spans need more than {len(sentinel_ids)} sentinels')
    kept = ~mask | starts  # the input keeps the non-noise tokens and one sentinel per span
    source = np.where(starts, sentinel_ids[np.clip(span_index, 0, None)], tokens)
    inputs = np.concatenate([source[kept], [eos_id]])
    target_starts = starts[mask]
    target = np.concatenate([_interleave(sentinel_ids[span_index[mask][target_starts]], tokens[mask], target_starts),
                             [eos_id]])
    return inputs.astype(np.int64), target.astype(np.int64)


def _interleave(sentinels: np.ndarray, noise_tokens: np.ndarray, span_starts: np.ndarray) -> np.ndarray:
    """The noise tokens with each span's sentinel put before its first token."""
    out = np.empty(len(noise_tokens) + len(sentinels), dtype=np.int64)
    positions = np.arange(len(noise_tokens)) + np.cumsum(span_starts)  # shifted by the sentinels so far
    out[positions] = noise_tokens
    sentinel_slots = positions[span_starts] - 1
    out[sentinel_slots] = sentinels
    return out


def pack(token_lists: list[np.ndarray], raw_length: int) -> list[np.ndarray]:
    """Documents' tokens (eos not included) concatenated in order and cut into runs of
    ``raw_length``; the last, shorter run is kept if it holds at least two tokens."""
    if not token_lists:
        return []
    flat = np.concatenate(token_lists)
    runs = [flat[i:i + raw_length] for i in range(0, len(flat), raw_length)]
    return [r for r in runs if len(r) >= 2]


def uncorrupt(inputs: np.ndarray, target: np.ndarray, sentinel_ids: np.ndarray, eos_id: int) -> np.ndarray:
    """The original run from an input and its target (for tests and for filling sentinels)."""
    sentinels = frozenset(int(s) for s in sentinel_ids)
    spans: dict[int, list[int]] = {}
    current = None
    # both end with eos; an eos before the end is a document boundary inside the run, kept
    for t in _without_last_eos(target, eos_id):
        if t in sentinels:
            current = int(t)
            spans[current] = []
        elif current is not None:
            spans[current].append(int(t))
    out: list[int] = []
    for t in _without_last_eos(inputs, eos_id):
        out.extend(spans.get(int(t), []) if t in sentinels else [int(t)])
    return np.array(out, dtype=np.int64)


def _without_last_eos(ids: np.ndarray, eos_id: int) -> list[int]:
    ids = [int(t) for t in ids]
    return ids[:-1] if ids and ids[-1] == eos_id else ids
