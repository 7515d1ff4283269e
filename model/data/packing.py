"""Packing: the pairs of one batch laid end to end in fewer, fuller rows.

A padded batch spends compute on padding: every row is as long as the batch's longest prompt and
response (on real_train_3k at max_seq_len 192 only 28% of the encoder's positions and 60% of the
decoder's hold a token). Packing puts several pairs in one row -- the prompts side by side in the
encoder row, their responses side by side in the decoder row -- and numbers them (segments
1, 2, ...; 0 is padding). The model keeps every pair to itself (model/net/chat_model.py builds the
attention masks from the segments: a token sees only its own pair, the decoder causally), and
T5's relative position bias depends only on the distance between two tokens, so a packed batch
has the loss and the gradients of the padded one (tests/test_packing.py), in fewer positions.

The batch's examples, their order and the data position are the padded batch's: packing changes
the layout of one batch, never which pairs it holds, so exact resume and the world-size-free
order hold unchanged.
"""

from __future__ import annotations

import numpy as np

from model.data.tokenizer import LABEL_PAD_ID, PAD_ID

SCAN_IN_NUMPY_FROM = 256  # pairs a batch from which first fit scans its rows in numpy (measured: equal at 256)


def first_fit(prompt_lens: list[int], response_lens: list[int], order: list[int], prompt_cap: int,
              response_cap: int) -> list[list[int]]:
    """Pairs (by index, taken in ``order``) into rows: each goes to the first row where its prompt
    and its response still fit the caps, else to a new row. Scanning the rows is the cost (pairs x
    rows): a large batch scans them in numpy, the same rows found (tests/test_packing.py), 11x
    faster at 4,096 pairs; a small one in Python, where numpy's per-call cost would dominate."""
    if len(order) >= SCAN_IN_NUMPY_FROM:
        return _first_fit_arrays(prompt_lens, response_lens, order, prompt_cap, response_cap)
    rows: list[list[int]] = []
    used_p: list[int] = []
    used_r: list[int] = []
    for i in order:
        p, r = prompt_lens[i], response_lens[i]
        for k in range(len(rows)):
            if used_p[k] + p <= prompt_cap and used_r[k] + r <= response_cap:
                rows[k].append(i)
                used_p[k] += p
                used_r[k] += r
                break
        else:
            rows.append([i])
            used_p.append(p)
            used_r.append(r)
    return rows


def _first_fit_arrays(prompt_lens, response_lens, order, prompt_cap: int, response_cap: int) -> list[list[int]]:
    """first_fit with the rows' used lengths in arrays: the first row that fits, found by one
    vectorised comparison per pair."""
    rows: list[list[int]] = []
    used_p = np.zeros(len(order), np.int64)
    used_r = np.zeros(len(order), np.int64)
    for i in order:
        p, r = prompt_lens[i], response_lens[i]
        m = len(rows)
        if m:
            fits = (used_p[:m] <= prompt_cap - p) & (used_r[:m] <= response_cap - r)
            k = int(fits.argmax())
            if fits[k]:
                rows[k].append(i)
                used_p[k] += p
                used_r[k] += r
                continue
        rows.append([i])
        used_p[m], used_r[m] = p, r
    return rows


def layout_cost(rows: list[list[int]], prompt_lens: list[int], response_lens: list[int]) -> tuple[int, int]:
    """(positions, attention cells) a layout computes: rows x (longest prompt side + longest
    response side), and rows x (Le^2 + Ld^2 + Le*Ld) for the encoder's, the decoder's and the
    cross attention (T5 materialises a bias for each cell, in every layer)."""
    le = max(sum(prompt_lens[i] for i in row) for row in rows)
    ld = max(sum(response_lens[i] for i in row) for row in rows)
    return len(rows) * (le + ld), len(rows) * (le * le + ld * ld + le * ld)


