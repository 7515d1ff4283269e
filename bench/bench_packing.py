"""How full the computed positions are, padded against packed (a benchmark, not a test).

    .venv/bin/python bench/bench_packing.py                 # real_train_3k, ~1 min on 2 cores
    .venv/bin/python bench/bench_packing.py --sizes=192x32

For each (max_seq_len, batch_size_per_gpu) and each of length grouping off / on and packing off /
on (packing weighing attention for a model of --width): one epoch of this toolkit's own loader (model/data/loader.StreamingLoader, seed 42) over
../shared/data/real_train_3k.parquet with an 8k tokenizer trained on it (bench/out/tokenizer_real8k,
made once), and the share of the positions computed (input and label rows, padding included)
that hold a token (the rest is padding, computed for nothing) and the attention cells computed
(rows x (Le^2 + Ld^2 + Le*Ld)). Then the cost of packing itself:
milliseconds of model/data/packing.pack_batch per batch, at the sizes asked and at a GPU's
(max length 512, 256 rows), and pack_rows with first fit's rows scanned in Python or in numpy at
64 to 4,096 pairs. Speed and learning are measured elsewhere (README, "Performance").
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
REAL = os.path.join(ROOT, '..', 'shared', 'data', 'real_train_3k.parquet')
TOK = os.path.join(ROOT, 'bench', 'out', 'tokenizer_real8k')


def main() -> None:
    import numpy as np

    from model.data.batches import batch_from_ids
    from model.data.loader import LoaderSettings, StreamingLoader
    from model.data.packing import pack_batch
    from model.data.tokenizer import LABEL_PAD_ID, load_tokenizer, train_tokenizer

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--sizes', default='192x32,192x16,128x16', help='max_seq_len x batch_size_per_gpu, comma-separated')
    ap.add_argument('--width', type=int, default=768, help='the model\'s d_model, as packing weighs attention '
                    '(768: the guide\'s model; the demo\'s is 128)')
    args = ap.parse_args()
    if not os.path.isfile(REAL):
        sys.exit(f'{REAL} is missing: this benchmark reads the real rows')
    if not os.path.isfile(os.path.join(TOK, 'tokenizer.json')):
        train_tokenizer(REAL, TOK, vocab_size=8000, num_threads=os.cpu_count())
    tok = load_tokenizer(TOK)
    print(f'{"max len x batch":<16} {"grouped":<8} {"packed":<7} {"filled":>7} {"positions":>10} {"rows":>6} '
          f'{"attention cells":>16}')
    for size in args.sizes.split(','):
        length, batch = (int(x) for x in size.split('x'))
        padded = []
        for grouped in (False, True):
            for packing in (False, True):
                loader = StreamingLoader([REAL], tok, LoaderSettings(
                    max_seq_len=length, batch_size=batch, group_by_length=grouped, packing=packing, seed=42,
                    packing_width=args.width))
                tokens = positions = rows = cells = 0
                for b in loader:
                    le, ld = b['input_ids'].shape[1], b['labels'].shape[1]
                    cells += len(b['input_ids']) * (le * le + ld * ld + le * ld)  # encoder, decoder, cross
                    tokens += int(b['attention_mask'].sum()) + int((b['labels'] != LABEL_PAD_ID).sum())
                    positions += b['input_ids'].numel() + b['labels'].numel()
                    rows += len(b['input_ids'])
                    if not packing and not grouped:
                        padded.append({k: v.numpy() for k, v in b.items() if hasattr(v, 'numpy')})
                print(f'{size:<16} {str(grouped):<8} {str(packing):<7} {tokens / positions:>7.1%} {positions:>10,} '
                      f'{rows:>6} {cells:>16,}')
        start = time.perf_counter()
        for b in padded:
            pack_batch(b, length, args.width)
        print(f'{size:<16} pack_batch: {1000 * (time.perf_counter() - start) / len(padded):.2f} ms a batch')
    # a GPU's batch: 256 rows up to 512 tokens a side, lengths drawn like the real rows' (log-normal)
    rng = np.random.default_rng(0)
    times = []
    for _ in range(20):
        p = np.minimum(rng.lognormal(3.2, 0.6, 256).astype(int) + 2, 512)
        r = np.minimum(rng.lognormal(4.5, 0.8, 256).astype(int) + 2, 512)
        b = batch_from_ids((np.ones(int(p.sum()), np.int64), p), (np.ones(int(r.sum()), np.int64), r), None, 0, 1)
        start = time.perf_counter()
        pack_batch(b, 512, args.width)
        times.append(time.perf_counter() - start)
    print(f'512x256 (log-normal lengths) pack_batch: {1000 * sorted(times)[len(times) // 2]:.1f} ms a batch (median of 20)')
    scans(args.width)


def scans(width: int) -> None:
    """pack_rows at 64 to 4,096 pairs of up to 512 tokens, first fit's rows scanned in Python or in
    numpy (packing.SCAN_IN_NUMPY_FROM decides; the rows must be the same)."""
    import statistics

    import numpy as np

    from model.data import packing

    rng, threshold = np.random.default_rng(0), packing.SCAN_IN_NUMPY_FROM
    try:
        for n in (64, 256, 1024, 4096):
            p, r = rng.integers(5, 60, n), rng.integers(20, 400, n)
            found = {}
            for name, from_ in (('python', 10**9), ('numpy', 1)):
                packing.SCAN_IN_NUMPY_FROM = from_
                times = []
                for _ in range(5 if n < 4096 else 3):
                    start = time.perf_counter()
                    rows = packing.pack_rows(p, r, 512, width)
                    times.append(time.perf_counter() - start)
                found[name] = (1000 * statistics.median(times), rows)
            assert found['python'][1] == found['numpy'][1], 'the two scans found other rows'
            (py, _), (vec, _) = found['python'], found['numpy']
            print(f'pack_rows, {n} pairs at 512: rows scanned in Python {py:.1f} ms, in numpy {vec:.1f} ms '
                  f'({py / vec:.2f}x; the same rows; numpy from {threshold} pairs)')
    finally:
        packing.SCAN_IN_NUMPY_FROM = threshold


if __name__ == '__main__':
    main()
