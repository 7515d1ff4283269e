"""Throughput, memory and first-batch latency of the streaming pipeline vs a naive Dataset.

    .venv/bin/python bench/bench_data.py                          # 1M and 4M rows, ~30 s per config
    .venv/bin/python bench/bench_data.py --rows=200000 --budget_s=10 --extras=false

Data: ../shared/data/real_train_3k.parquet (relative to the repo root) repeated to N rows in row
groups of 65536 (synthetic text if it is absent), cached in bench/out/ with a tokenizer
(vocab 8000) trained on the same rows. Each configuration runs in a fresh subprocess, so the
peak RSS (VmHWM of that process; ru_maxrss of its largest DataLoader worker, reported apart)
is its own.

  streaming   model.data.loader.StreamingLoader, the 10m preset's data settings (batch 32,
              max_seq_len 192, window 65536, length grouping over 64 batches), with 0, 2 and 4
              DataLoader workers (--workers)
  naive       pq.read_table of the whole file, a map-style Dataset slicing one row to Python
              per __getitem__, DataLoader(shuffle=True) with a collate_fn calling the HF tokenizer
  read only   the streaming reader's Arrow -> Python work per batch, no tokenizing

rows/s counts rows from the first batch on; e2e rows/s also counts setup (tokenizer load,
loader construction or read_table; the torch/transformers imports excluded for both);
rows/cpu-s divides by the CPU time of the process and its workers, a figure that other load
on the machine disturbs less. The Rust tokenizer uses its rayon thread pool (one thread per
core) in the main process, one thread per worker, and one thread in the "1 thread" row
(TOKENIZERS_PARALLELISM=false).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, 'bench', 'out')
REAL = os.path.join(os.path.dirname(ROOT), 'shared', 'data', 'real_train_3k.parquet')
ROW_GROUP = 65536
BATCH, MAX_LEN = 32, 192
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


# --------------------------------------------------------------------------- inputs


def source_table():
    import pyarrow as pa
    import pyarrow.parquet as pq

    if os.path.isfile(REAL):
        return pq.read_table(REAL, columns=['prompt', 'response']), 'real_train_3k'
    sys.path.insert(0, os.path.join(ROOT, 'tests'))
    from conftest import make_texts

    pairs = make_texts(3000, seed=0, max_len=400)
    return pa.table({'prompt': [p for p, _ in pairs], 'response': [r for _, r in pairs]}), 'synthetic'


def build_file(rows: int, row_group: int = ROW_GROUP) -> str:
    """N rows cycling through the source rows, written chunk by chunk (cached)."""
    import numpy as np
    import pyarrow.parquet as pq

    tag = f'{rows // 1000}k' if rows % 1_000_000 else f'{rows // 1_000_000}M'
    path = os.path.join(OUT, f'rows_{tag}' + ('' if row_group == ROW_GROUP else f'_rg{row_group}') + '.parquet')
    if os.path.isfile(path):
        return path
    base, _ = source_table()
    tmp = path + '.tmp'
    chunk = min(row_group, 262144)
    with pq.ParquetWriter(tmp, base.schema) as writer:
        if row_group <= chunk:
            for start in range(0, rows, chunk):
                idx = np.arange(start, min(start + chunk, rows)) % base.num_rows
                writer.write_table(base.take(idx), row_group_size=row_group)
        else:  # one call per row group: the writer starts a new row group on every call
            for start in range(0, rows, row_group):
                idx = np.arange(start, min(start + row_group, rows)) % base.num_rows
                writer.write_table(base.take(idx), row_group_size=row_group)
    os.replace(tmp, path)
    return path


def build_tokenizer() -> str:
    from model.data.tokenizer import train_tokenizer

    d = os.path.join(OUT, 'tokenizer')
    if not os.path.isfile(os.path.join(d, 'tokenizer.json')):
        base, _ = source_table()
        src = os.path.join(OUT, 'tokenizer_source.parquet')
        import pyarrow.parquet as pq

        pq.write_table(base, src)
        train_tokenizer(src, d, vocab_size=8000, max_rows=len(base), num_threads=os.cpu_count())
    return d


# --------------------------------------------------------------------------- children


def peak_rss_mb() -> tuple[float, float]:
    """(this process, its largest DataLoader worker). VmHWM, not ru_maxrss: Linux carries
    ru_maxrss across exec, so a child would report the parent's peak at fork time."""
    with open('/proc/self/status') as f:
        own = next(int(line.split()[1]) for line in f if line.startswith('VmHWM:')) / 1024
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # forked, not exec'd
    return own, workers


