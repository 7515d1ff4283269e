"""One Adafactor step, transformers' against this toolkit's (a benchmark, not a test).

    .venv/bin/python bench/bench_optimizer.py                    # demo and 10m shapes, 1 and all threads, ~4 min on 2 cores
    .venv/bin/python bench/bench_optimizer.py --sizes=demo --reps=50 --threads=1

For each model shape (the demo preset's T5: 1.5M parameters; the 10m preset's: the guide's
190M-parameter T5 with a 32k vocabulary) one backward pass leaves gradients, then ``optimizer.step()``
of transformers' ``Adafactor(relative_step=False, warmup_init=False)`` and of
``model/train/adafactor.Adafactor`` (the same arithmetic, weights of one shape at once) are timed
in turn, ``--reps`` times each after a warm-up step, with and without parameter scaling, at each
torch thread count of ``--threads`` (on a CPU small operations can run slower on more threads:
transformers' many small ones most); printed: median milliseconds a step and the ratio
(transformers' / ours). Run it alone: another process on the cores moves these figures widely. The steps change the weights; both
see the same gradients. On a GPU the reference also waits for the device once per weight with
scaling (``max(float, tensor)``); this bench runs where torch runs (--device).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

SHAPES = {'demo': dict(vocab=1300), '10m': dict(vocab=32128)}


def build(size: str, device: str):
    import torch

    from config import PRESETS, T5ModelConfig
    from model.net.chat_model import build_model

    fields = {k: v for k, v in PRESETS['demo'].items() if k in T5ModelConfig.__dataclass_fields__} if size == 'demo' \
        else {}
    torch.manual_seed(0)
    model = build_model(T5ModelConfig(**{**fields, 'dropout_rate': 0.0}), SHAPES[size]['vocab']).to(device)
    x = torch.randint(2, SHAPES[size]['vocab'], (4, 32), device=device)
    model(input_ids=x, labels=x).loss.backward()
    return model


def time_steps(opt, reps: int, device: str) -> float:
    import torch

    def sync():
        if device.startswith('cuda'):
            torch.cuda.synchronize()

    opt.step()  # the state is made on the first step
    sync()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        opt.step()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--sizes', default='demo,10m', help=f'comma-separated, of {", ".join(SHAPES)}')
    ap.add_argument('--reps', type=int, default=20, help='timed steps of each (at least 1)')
    ap.add_argument('--device', default='cpu')
    ap.add_argument('--threads', default=f'1,{os.cpu_count()}', help='torch thread counts, comma-separated')
    args = ap.parse_args()
    sizes = args.sizes.split(',')
    unknown = [s for s in sizes if s not in SHAPES]
    if unknown or args.reps < 1:
        ap.error(f'unknown size {", ".join(unknown)} (choose from {", ".join(SHAPES)})' if unknown
                 else f'--reps={args.reps}: give at least 1')
    try:
        threads = sorted({int(x) for x in args.threads.split(',')})
    except ValueError:
        threads = [0]
    if min(threads) < 1 or max(threads) > 4 * (os.cpu_count() or 1):
        ap.error(f'--threads={args.threads}: give whole numbers from 1 to {4 * (os.cpu_count() or 1)}, comma-separated')
    import torch  # only now: a mistaken flag is said without the seconds torch takes to import
    from transformers.optimization import Adafactor as Reference

    from model.train.adafactor import Adafactor

    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        ap.error(f'--device={args.device}: {e}')
    if device.type == 'cuda' and not torch.cuda.is_available():
        ap.error(f'--device={args.device}: no CUDA device here')
    print(f'bench_optimizer: {args.device}, load average {" ".join(f"{x:.2f}" for x in os.getloadavg())}; '
          f'median ms of {args.reps} steps')
    for size in sizes:
        model = build(size, args.device)
        params = sum(p.numel() for p in model.parameters())
        for n in threads:
            torch.set_num_threads(n)
            for scale in (True, False):
                ref = time_steps(Reference(model.parameters(), lr=1e-3, relative_step=False, warmup_init=False,
                                           scale_parameter=scale), args.reps, args.device)
                ours = time_steps(Adafactor(model.parameters(), lr=1e-3, scale_parameter=scale), args.reps,
                                  args.device)
                print(f'{size:>5} ({params / 1e6:.1f}M parameters), {n} thread(s), scale_parameter={scale!s:<5}: '
                      f'transformers {ref:8.2f} ms, this toolkit {ours:8.2f} ms, ratio {ref / ours:.2f}x', flush=True)


if __name__ == '__main__':
    main()
