"""The order of an epoch: one flat sequence of rows, the same for any number of ranks or workers.

It depends only on the data files, the seed, the epoch and the :class:`OrderParams`:

* a seeded permutation of the row groups of all files (a numpy Generator from (seed, epoch));
* windows of ``shuffle_window_rows`` rows, each drawn from ``mix_row_groups`` row groups at
  once: that many row groups of the permutation are open, each gives the window its next
  ``shuffle_window_rows / mix_row_groups`` rows (read sequentially, so every row group is read
  once per epoch), and an exhausted one is replaced by the next of the permutation. A file
  sorted by source or topic thus still trains mixed; rows are permuted within a window by a
  Generator from (seed, epoch, window);
* optional length grouping: within groups of ``length_group_batches x batch_size`` rows of
  that sequence, rows are ordered by their token lengths (response first, then prompt, in
  chunks: see :func:`length_group_order`; seeded tie-break), cut into blocks of
  ``batch_size`` rows and the blocks shuffled (the last partial block stays last).

Global batch i is rows ``[i*G, (i+1)*G)`` with ``G = batch_size * world_size``; rank r takes
``[i*G + r*batch_size, i*G + (r+1)*batch_size)`` (see model/data/loader.py). Metadata only here:
no row is read, except the lengths a length group sorts by.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

# seed-stream tags, so the generators of different decisions never coincide
_TAG_UNITS, _TAG_WINDOW, _TAG_GROUP = 1, 2, 3


def order_rng(seed: int, epoch: int, tag: int, index: int = 0) -> np.random.Generator:
    return np.random.default_rng([tag, seed & 0xFFFF_FFFF_FFFF_FFFF, epoch, index])


@dataclass(frozen=True)
class OrderParams:
    """Everything the flat row sequence of an epoch depends on (besides the files)."""

    seed: int
    shuffle: bool
    shuffle_window_rows: int
    group_by_length: bool
    length_group_batches: int
    batch_size: int  # block size of length grouping (rows per rank per batch)
    mix_row_groups: int = 16  # row groups a window draws its rows from

    @property
    def group_rows(self) -> int:
        return self.length_group_batches * self.batch_size


@dataclass(frozen=True)
class RowGroupSlice:
    file: int  # index into the file list
    row_group: int
    start: int  # first row inside the row group
    rows: int
    first_row: int  # global row index of `start` (files concatenated in list order)
    whole: bool  # the unit is the entire row group


class EpochPlan:
    """Units, windows and window permutations of one epoch; metadata only, no reads."""

    def __init__(self, row_groups: list[tuple[int, int, int, int]], order: OrderParams, epoch: int,
                 num_rows: int):
        """row_groups: (file, row_group, rows, global first row) in file order."""
        self.order, self.epoch, self.num_rows = order, epoch, num_rows
        w = order.shuffle_window_rows
        sequence = iter(order_rng(order.seed, epoch, _TAG_UNITS).permutation(len(row_groups))
                        if order.shuffle else range(len(row_groups)))
        k = order.mix_row_groups if order.shuffle else 1  # validation reads in file order
        slots: list[list[int]] = []  # open row groups: [index, next row]
        self.windows: list[list[RowGroupSlice]] = []

        def refill():
            while len(slots) < k:
                g = next(sequence, None)
                if g is None:
                    return
                slots.append([int(g), 0])

        refill()
        while slots:
            window: list[RowGroupSlice] = []
            need = w
            while need and slots:
                quota = -(-need // len(slots))  # each open row group gives an equal share
                for slot in list(slots):
                    if not need:
                        break
                    g, pos = slot
                    f, rg, n, first = row_groups[g]
                    take = min(quota, n - pos, need)
                    window.append(RowGroupSlice(f, rg, pos, take, first + pos, pos == 0 and take == n))
                    slot[1] += take
                    need -= take
                    if slot[1] >= n:
                        slots.remove(slot)
                refill()
            self.windows.append(window)
        sizes = [sum(u.rows for u in win) for win in self.windows]
        self.window_start = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])

    def window_of(self, positions: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.window_start, positions, side='right') - 1

    def window_permutation(self, w: int) -> np.ndarray:
        """Row k of window w in the flat sequence is row perm[k] of the window as read."""
        n = int(self.window_start[w + 1] - self.window_start[w])
        if not self.order.shuffle:
            return np.arange(n, dtype=np.int64)
        return order_rng(self.order.seed, self.epoch, _TAG_WINDOW, w).permutation(n)


CHUNK_BATCHES = 6  # batches per chunk of length_group_order's second sort (6 padded least, measured)


def length_group_order(prompt_lens: np.ndarray, response_lens: np.ndarray, batch_size: int,
                       rng: np.random.Generator, chunk_batches: int = CHUNK_BATCHES) -> np.ndarray:
    """Positions of one length group in their new order, padding little on both sides: sorted
    by response length (then prompt length; seeded tie-break), cut into chunks of
    ``chunk_batches`` batches, each chunk sorted by prompt length (then response length), cut
    into blocks of batch_size; blocks paired short with long, the pairs shuffled; a partial
    block last.

    One sort by a single length leaves the other side ragged: on real_train_3k (max length 128,
    batch 16) the padded share of positions is 22% sorted by (response, prompt), 9% with this
    second sort in chunks of 6 batches, 45% unsorted."""
    n = len(prompt_lens)
    tie = rng.permutation(n)
    p, r = prompt_lens[tie], response_lens[tie]
    by_response = tie[np.lexsort((p, r))]  # lexsort is stable: the random tie order breaks ties
    span = max(1, chunk_batches) * batch_size
    chunks = []
    for c in range(0, n, span):
        chunk = by_response[c:c + span]
        chunks.append(chunk[np.lexsort((response_lens[chunk], prompt_lens[chunk]))])
    ordered = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int64)
    full = n // batch_size
    blocks = ordered[:full * batch_size].reshape(full, batch_size)
    # consecutive blocks in pairs of a short and a long one (by response tokens, which the loss
    # counts), pairs shuffled: an optimizer step of two or more batches then sees all lengths,
    # as a step of unsorted rows would, instead of one length range at a time
    by_tokens = np.argsort(response_lens[blocks].sum(1), kind='stable')
    pairs = [(by_tokens[i], by_tokens[full - 1 - i]) for i in range(full // 2)]
    pairs = [pairs[i] for i in rng.permutation(len(pairs))]
    sequence = [b for pair in pairs for b in pair] + ([by_tokens[full // 2]] if full % 2 else [])
    head = blocks[np.array(sequence, dtype=np.int64)].reshape(-1) if full else np.zeros(0, dtype=np.int64)
    return np.concatenate([head, ordered[full * batch_size:]])


class FlatOrder:
    """Maps positions of the epoch's final sequence to positions after window shuffling
    (they differ only when length grouping is on). ``lengths(start, stop)`` gives the
    (prompt, response) token lengths of positions [start, stop) of the window-shuffled
    sequence."""

    def __init__(self, plan: EpochPlan, lengths: Callable[[int, int], tuple[np.ndarray, np.ndarray]]):
        self.plan, self.lengths, self.order = plan, lengths, plan.order
        self._groups: dict[int, np.ndarray] = {}

    def low_water(self, position: int) -> int:
        """The smallest pre-grouping position still needed from `position` on."""
        if not self.order.group_by_length:
            return position
        k = self.order.group_rows
        return position // k * k

    def positions(self, start: int, stop: int) -> np.ndarray:
        if not self.order.group_by_length:
            return np.arange(start, stop, dtype=np.int64)
        k = self.order.group_rows
        if start // k == (stop - 1) // k:  # the usual case: one block inside one group
            g = start // k
            return g * k + self._group(g)[start - g * k:stop - g * k]
        q = np.arange(start, stop, dtype=np.int64)
        g = q // k
        out = np.empty_like(q)
        for gi in np.unique(g).tolist():
            sel = g == gi
            out[sel] = gi * k + self._group(gi)[q[sel] - gi * k]
        return out

    def _group(self, g: int) -> np.ndarray:
        perm = self._groups.get(g)
        if perm is None:
            k = self.order.group_rows
            a, b = g * k, min((g + 1) * k, self.plan.num_rows)
            rng = order_rng(self.order.seed, self.plan.epoch, _TAG_GROUP, g)
            perm = length_group_order(*self.lengths(a, b), self.order.batch_size, rng)
            for old in [x for x in self._groups if x < g]:
                del self._groups[old]
            self._groups[g] = perm
        return perm