def run_streaming(cfg, t_start):
    from model.data.loader import LoaderSettings, StreamingLoader
    from model.data.tokenizer import load_tokenizer

    tok = load_tokenizer(cfg['tokenizer'])
    loader = StreamingLoader(cfg['file'], tok, LoaderSettings(
        MAX_LEN, BATCH, shuffle=True, seed=1, shuffle_window_rows=65536, group_by_length=True, length_group_batches=64,
        num_workers=cfg.get('workers', 0)))
    return consume(loader, cfg, t_start, lambda b: b['num_rows'] + b['num_skipped'], backend='rust')


def run_naive(cfg, t_start):
    import pyarrow.parquet as pq
    import torch
    from torch.utils.data import DataLoader, Dataset

    from model.data.tokenizer import load_tokenizer

    tok = load_tokenizer(cfg['tokenizer'])

    class NaiveDataset(Dataset):
        def __init__(self, path):
            self.table = pq.read_table(path)

        def __len__(self):
            return self.table.num_rows

        def __getitem__(self, i):
            return self.table.slice(i, 1).to_pylist()[0]

    def collate(rows):
        enc = tok([r['prompt'] for r in rows], truncation=True, max_length=MAX_LEN, padding=True,
                  return_tensors='pt')
        lab = tok([r['response'] for r in rows], truncation=True, max_length=MAX_LEN, padding=True,
                  return_tensors='pt')['input_ids']
        return {'input_ids': enc['input_ids'], 'attention_mask': enc['attention_mask'],
                'labels': lab.masked_fill(lab == tok.pad_token_id, -100), 'num_rows': len(rows)}

    loader = DataLoader(NaiveDataset(cfg['file']), batch_size=BATCH, shuffle=True, collate_fn=collate,
                        generator=torch.Generator().manual_seed(0))
    return consume(loader, cfg, t_start, lambda b: b['num_rows'], backend='hf call')


def run_read_only(cfg, t_start):
    """The streaming reader's share: plan, window reads, per-batch take -> Python strings."""
    from model.data.epoch_order import FlatOrder
    from model.data.loader import EpochPass, LoaderSettings, StreamingLoader
    from model.data.tokenizer import load_tokenizer
    from model.data.window_reader import WindowReader

    tok = load_tokenizer(cfg['tokenizer'])
    loader = StreamingLoader(cfg['file'], tok, LoaderSettings(MAX_LEN, BATCH, group_by_length=True,
                                                                 length_group_batches=64))
    ds = loader.dataset
    p = EpochPass(0, loader.order, 0, loader.rows_per_epoch(), 0, 1, BATCH)
    plan = ds.plan(p.epoch, p.order)
    reader = WindowReader(ds.files, plan)
    flat = FlatOrder(plan, reader.lengths)
    load_s = [0.0]
    load = reader._load

    def timed_load(w):  # Parquet -> Arrow window (decode, blank mask), once per window and process
        t = time.perf_counter()
        try:
            return load(w)
        finally:
            load_s[0] += time.perf_counter() - t

    reader._load = timed_load

    def batches():
        for _, s, e in ds.local_batches(p):
            reader.release_below(flat.low_water(s))
            (prompts, _), _, skipped = reader.take(flat.positions(s, e))
            yield len(prompts) + skipped

    result = consume(batches(), cfg, t_start, lambda n: n, backend='-')
    result['window_load_s'] = load_s[0]
    return result


def cpu_s() -> float:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def consume(iterable, cfg, t_start, count, backend):
    rows = batches = 0
    t_first = None
    cpu0 = cpu_s()
    it = iter(iterable)
    for b in it:
        if t_first is None:
            t_first = time.perf_counter()
        rows += count(b)
        batches += 1
        if time.perf_counter() - t_first > cfg['budget_s']:
            break
    t_end = time.perf_counter()
    if hasattr(it, 'close'):
        it.close()  # shuts DataLoader workers down, so that their CPU time and peak RSS count
    del it
    import gc

    gc.collect()
    own, workers = peak_rss_mb()
    return {'rows': rows, 'batches': batches, 'first_batch_s': t_first - t_start,
            'rows_per_s': rows / (t_end - t_first), 'e2e_rows_per_s': rows / (t_end - t_start),
            'rows_per_cpu_s': rows / max(cpu_s() - cpu0, 1e-9), 'rss_mb': own, 'worker_rss_mb': workers,
            'backend': backend}


def child(cfg: dict) -> None:
    import importlib

    for name in ('torch', 'transformers'):  # imports are not part of the measured time for either pipeline
        importlib.import_module(name)

    t_start = time.perf_counter()
    result = {'streaming': run_streaming, 'naive': run_naive, 'read only': run_read_only}[cfg['kind']](cfg, t_start)
    print('RESULT ' + json.dumps(result), flush=True)


# --------------------------------------------------------------------------- parent


