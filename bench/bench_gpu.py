"""The guide's model on one GPU: rows/s, tokens/s, MFU and peak memory, eager against compiled
(a benchmark, not a test).

    .venv/bin/python bench/bench_gpu.py                        # one GPU: bf16, batch 32, max length 192, 200 steps
    .venv/bin/python bench/bench_gpu.py --device=cpu --steps=3 # proves it runs (fp32, no GPU figures)

Model: T5ModelConfig's defaults (d_model 768, 12 heads, d_ff 3072, 10 + 10 layers), vocabulary
32,000, Adafactor as in training, dropout 0.1. Batches have the real length mix: the token lengths
of ../shared/data/real_train_3k.parquet under a tokenizer trained on it (synthetic lengths when
the file is absent), cut at --max_len, grouped by length as the loader groups them; the ids are
random (compute does not depend on them). Each variant runs --warmup steps, then --steps timed.

MFU counts the FLOPs of the real tokens only (model/net/sizing.py flops_per_row: 3 x the forward
matmuls: blocks, output layer, attention scores) against the GPU's dense bf16 peak (--peak_tflops,
989 for an H100/H200); "padded MFU" counts the padded positions the GPU computed too.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REAL = os.path.join(os.path.dirname(ROOT), 'shared', 'data', 'real_train_3k.parquet')
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def real_lengths(max_len: int):
    """(prompt, response) token lengths of the real rows, cut at max_len."""
    import numpy as np

    if not os.path.isfile(REAL):
        rng = np.random.default_rng(0)
        return np.minimum(rng.lognormal(3.2, 0.6, 3000).astype(int) + 2, max_len), \
            np.minimum(rng.lognormal(4.5, 0.6, 3000).astype(int) + 2, max_len)
    from tokenizers import Tokenizer

    tok_dir = os.path.join(ROOT, 'bench', 'out', 'tokenizer_real8k')
    if not os.path.isfile(os.path.join(tok_dir, 'tokenizer.json')):
        from model.data.tokenizer import train_tokenizer

        train_tokenizer(REAL, tok_dir, vocab_size=8000, num_threads=os.cpu_count())
    import pyarrow.parquet as pq

    table = pq.read_table(REAL).to_pydict()
    tok = Tokenizer.from_file(os.path.join(tok_dir, 'tokenizer.json'))
    tok.no_padding()
    tok.enable_truncation(max_len)
    return (np.array([len(e.ids) for e in tok.encode_batch_fast(table['prompt'])]),
            np.array([len(e.ids) for e in tok.encode_batch_fast(table['response'])]))


def make_batches(prompt_lens, response_lens, batch: int, count: int, vocab: int, device):
    """count batches of `batch` rows with the real length mix, grouped as the loader groups."""
    import numpy as np
    import torch

    from model.data.epoch_order import length_group_order

    rng = np.random.default_rng(0)
    out = []
    while len(out) < count:
        pick = rng.integers(0, len(prompt_lens), 64 * batch)
        order = pick[length_group_order(prompt_lens[pick], response_lens[pick], batch, rng)]
        for i in range(0, len(order) - batch + 1, batch):
            rows = order[i:i + batch]
            p, r = prompt_lens[rows], response_lens[rows]
            ids = torch.randint(3, vocab, (batch, int(p.max())))
            mask = (torch.arange(int(p.max()))[None] < torch.as_tensor(p)[:, None]).long()
            labels = torch.randint(3, vocab, (batch, int(r.max())))
            labels[torch.arange(int(r.max()))[None] >= torch.as_tensor(r)[:, None]] = -100
            out.append({'input_ids': (ids * mask).to(device), 'attention_mask': mask.to(device),
                        'labels': labels.to(device), 'real_rows': (int(p.sum()), int(r.sum()))})
    return out[:count]


def run(args, compiled: bool) -> dict:
    import torch
    import torch.nn.functional as F

    from config import T5ModelConfig, TrainConfigPretrainLarge
    from model.net.chat_model import build_model
    from model.net.sizing import flops_per_row
    from model.train.factory import build_optimizer

    device = torch.device(args.device)
    cuda = device.type == 'cuda'
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 leftovers (the fp32 loss, optimizer math)
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(0)
    model_cfg = T5ModelConfig(**json.loads(args.model)) if args.model else T5ModelConfig()
    model = build_model(model_cfg, args.vocab).to(device)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False})
        model.config.use_cache = False
    model.train()
    optimizer = build_optimizer(TrainConfigPretrainLarge(), model)
    decoder_inputs = model.prepare_decoder_input_ids_from_labels
    step_model = torch.compile(model, dynamic=True) if compiled else model
    prompt_lens, response_lens = real_lengths(args.max_len)
    batches = make_batches(prompt_lens, response_lens, args.batch, args.warmup + args.steps, args.vocab, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda)

    def step(b):
        with autocast:
            logits = step_model(input_ids=b['input_ids'], attention_mask=b['attention_mask'],
                                decoder_input_ids=decoder_inputs(labels=b['labels'])).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), b['labels'].flatten(), ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    t_compile = time.perf_counter()
    for b in batches[:args.warmup]:
        step(b)
    sync()
    warmup_s = time.perf_counter() - t_compile
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for b in batches[args.warmup:]:
        step(b)
    sync()
    seconds = time.perf_counter() - t0
    timed = batches[args.warmup:]
    rows = args.batch * len(timed)
    real_p = sum(b['real_rows'][0] for b in timed)
    real_r = sum(b['real_rows'][1] for b in timed)
    padded_p = sum(b['input_ids'].numel() for b in timed)
    padded_r = sum(b['labels'].numel() for b in timed)
    real_flops = sum(flops_per_row(model_cfg, args.vocab, *(x / args.batch for x in b['real_rows'])) * args.batch
                     for b in timed)
    padded_flops = sum(flops_per_row(model_cfg, args.vocab, b['input_ids'].shape[1], b['labels'].shape[1])
                       * args.batch for b in timed)
    peak = args.peak_tflops * 1e12
    return {'variant': 'compiled' if compiled else 'eager', 'rows_per_s': rows / seconds,
            'tokens_per_s': (real_p + real_r) / seconds, 'mfu': real_flops / seconds / peak,
            'padded_mfu': padded_flops / seconds / peak, 'pad_fraction': 1 - (real_p + real_r) / (padded_p + padded_r),
            'peak_gpu_gb': torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
            'mean_prompt': real_p / rows, 'mean_response': real_r / rows, 'warmup_s': warmup_s, 'steps': len(timed)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--device', default='cuda')
    ap.add_argument('--steps', type=int, default=200)
    ap.add_argument('--warmup', type=int, default=20)
    ap.add_argument('--batch', type=int, default=32)
    ap.add_argument('--max_len', type=int, default=192)
    ap.add_argument('--vocab', type=int, default=32000)
    ap.add_argument('--peak_tflops', type=float, default=989.0, help='dense bf16 peak of the GPU (H100/H200: 989)')
    ap.add_argument('--variants', default='eager,compiled')
    ap.add_argument('--gradient_checkpointing', action='store_true')
    ap.add_argument('--model', default='', help='T5ModelConfig fields as JSON, instead of the guide\'s model '
                    '(e.g. a tiny one to check the script)')
    args = ap.parse_args()
    if args.device == 'cpu':
        args.warmup = min(args.warmup, 1)
    import torch

    if args.device.startswith('cuda') and not torch.cuda.is_available():
        sys.exit('error: no CUDA GPU here; run with --device=cpu --steps=3 to check the script')
    results = [run(args, compiled=(v == 'compiled')) for v in args.variants.split(',')]
    from config import T5ModelConfig
    from model.net.sizing import gpu_memory_bytes

    model_cfg = T5ModelConfig(**json.loads(args.model)) if args.model else T5ModelConfig()
    estimate = gpu_memory_bytes(model_cfg, args.vocab, 'adafactor', args.batch, args.max_len, args.max_len,
                                args.gradient_checkpointing)['total'] / 2**30
    print(f'device {args.device}; batch {args.batch}, max length {args.max_len}, {args.steps} timed steps; '
          f'mean real lengths {results[0]["mean_prompt"]:.0f} + {results[0]["mean_response"]:.0f} tokens; '
          f'pad {results[0]["pad_fraction"]:.1%}')
    print(f'{"variant":<9} {"rows/s":>8} {"tokens/s":>10} {"MFU":>6} {"padded MFU":>10} {"peak GPU":>9} '
          f'{"estimate":>9} {"warmup s":>9}')
    for r in results:
        peak = f'{r["peak_gpu_gb"]:.1f} GB' if r['peak_gpu_gb'] is not None else '-'
        print(f'{r["variant"]:<9} {r["rows_per_s"]:>8.1f} {r["tokens_per_s"]:>10.0f} {r["mfu"]:>6.1%} '
              f'{r["padded_mfu"]:>10.1%} {peak:>9} {estimate:>6.1f} GB {r["warmup_s"]:>9.1f}')
    print('RESULT ' + json.dumps(results))


if __name__ == '__main__':
    main()