def pack_rows(prompt_lens: np.ndarray, response_lens: np.ndarray, length: int, width: int = 0) -> list[list[int]]:
    """Pairs (by index) into rows whose prompts and whose responses each fit ``length`` tokens.
    First fit, longest pairs first, is tried with each side capped at 1x, 2x and 3x its longest
    pair and at ``length``; the layout kept is the cheapest, an attention cell counted as 1/width
    of a position (width: the model's d_model; a position costs ~24 d_model^2 FLOPs a layer in
    its matmuls, a cell ~4 d_model in attention's, and T5 materialises a bias for each cell, so
    1/width is a pessimistic weight), ties to the fewest cells. width=0: only layouts with no
    more attention cells than the padded batch, the fewest positions of those. Capped at 1x --
    rows no longer than the padded batch's, and no more of them -- computes no more of either
    than padding and is always a candidate, so packing never costs more than padding. A pair's
    prompt and response share a row, so with short prompts and long answers the prompt side
    stays partly padding. Deterministic."""
    p, r = prompt_lens.astype(np.int64).tolist(), response_lens.astype(np.int64).tolist()
    for i, (a, b) in enumerate(zip(p, r)):
        if a > length or b > length:
            raise ValueError(f'pair {i} ({a} + {b} tokens) is longer than the packed length {length}')
    _, padded_cells = layout_cost([[i] for i in range(len(p))], p, r)
    order = sorted(range(len(p)), key=lambda i: -(p[i] + r[i]))  # stable: ties in batch order
    best, best_cost = None, None
    for prompt_cap in sorted({min(length, max(p) * k) for k in (1, 2, 3)} | {length}):
        for response_cap in sorted({min(length, max(r) * k) for k in (1, 2, 3)} | {length}):
            rows = first_fit(p, r, order, prompt_cap, response_cap)
            positions, cells = layout_cost(rows, p, r)
            if not width and cells > padded_cells:
                continue
            cost = (positions + cells / width if width else positions, cells)
            if best_cost is None or cost < best_cost:
                best, best_cost = rows, cost
    return best


def pack_batch(batch: dict, length: int, width: int = 0) -> dict:
    """The padded batch ``batch`` (numpy, model/data/batches.batch_from_ids) packed into rows of
    at most ``length`` tokens a side (``width``: :func:`pack_rows`). Adds ``encoder_segments``, ``decoder_segments`` (int64,
    0 = padding) and ``decoder_input_ids`` (each pair's response shifted right behind the
    decoder's start token); ``attention_mask`` stays the tokens (segments > 0) and every other
    key (num_rows, row_index, ...) is kept as it was. A batch without rows (a placeholder) is
    returned as it is."""
    if batch.get('num_rows', len(batch['input_ids'])) == 0:
        return batch
    ids, labels = batch['input_ids'], batch['labels']
    p_len = batch['attention_mask'].sum(1).astype(np.int64)
    r_len = (labels != LABEL_PAD_ID).sum(1).astype(np.int64)
    rows = pack_rows(p_len, r_len, length, width)
    n = len(rows)
    le = max(int(p_len[r].sum()) for r in rows)
    ld = max(int(r_len[r].sum()) for r in rows)
    out_ids = np.full((n, le), PAD_ID, np.int64)
    enc_seg = np.zeros((n, le), np.int64)
    out_labels = np.full((n, ld), LABEL_PAD_ID, np.int64)
    dec_in = np.full((n, ld), PAD_ID, np.int64)
    dec_seg = np.zeros((n, ld), np.int64)
    for k, members in enumerate(rows):
        e = d = 0
        for s, i in enumerate(members, 1):
            p, r = p_len[i], r_len[i]
            out_ids[k, e:e + p] = ids[i, :p]
            enc_seg[k, e:e + p] = s
            out_labels[k, d:d + r] = labels[i, :r]
            dec_in[k, d + 1:d + r] = labels[i, :r - 1]  # dec_in[k, d] stays the start token (pad)
            dec_seg[k, d:d + r] = s
            e, d = e + p, d + r
    packed = dict(batch)
    packed.update(input_ids=out_ids, attention_mask=(enc_seg > 0).astype(np.int64), labels=out_labels,
                  decoder_input_ids=dec_in, encoder_segments=enc_seg, decoder_segments=dec_seg)
    return packed