def run_child(cfg: dict) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE='1', TRANSFORMERS_OFFLINE='1')
    if cfg.get('one_thread'):
        env['TOKENIZERS_PARALLELISM'] = 'false'
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), '--child', json.dumps(cfg)],
                          capture_output=True, text=True, env=env, cwd=ROOT)
    for line in proc.stdout.splitlines():
        if line.startswith('RESULT '):
            return json.loads(line[7:])
    raise RuntimeError(f'{cfg}: child failed\n{proc.stderr[-3000:]}')


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--rows', default='1000000,4000000', help='comma-separated row counts')
    ap.add_argument('--budget_s', type=float, default=30.0, help='seconds of batches per configuration')
    ap.add_argument('--workers', default='0,2,4', help='DataLoader workers per configuration (at the smallest N)')
    ap.add_argument('--extras', default='true', help='also: 1 thread, read only, one huge row group '
                    '(at the smallest N)')
    ap.add_argument('--child', help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    os.makedirs(OUT, exist_ok=True)
    _, source = source_table()
    sizes = [int(float(x)) for x in args.rows.split(',')]
    tok_dir = build_tokenizer()
    configs = []
    for i, n in enumerate(sizes):
        f = build_file(n)
        base = {'file': f, 'tokenizer': tok_dir, 'budget_s': args.budget_s, 'rows_total': n}
        configs.append(('streaming', n, {**base, 'kind': 'streaming'}))
        if i == 0:
            for w in (int(x) for x in args.workers.split(',') if int(x)):
                configs.append((f'streaming, {w} workers', n, {**base, 'kind': 'streaming', 'workers': w}))
        if i == 0 and args.extras.lower() in ('1', 'true', 'yes'):
            configs.append(('streaming, 1 thread', n, {**base, 'kind': 'streaming', 'one_thread': True}))
            configs.append(('streaming, 1 row group', n, {**base, 'kind': 'streaming', 'file': build_file(n, n)}))
            configs.append(('read only', n, {**base, 'kind': 'read only', 'one_thread': True}))
        configs.append(('naive', n, {**base, 'kind': 'naive'}))
    print(f'source: {source}; batch {BATCH}, max_seq_len {MAX_LEN}; budget {args.budget_s:g} s per config; '
          f'{os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at start')
    head = (f'{"config":<24} {"rows":>5} {"tokenizer":>13} {"rows/s":>8} {"e2e rows/s":>10} {"rows/cpu-s":>10} '
            f'{"first batch":>11} {"peak RSS":>9} {"worker RSS":>10}')
    print(head)
    print('-' * len(head))
    results = {}
    for name, n, cfg in configs:
        r = run_child(cfg)
        results[(name, n)] = r
        tag = f'{n // 1_000_000}M' if n % 1_000_000 == 0 else f'{n // 1000}k'
        wrss = f'{r["worker_rss_mb"]:.0f} MB' if cfg.get('workers') else '-'
        print(f'{name:<24} {tag:>5} {r["backend"]:>13} {r["rows_per_s"]:>8.0f} {r["e2e_rows_per_s"]:>10.0f} '
              f'{r["rows_per_cpu_s"]:>10.0f} {r["first_batch_s"]:>10.2f}s {r["rss_mb"]:>6.0f} MB {wrss:>10}',
              flush=True)
    lo, hi = min(sizes), max(sizes)
    s_lo, s_hi = results[('streaming', lo)], results[('streaming', hi)]
    print(f'load average {os.getloadavg()[0]:.2f} at the end (other processes share these cores)')
    print()
    if hi != lo:
        print(f'streaming peak RSS {hi:,} / {lo:,} rows: {s_hi["rss_mb"] / s_lo["rss_mb"]:.2f}x '
              f'(target <= 1.2x, and < 1024 MB: {s_hi["rss_mb"]:.0f} MB)')
    for n in sizes:
        s, v = results[('streaming', n)], results[('naive', n)]
        print(f'{n:,} rows: streaming / naive  rows/s {s["rows_per_s"] / v["rows_per_s"]:.1f}x, '
              f'e2e {s["e2e_rows_per_s"] / v["e2e_rows_per_s"]:.1f}x, first batch {s["first_batch_s"]:.2f}s vs '
              f'{v["first_batch_s"]:.2f}s, peak RSS {s["rss_mb"]:.0f} vs {v["rss_mb"]:.0f} MB')
    if ('read only', lo) in results:
        rd = results[('read only', lo)]
        per_row = 1e6 / rd['rows_per_s']
        load = 1e6 * rd['window_load_s'] / rd['rows']
        print(f'reading: {per_row:.1f} us/row ({rd["rows_per_s"]:.0f} rows/s) = {s_lo["rows_per_s"] / rd["rows_per_s"]:.1%} '
              f'of the streaming time per row; of it {load:.1f} us/row Parquet -> Arrow windows (what each '
              f'extra worker or rank repeats) and {per_row - load:.1f} us/row Arrow -> Python for its own batches')


if __name__ == '__main__':
    main()
