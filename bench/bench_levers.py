"""Each speed lever on and off, on this machine (a benchmark, not a test).

    .venv/bin/python bench/bench_levers.py                 # CPU: the tiny model, ~3 min
    .venv/bin/python bench/bench_levers.py --device=cuda   # a GPU: also TF32, fused AdamW, pinned memory

One forward + backward + optimizer step of a tiny T5 (or --size=small) on fixed
batches with the real length mix, timed after warm-up steps, each variant in this process one
after another: the attention implementation (transformers 5's T5 under sdpa or eager),
torch.compile, foreach / fused AdamW against the per-tensor loop, and on CUDA TF32 and pinned
host memory for the batch copies. The data pipeline's own levers (workers, length grouping) are
in bench_data.py and bench_train.py.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, 'bench'))

# the shapes and batch of the speed benchmarks on real_train_3k's length mix
SIZES = {'tiny': dict(d_model=128, num_heads=4, d_kv=32, d_ff=512, num_layers=2, num_decoder_layers=2),
         'small': dict(d_model=256, num_heads=4, d_kv=64, d_ff=1024, num_layers=4, num_decoder_layers=4)}
COMMON = dict(batch_size_per_gpu=16, max_seq_len=128, dropout_rate=0.1)


def main() -> None:
    import torch
    import torch.nn.functional as F

    from bench_gpu import make_batches, real_lengths
    from config import T5ModelConfig
    from model.net.chat_model import build_t5_config

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--device', default='cpu')
    ap.add_argument('--size', default='tiny', choices=sorted(SIZES))
    ap.add_argument('--steps', type=int, default=20)
    ap.add_argument('--warmup', type=int, default=3)
    args = ap.parse_args()
    device = torch.device(args.device)
    cuda = device.type == 'cuda'
    batch, max_len, vocab = COMMON['batch_size_per_gpu'], COMMON['max_seq_len'], 8000
    prompt_lens, response_lens = real_lengths(max_len)
    host = make_batches(prompt_lens, response_lens, batch, args.warmup + args.steps, vocab, 'cpu')

    def timed(name, attn='sdpa', compiled=False, optimizer='adamw-loop', tf32=False, pinned=False):
        from transformers import T5ForConditionalGeneration

        torch.manual_seed(0)
        torch.backends.cuda.matmul.allow_tf32 = tf32
        config = build_t5_config(T5ModelConfig(dropout_rate=COMMON['dropout_rate'], **SIZES[args.size]), vocab)
        config._attn_implementation = attn
        model = T5ForConditionalGeneration(config).to(device).train()
        kind = optimizer.split('-')[1]
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=kind == 'foreach', fused=kind == 'fused')
        run = torch.compile(model, dynamic=True) if compiled else model
        decoder_inputs = model.prepare_decoder_input_ids_from_labels
        batches = [{k: (v.pin_memory() if pinned else v) for k, v in b.items() if k != 'real_rows'} for b in host]

        def step(b):
            b = {k: v.to(device, non_blocking=pinned) for k, v in b.items()}
            logits = run(input_ids=b['input_ids'], attention_mask=b['attention_mask'],
                         decoder_input_ids=decoder_inputs(labels=b['labels'])).logits
            F.cross_entropy(logits.float().flatten(0, 1), b['labels'].flatten(), ignore_index=-100).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        for b in batches[:args.warmup]:
            step(b)
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for b in batches[args.warmup:]:
            step(b)
        if cuda:
            torch.cuda.synchronize()
        ms = 1000 * (time.perf_counter() - t0) / args.steps
        print(f'  {name:<40} {ms:8.1f} ms/step', flush=True)
        return ms

    print(f'{args.size} T5 ({SIZES[args.size]}), batch {batch}, max length {max_len}, {args.steps} steps on '
          f'{args.device} ({torch.get_num_threads()} threads)')
    base = timed('baseline: sdpa attention, AdamW loop')
    levers = [('attention eager', dict(attn='eager')),
              ('AdamW foreach', dict(optimizer='adamw-foreach')),
              ('torch.compile (dynamic shapes)', dict(compiled=True))]
    if cuda:
        levers += [('AdamW fused', dict(optimizer='adamw-fused')), ('TF32 matmuls', dict(tf32=True)),
                   ('pinned memory, non_blocking copies', dict(pinned=True))]
    for name, kw in levers:
        try:
            ms = timed(name, **kw)
            print(f'  {"":<40} {base / ms:8.2f}x the baseline')
        except Exception as e:  # noqa: BLE001 - a lever this machine cannot run is reported, not fatal
            print(f'  {name:<40} failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}')


if __name__ == '__main__':
    main()
