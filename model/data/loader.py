"""This rank's tokenized, padded batches of the epoch order, and the position to resume from.

The order (model/data/epoch_order.py) is one flat sequence of rows per epoch; global batch i is
rows ``[i*G, (i+1)*G)`` with ``G = batch_size * world_size`` and rank r takes its slice. The
position is one number, the rows of the sequence consumed, equal on every rank; resuming at it
needs only the window (or length group) that holds it, and stays valid when the world size
changes.

drop_last=True (training): the rows used per epoch are cut to a multiple of
``G * accumulation``, so every optimizer step is full and all ranks yield the same number of
batches. drop_last=False (validation): the tail is split as far as it goes, so in the last
global batch a rank may get a short batch or none at all -- callers must not assume lockstep
there (reduce sums, not per-batch collectives).

DataLoader workers split the work, not the order: worker w of W produces local batches j with
``j % W == w`` and PyTorch's round-robin collection hands them out in order. Each worker reads
(lazily) the windows holding its batches, so W workers read W times for one tokenization;
tokenizing dominates (bench/bench_data.py prints both). Workers hand numpy arrays over.

Why the trainer does not pass this loader to ``accelerator.prepare()``: prepare() wraps an
IterableDataset in a dispatcher / shard wrapper that splits its output again across
processes, which would re-slice batches this loader already assigned per rank and break the
world-size-independent order and the resume position. The loader knows its rank, yields this
rank's local batches, and the trainer moves them to its device.

Tokenization: the Rust fast tokenizer that inference uses; prompts become ``input_ids``,
responses ``labels``, each truncated to ``max_seq_len`` tokens with eos kept last.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from model.errors import UserError
from model.data.epoch_order import EpochPlan, FlatOrder, OrderParams
from model.data.files import resolve_parquet_files, row_group_table
from model.stopping import ignore_in_worker
from model.data.batches import TokenEncoder, batch_from_ids, make_batches, to_torch
from model.data.packing import pack_batch
from model.data.window_reader import WindowReader

logger = logging.getLogger(__name__)

READ_ERROR = 'read_error'  # a worker's UserError, handed over as a batch
OBJECTIVES = ('pairs', 'span_corruption')
TOKENIZE_ROWS = 256  # rows of local batches tokenized per call: the Rust tokenizer's threads pay off


class TokenGroups:
    """The length groups of an epoch, tokenized once each: every row's prompt and response ids
    (in the window-shuffled order) and their lengths, which the group's order is made from."""

    def __init__(self, reader: WindowReader, encoder: TokenEncoder, group_rows: int):
        self.reader, self.encoder, self.group_rows = reader, encoder, group_rows
        self.groups: dict[int, dict] = {}

    def get(self, g: int) -> dict:
        group = self.groups.get(g)
        if group is None:
            a = g * self.group_rows
            b = min(a + self.group_rows, int(self.reader.plan.num_rows))
            (prompts, responses), rows, blank = self.reader.take_all(np.arange(a, b, dtype=np.int64))
            keep = np.flatnonzero(~blank)
            flat, lens = self.encoder.encode_ragged([prompts[i] for i in keep] + [responses[i] for i in keep])
            p_len, r_len = np.zeros(b - a, np.int64), np.zeros(b - a, np.int64)
            p_len[keep], r_len[keep] = lens[:len(keep)], lens[len(keep):]
            split = int(lens[:len(keep)].sum())
            group = self.groups[g] = {
                'p_flat': flat[:split], 'p_start': np.concatenate([[0], np.cumsum(p_len)])[:-1], 'p_len': p_len,
                'r_flat': flat[split:], 'r_start': np.concatenate([[0], np.cumsum(r_len)])[:-1], 'r_len': r_len,
                'blank': blank, 'rows': rows}
        return group

    def lengths(self, a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
        group = self.get(a // self.group_rows)
        return group['p_len'], group['r_len']

    def release_below(self, g: int) -> None:
        for old in [x for x in self.groups if x < g]:
            del self.groups[old]

    def batch(self, positions: np.ndarray, return_row_index: bool) -> dict:
        """The padded batch of the rows at pre-grouping positions (blank rows left out, counted)."""
        sides = {'p': ([], []), 'r': ([], [])}
        rows, skipped = [], 0
        for pos in positions.tolist():
            group = self.get(pos // self.group_rows)
            i = pos % self.group_rows
            if group['blank'][i]:
                skipped += 1
                continue
            for side, (ids, lens) in sides.items():
                start, n = group[f'{side}_start'][i], group[f'{side}_len'][i]
                ids.append(group[f'{side}_flat'][start:start + n])
                lens.append(n)
            rows.append(group['rows'][i])
        def side(name):
            ids, lens = sides[name]
            return (np.concatenate(ids) if ids else np.zeros(0, np.int64)), np.array(lens, dtype=np.int64)
        return batch_from_ids(side('p'), side('r'), np.array(rows, dtype=np.int64) if return_row_index else None,
                              skipped, self.encoder.eos_id)


def _as_is(batch):
    return batch


# --------------------------------------------------------------------------- dataset


@dataclass(frozen=True)
class EpochPass:
    """One iteration: which epoch, order, rows and slice of each global batch."""

    epoch: int
    order: OrderParams
    start: int  # first position of the sequence to yield
    stop: int  # one past the last position used this epoch
    rank: int
    world_size: int
    batch_size: int


class ParquetStreamDataset(IterableDataset):
    """This rank's local batches of one pass (set by :meth:`configure`); see the module doc."""

    def __init__(self, files: list[str], encoder: TokenEncoder, return_row_index: bool = False, packing: bool = False,
                 packing_width: int = 0):
        self.files = files
        self.encoder = encoder
        self.return_row_index = return_row_index
        self.packing = packing  # each batch packed (model/data/packing.py) where it is made: in a worker
        self.packing_width = packing_width
        self.row_groups, self.num_rows = row_group_table(files)
        self.pass_: EpochPass | None = None

    def configure(self, pass_: EpochPass) -> None:
        self.pass_ = pass_

    def plan(self, epoch: int, order: OrderParams) -> EpochPlan:
        return EpochPlan(self.row_groups, order, epoch, self.num_rows)

    def num_positions(self, epoch: int, order: OrderParams) -> int:
        """Positions of an epoch's sequence: its rows."""
        return self.num_rows

    @staticmethod
    def local_batches(p: EpochPass, worker: int = 0, num_workers: int = 1):
        """(j, start, stop) in the sequence of this rank's local batches j with
        j % num_workers == worker."""
        g = p.batch_size * p.world_size
        j = worker
        while True:
            s = p.start + j * g + p.rank * p.batch_size
            if s >= p.stop:
                return
            yield j, s, min(s + p.batch_size, p.stop)
            j += num_workers

    def __iter__(self):
        if self.pass_ is None:
            raise RuntimeError('configure() the dataset before iterating it')
        return self._batches(self.pass_)  # the pass is fixed now, not at the first next()

    def _batches(self, pass_: EpochPass):
        """This rank's batches, each tagged with its index j in the rank's sequence. Workers
        split the work: with length grouping worker w takes the batches of the length groups
        g with g % W == w (a group is tokenized once, by one worker); else the batches j with
        j % W == w. The loader puts them back in order."""
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        if info is not None:
            # workers already split the cores between them; threads per worker would oversubscribe
            os.environ['TOKENIZERS_PARALLELISM'] = 'false'
        plan = self.plan(pass_.epoch, pass_.order)
        reader = WindowReader(self.files, plan)
        try:
            if pass_.order.group_by_length:
                batches = self._grouped_batches(pass_, plan, reader, worker, num_workers)
            else:
                batches = self._plain_batches(pass_, reader, worker, num_workers)
            for batch in batches:
                yield pack_batch(batch, self.encoder.max_seq_len, self.packing_width) if self.packing else batch
        except UserError as e:  # a damaged page met mid-epoch
            if info is None:
                raise
            # raised in a worker it would reach the main process with the worker's traceback
            # in its message: the one line travels as data instead (in_order raises it)
            yield {READ_ERROR: str(e)}
        finally:
            reader.close()

    def _grouped_batches(self, pass_: EpochPass, plan: EpochPlan, reader: WindowReader, worker: int,
                         num_workers: int):
        size = pass_.order.group_rows
        groups = TokenGroups(reader, self.encoder, size)
        flat = FlatOrder(plan, groups.lengths)
        for j, s, e in self.local_batches(pass_):
            if (s // size) % num_workers != worker:
                continue
            groups.release_below(s // size)
            reader.release_below(flat.low_water(s))
            batch = groups.batch(flat.positions(s, e), self.return_row_index)
            batch['batch_index'] = j
            yield batch

    def _plain_batches(self, pass_: EpochPass, reader: WindowReader, worker: int, num_workers: int):
        per_call = max(1, TOKENIZE_ROWS // pass_.batch_size)
        pending, indices = [], []
        for j, s, e in self.local_batches(pass_, worker, num_workers):
            reader.release_below(s)
            (prompts, responses), rows, skipped = reader.take(np.arange(s, e, dtype=np.int64))
            pending.append((prompts, responses, rows if self.return_row_index else None, skipped))
            indices.append(j)
            if len(pending) == per_call:
                yield from self._tag(make_batches(pending, self.encoder), indices)
                pending, indices = [], []
        yield from self._tag(make_batches(pending, self.encoder), indices)

    @staticmethod
    def _tag(batches: list[dict], indices: list[int]):
        for batch, j in zip(batches, indices):
            batch['batch_index'] = j
            yield batch


# --------------------------------------------------------------------------- loader


def in_order(batches):
    """Batches tagged with their index, yielded in index order (workers hand them over out of
    order: each makes whole length groups). Holds at most the batches that arrived early."""
    waiting, want = {}, 0
    for batch in batches:
        if READ_ERROR in batch:
            raise UserError(batch[READ_ERROR])
        waiting[batch['batch_index']] = batch
        while want in waiting:
            yield waiting.pop(want)
            want += 1
    if waiting:
        raise RuntimeError(f'data loader: batches {sorted(waiting)[:3]} came without {want}')  # a bug


@dataclass(frozen=True)
class LoaderSettings:
    """What a loader is asked for, checked here once; a run builds it from its config
    (:meth:`of`), other callers (test, benches) directly."""

    max_seq_len: int
    batch_size: int  # rows per rank per batch
    accumulation: int = 1  # micro-batches per optimizer step (drop_last cuts to whole steps)
    shuffle: bool = True
    seed: int = 0
    shuffle_window_rows: int = 65536
    group_by_length: bool = False
    length_group_batches: int = 64
    mix_row_groups: int = 16
    drop_last: bool = True
    num_workers: int = 0
    pin_memory: bool = False
    objective: str = 'pairs'  # pairs: prompt -> response | span_corruption: raw text, T5's objective
    packing: bool = False  # pairs: several pairs a row (model/data/packing.py); span corruption fills its rows already
    packing_width: int = 0  # the model's d_model: how packing weighs attention against positions (0: never more attention)
    noise_density: float = 0.15  # span corruption: share of tokens masked
    mean_noise_span_length: float = 3.0  # span corruption: mean tokens per masked span

    def __post_init__(self):
        for name in ('max_seq_len', 'batch_size', 'accumulation', 'shuffle_window_rows', 'length_group_batches',
                     'mix_row_groups'):
            if getattr(self, name) < 1:
                raise ValueError(f'{name} must be >= 1, got {getattr(self, name)}')
        if self.num_workers < 0:
            raise ValueError(f'num_workers must be >= 0, got {self.num_workers}')
        if self.objective not in OBJECTIVES:
            raise ValueError(f'objective must be one of {", ".join(OBJECTIVES)}, got {self.objective!r}')

    @classmethod
    def of(cls, t, train: bool, pin_memory: bool = False, model_width: int = 0) -> 'LoaderSettings':
        """The training loader (train) or the validation loader of a run's config ``t``
        (model_width: the model's d_model, for packing)."""
        return cls(max_seq_len=t.max_seq_len, batch_size=t.batch_size_per_gpu,
                   accumulation=t.gradient_accumulation_steps if train else 1, shuffle=train, seed=t.seed,
                   shuffle_window_rows=t.shuffle_window_rows, group_by_length=t.group_by_length and train,
                   length_group_batches=t.length_group_batches, mix_row_groups=t.shuffle_row_groups,
                   drop_last=train, num_workers=t.num_workers if train else 0, pin_memory=pin_memory,
                   objective=t.objective, packing=t.packing, packing_width=model_width, noise_density=t.noise_density,
                   mean_noise_span_length=t.mean_noise_span_length)

    @property
    def order(self) -> OrderParams:
        return OrderParams(seed=self.seed, shuffle=self.shuffle, shuffle_window_rows=self.shuffle_window_rows,
                           # span corruption's examples all have one length: nothing to group
                           group_by_length=self.group_by_length and self.objective == 'pairs',
                           length_group_batches=self.length_group_batches,
                           batch_size=self.batch_size, mix_row_groups=self.mix_row_groups)


class StreamingLoader:
    """Owns the dataset and its DataLoader, tracks the data position, saves and resumes it.

    ``for batch in loader`` yields this rank's local batches of the current epoch from the
    current position; when they run out the loader moves to (epoch + 1, 0). Batch dict:
    ``input_ids`` int64 [b, Ls], ``attention_mask`` int64 [b, Ls], ``labels`` int64
    [b, Lt] (padding -100), ``num_rows`` (real rows), ``num_skipped`` (blank rows dropped),
    and with ``return_row_index`` also ``row_index`` (global row numbers, files in order).
    With ``settings.packing`` the rows are packed pairs (model/data/packing.py: b is then the
    packed rows, ``num_rows`` still the pairs) with their segments and decoder inputs.
    """

    def __init__(self, files, tokenizer, settings: LoaderSettings, rank: int = 0, world_size: int = 1,
                 return_row_index: bool = False, multiprocessing_context=None, combine_counts=None,
                 saved_counts: dict | None = None):
        """combine_counts(counts, error): span corruption's token counts, each rank counting a share
        of the row groups and this summing them over the ranks (Collectives.combine_counts); None:
        this process counts them all. saved_counts: the counts a saved state's data position holds
        (``row_tokens``), taken instead of counting when they were counted from these files."""
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f'rank {rank} outside world size {world_size}')
        self.files = resolve_parquet_files(files)
        if settings.objective == 'span_corruption':
            from model.data.span_stream import SpanCorruptionDataset, SpanSettings

            encoder = TokenEncoder(tokenizer, settings.max_seq_len, truncate=False)
            share = (rank, world_size, combine_counts) if combine_counts is not None else None
            self.dataset = SpanCorruptionDataset(self.files, encoder, SpanSettings(
                settings.max_seq_len, settings.noise_density, settings.mean_noise_span_length), return_row_index,
                count_share=share)
        else:
            encoder = TokenEncoder(tokenizer, settings.max_seq_len)
            self.dataset = ParquetStreamDataset(self.files, encoder, return_row_index=return_row_index,
                                                packing=settings.packing, packing_width=settings.packing_width)
        if self.dataset.num_rows == 0:
            raise UserError(f'{", ".join(self.files)}: no rows to train on')
        self.settings = settings
        self.rank, self.world_size, self.accumulation = rank, world_size, settings.accumulation
        self.batch_size, self.drop_last, self.num_workers = settings.batch_size, settings.drop_last, settings.num_workers
        self.pin_memory = settings.pin_memory
        self.order = settings.order
        self.dataloader = DataLoader(self.dataset, batch_size=None, num_workers=self.num_workers,
                                     multiprocessing_context=multiprocessing_context,
                                     worker_init_fn=ignore_in_worker,  # a stop is the main process's
                                     # workers hand over numpy arrays: pickled through the pipe they
                                     # cost ~5 us, torch tensors go through shared memory at ~40 us
                                     # per row of the main process (measured, bench/bench_data.py)
                                     collate_fn=_as_is,
                                     # its own generator: the base seed must not come from (and
                                     # advance) the global torch RNG, or resuming dropout drifts
                                     generator=torch.Generator())
        self.epoch = 0
        self.rows_consumed = 0
        self._epoch_order = self.order  # the order of the epoch in progress (may be a saved one)
        self._grid_origin = 0  # drop_last cuts (num_rows - origin) to multiples of G * accumulation
        logger.info('data: %d rows in %d files, %d row groups', self.num_rows, len(self.files),
                    len(self.dataset.row_groups))
        self.counts_not_taken = 'none kept'  # why a saved state's token counts were not taken (None: taken)
        if saved_counts is not None and settings.objective == 'span_corruption':  # a resume: the counts its state kept
            self.counts_not_taken = self.dataset.take_counts(saved_counts)  # None: taken, else why not
            if self.counts_not_taken is None:
                logger.info('data: the rows\' token counts taken from the saved state (%d tokens; counted by an '
                            'earlier start of this run)', int(self.dataset.row_tokens().sum()))
            else:
                logger.info('data: the saved state\'s token counts are not used (%s): counting again',
                            self.counts_not_taken)

    # -- sizes

    @property
    def num_rows(self) -> int:
        return self.dataset.num_rows

    @property
    def num_positions(self) -> int:
        """Positions of epoch 0's sequence: rows for pairs, examples for span corruption."""
        return self.dataset.num_positions(0, self.order)

    def _positions(self) -> int:
        """Positions of the epoch in progress."""
        return self.dataset.num_positions(self.epoch, self._epoch_order)

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    def _epoch_end(self, origin: int, positions: int | None = None) -> int:
        positions = self._positions() if positions is None else positions
        if not self.drop_last:
            return positions
        span = self.global_batch_size * self.accumulation
        return origin + (positions - origin) // span * span

    def _local_count(self, start: int, stop: int) -> int:
        first = start + self.rank * self.batch_size
        return 0 if first >= stop else math.ceil((stop - first) / self.global_batch_size)

    def rows_per_epoch(self) -> int:
        """Positions of epoch 0's sequence used in a full epoch (all ranks together)."""
        return self._epoch_end(0, self.num_positions)

    def __len__(self) -> int:
        """This rank's local batches in a full epoch 0 (from metadata)."""
        return self._local_count(0, self.rows_per_epoch())

    def steps_per_epoch(self) -> int:
        """Optimizer steps in a full epoch 0 (the last one may be partial with drop_last=False)."""
        return math.ceil(self.rows_per_epoch() / (self.global_batch_size * self.accumulation))

    def total_steps(self, epochs: int) -> int:
        """Optimizer steps of `epochs` full epochs from epoch 0 (span corruption's epochs differ
        by a few examples: each is counted)."""
        span = self.global_batch_size * self.accumulation
        if isinstance(self.dataset, ParquetStreamDataset):
            return self.num_rows // span * epochs
        return sum(self.dataset.num_positions(e, self.order) // span for e in range(epochs))

    # -- position

    def set_epoch(self, epoch: int) -> None:
        """Move to the start of `epoch`; a no-op for the current epoch, so a trainer that
        calls it after load_state_dict() keeps the resumed position."""
        if epoch != self.epoch:
            self.epoch, self.rows_consumed = epoch, 0
            self._epoch_order, self._grid_origin = self.order, 0

    def state_dict(self) -> dict:
        state = {'epoch': self.epoch, 'rows_consumed': self.rows_consumed, 'num_rows': self.num_rows,
                 'objective': self.settings.objective,
                 **asdict(self._epoch_order), 'global_batch_size': self.global_batch_size,
                 'accumulation': self.accumulation, 'grid_origin': self._grid_origin}
        if self.settings.objective == 'span_corruption':  # so a resume need not count the corpus again
            state['row_tokens'] = self.dataset.counts_part()
        return state

    def load_state_dict(self, state: dict) -> None:
        # a saved position without the key is from before span corruption: pairs (a rewind has neither)
        saved_objective = state.get('objective', 'pairs' if 'num_rows' in state else self.settings.objective)
        if saved_objective != self.settings.objective:
            raise UserError(f'the saved state trained --objective={saved_objective} (its data position counts '
                            f'{"examples" if saved_objective == "span_corruption" else "rows"}); resume it with '
                            f'--objective={saved_objective}, or start the next stage with --init_from=<its model '
                            f'folder> (a new run)')
        self.epoch, self.rows_consumed = int(state['epoch']), int(state['rows_consumed'])
        saved = replace(self.order, **{k: state[k] for k in asdict(self.order) if k in state})
        if state.get('num_rows', self.num_rows) != self.num_rows:
            logger.warning('data: the files now hold %d rows, the saved position was for %d; '
                           'the order of epoch %d changes', self.num_rows, state['num_rows'], self.epoch)
        if self.rows_consumed == 0:
            saved = self.order  # nothing of this epoch was used yet: start it with the new order
        elif saved != self.order:
            changed = ', '.join(f'{k} {getattr(saved, k)} -> {getattr(self.order, k)}'
                                for k in asdict(saved) if getattr(saved, k) != getattr(self.order, k))
            # the ORDER of the rows is kept (batch_size there is the block of length grouping); the batches
            # themselves take the new size at once (the "global batch changed" line below)
            logger.info('data: the rest of epoch %d keeps its rows in the saved order; what orders them changed '
                        '(%s) and orders them from epoch %d on%s', self.epoch, changed, self.epoch + 1,
                        '; batches take the new size now' if saved.batch_size != self.order.batch_size else '')
        self._epoch_order = saved
        same_grid = (state.get('global_batch_size') == self.global_batch_size
                     and state.get('accumulation') == self.accumulation)
        self._grid_origin = int(state.get('grid_origin', 0)) if same_grid else self.rows_consumed
        if not same_grid and self.rows_consumed:
            logger.info('data: global batch changed since the save; epoch %d continues at row %d',
                        self.epoch, self.rows_consumed)
        self.rows_consumed = min(self.rows_consumed, self._epoch_end(self._grid_origin))

    # -- iteration

    def __iter__(self):
        start, stop = self.rows_consumed, self._epoch_end(self._grid_origin)
        stop = max(stop, start)
        self.dataset.configure(EpochPass(self.epoch, self._epoch_order, start, stop, self.rank,
                                     self.world_size, self.batch_size))
        g = self.global_batch_size
        # without workers the DataLoader adds only per-batch overhead (~5% here): iterate directly
        batches = in_order(self.dataloader) if self.num_workers else self.dataset
        for handed, batch in enumerate(batches, start=1):
            self.rows_consumed = min(start + handed * g, stop)
            batch.pop('batch_index', None)
            yield to_torch(batch, self.pin_memory)
        # reached only when the epoch ran out (not when the caller stopped early)
        self.epoch += 1
        self.rows_consumed = 0
        self._epoch_order, self._grid_origin = self.order, 0

