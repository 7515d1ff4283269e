"""What one training step costs, and what is left to win in it (a benchmark, not a test).

    .venv/bin/python bench/bench_step.py                       # the demo task, d128, 20 batches, 5 rounds
    .venv/bin/python bench/bench_step.py --task=numbers --size=d256
    .venv/bin/python bench/bench_step.py --task=real          # real_train_3k's length spread, max length 192

Forward and backward of the demo preset's T5 (no optimizer, no loader) on the first --batches
batches of a learning-bench task (bench/tasks.py: 64 pairs, max length 32) or of
../shared/data/real_train_3k.parquet (``real``: its prompt/response rows as they come, an 8k
tokenizer trained on them, max length --max_len, default 192), fp32, the threads of --threads, in
four ways taken in turn, each round over every batch:

- ``padded``: transformers' T5 on the padded batch, as Seq2SeqTrainer runs it;
- ``grouped``: the same pairs as Seq2SeqTrainer's length-grouped sampler batches them (sorted by
  prompt length within megabatches of 50 batches), padded: the peer's own answer to padding;
- ``packed``: transformers' T5 on the same batch packed (model/data/packing.py), as this toolkit
  trains it: the same loss and gradients in fewer positions;
- ``minimal``: the packed batch through a T5 written out here in a few lines on the SAME weights
  (one fused q/k/v projection per attention, the position bias and the pair masks folded into
  one additive mask per stack, SDPA, no cache, no masks rebuilt per layer, no output objects).
  Its loss and gradients are checked against transformers' first (they agree to float rounding).

Printed: milliseconds per step (median of the rounds), the positions each computes, and the
ratios. ``minimal`` against ``packed`` says how much of a step is transformers' own overhead and not
the model's arithmetic (the matrix products): what a T5 of this toolkit's own could win.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'bench'))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


REAL = os.path.join(ROOT, '..', 'shared', 'data', 'real_train_3k.parquet')
REAL_TOK = os.path.join(ROOT, 'bench', 'out', 'tokenizer_real8k')  # bench_packing.py's, made once


def length_grouped(rows: list, lengths: list[int], batch: int, mega: int = 50) -> list:
    """``rows`` in the order transformers' LengthGroupedSampler gives them, without its random draw
    (the rows already come in a random order): megabatches of ``mega`` batches, each sorted by
    prompt length, longest first."""
    out = []
    for i in range(0, len(rows), mega * batch):
        out += sorted(range(i, min(i + mega * batch, len(rows))), key=lambda k: -lengths[k])
    return [rows[k] for k in out]


def _rms(x, weight, eps: float):
    import torch

    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _attention(x, memory, weights: list, out_weight, mask, heads: int, d_kv: int):
    """Self-attention (memory None: q, k, v in one product) or cross-attention (k, v in one)."""
    import torch
    import torch.nn.functional as F

    b, q = x.shape[:2]
    if memory is None:
        qkv = F.linear(x, torch.cat(weights)).view(b, q, 3, heads, d_kv).permute(2, 0, 3, 1, 4)
        query, key, value = qkv[0], qkv[1], qkv[2]
    else:
        query = F.linear(x, weights[0]).view(b, q, heads, d_kv).transpose(1, 2)
        key, value = F.linear(memory, torch.cat(weights[1:])).view(b, memory.shape[1], 2, heads, d_kv).permute(
            2, 0, 3, 1, 4)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=1.0)  # T5 does not scale
    return F.linear(out.transpose(1, 2).reshape(b, q, heads * d_kv), out_weight)


def _stack(stack, ids, segments, memory=None, memory_segments=None):
    """One T5 stack (transformers' modules, read for their weights only) over a packed batch."""
    import torch
    import torch.nn.functional as F
    from transformers.models.t5.modeling_t5 import T5Attention

    cfg = stack.config
    x = stack.embed_tokens(ids)
    n = ids.shape[1]
    pos = torch.arange(n)
    lowest = torch.finfo(x.dtype).min
    table = stack.block[0].layer[0].SelfAttention.relative_attention_bias
    bias = table(T5Attention._relative_position_bucket(  # transformers' own rule
        pos[None, :] - pos[:, None], bidirectional=not cfg.is_decoder, num_buckets=cfg.relative_attention_num_buckets,
        max_distance=cfg.relative_attention_max_distance)).permute(2, 0, 1)[None]
    allowed = (segments[:, :, None] == segments[:, None, :]) | (segments[:, :, None] == 0)
    if cfg.is_decoder:
        allowed &= torch.ones(n, n, dtype=torch.bool).tril()
        cross = (segments[:, :, None] == memory_segments[:, None, :]) | (segments[:, :, None] == 0)
        cross_mask = torch.zeros(cross[:, None].shape).masked_fill(~cross[:, None], lowest)
    mask = bias.masked_fill(~allowed[:, None], lowest)
    heads, d_kv, eps = cfg.num_heads, cfg.d_kv, cfg.layer_norm_epsilon
    for block in stack.block:
        a = block.layer[0].SelfAttention
        x = x + _attention(_rms(x, block.layer[0].layer_norm.weight, eps), None, [a.q.weight, a.k.weight, a.v.weight],
                           a.o.weight, mask, heads, d_kv)
        if cfg.is_decoder:
            c = block.layer[1].EncDecAttention
            x = x + _attention(_rms(x, block.layer[1].layer_norm.weight, eps), memory,
                               [c.q.weight, c.k.weight, c.v.weight], c.o.weight, cross_mask, heads, d_kv)
        ff = block.layer[-1]
        x = x + F.linear(F.relu(F.linear(_rms(x, ff.layer_norm.weight, eps), ff.DenseReluDense.wi.weight)),
                         ff.DenseReluDense.wo.weight)
    return _rms(x, stack.final_layer_norm.weight, eps)


def minimal_loss(model, batch):
    """The summed token loss of a packed batch through the minimal T5 (relu feed-forward, tied
    embeddings: the demo preset's model)."""
    import torch.nn.functional as F

    memory = _stack(model.encoder, batch['input_ids'], batch['encoder_segments'])
    out = _stack(model.decoder, batch['decoder_input_ids'], batch['decoder_segments'], memory,
                 batch['encoder_segments'])
    logits = F.linear(out * model.config.d_model ** -0.5, model.shared.weight)
    return F.cross_entropy(logits.flatten(0, 1), batch['labels'].flatten(), ignore_index=-100, reduction='sum')


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--task', default='demo', help='demo or numbers (bench/tasks.py), or real (real_train_3k)')
    ap.add_argument('--max_len', type=int, default=0, help='max length a side (0: 32, or 192 for real)')
    ap.add_argument('--size', default='d128', help='d128 (the demo preset) or d256')
    ap.add_argument('--batches', type=int, default=20)
    ap.add_argument('--batch', type=int, default=0, help='pairs a batch (0: the demo preset\'s 64)')
    ap.add_argument('--rounds', type=int, default=5)
    ap.add_argument('--threads', type=int, default=os.cpu_count())
    args = ap.parse_args()
    from heldout import BASE, SIZES  # no torch at its import: the flags are checked before torch loads

    if args.task not in ('demo', 'numbers', 'real') or min(args.batches, args.rounds, args.threads) < 1 or min(
            args.max_len, args.batch) < 0:
        ap.error('--task is demo, numbers or real; --batches, --rounds and --threads are at least 1; --batch >= 0')
    if args.task == 'real' and not os.path.isfile(REAL):
        sys.exit(f'{REAL} is missing: --task=real reads the real rows')
    if args.size not in SIZES:
        ap.error(f'--size is one of {", ".join(SIZES)}')

    import torch

    from config import T5ModelConfig
    from model.data.batches import TokenEncoder, make_batches, to_torch
    from model.data.files import iter_usable_rows
    from model.data.packing import pack_batch
    from model.data.tokenizer import load_tokenizer, train_tokenizer
    from model.net.chat_model import build_model, token_loss_sum
    from tasks import task_files

    torch.set_num_threads(args.threads)
    if args.task == 'real':
        if not os.path.isfile(os.path.join(REAL_TOK, 'tokenizer.json')):
            train_tokenizer(REAL, REAL_TOK, vocab_size=8000, num_threads=os.cpu_count())
        train_file, tok = REAL, load_tokenizer(REAL_TOK)
    else:
        paths = task_files(args.task)
        train_file, tok = paths['train'], load_tokenizer(paths['tok'])
    n, size = args.batch or BASE['batch_size_per_gpu'], args.max_len or (192 if args.task == 'real' else BASE['max_seq_len'])
    rows = list(iter_usable_rows(train_file, n * args.batches))
    encoder = TokenEncoder(tok, size)

    def batches(rs):
        return make_batches([([p for p, _ in rs[i:i + n]], [r for _, r in rs[i:i + n]], None, 0)
                             for i in range(0, len(rs), n)], encoder)

    padded = batches(rows)
    packed = [pack_batch(b, size, SIZES[args.size]['d_model']) for b in padded]
    grouped = batches(length_grouped(rows, list(encoder.encode_lengths([p for p, _ in rows])), n))

    def tensors(b):
        return {k: v for k, v in to_torch(b).items() if isinstance(v, torch.Tensor)}

    padded, packed, grouped = [tensors(b) for b in padded], [tensors(b) for b in packed], [tensors(b) for b in grouped]
    torch.manual_seed(0)
    model = build_model(T5ModelConfig(**SIZES[args.size], dropout_rate=0.0, feed_forward_proj='relu'), len(tok))
    model.train()

    def grads(loss):
        loss.backward()
        out = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        return out

    reference, mine = token_loss_sum(model, packed[0], 'cpu'), minimal_loss(model, packed[0])
    g_ref, g_mine = grads(reference), grads(mine)
    reference, mine = reference.item(), mine.item()
    worst = max(float((g_ref[k] - g_mine[k]).abs().max() / g_ref[k].abs().max().clamp(min=1e-12)) for k in g_ref)
    print(f'minimal T5 against transformers\' on a packed batch: loss {mine:.4f} / {reference:.4f}, '
          f'{len(g_mine)} / {len(g_ref)} gradients, largest difference {worst:.1e} of a gradient\'s largest value')
    if set(g_ref) != set(g_mine) or abs(mine - reference) > 1e-4 * abs(reference) or worst > 1e-3:
        sys.exit('the minimal T5 does not compute what transformers\' does: no timing')

    def transformers_loss(b):
        return token_loss_sum(model, b, 'cpu')

    ways = {'padded': transformers_loss, 'grouped': transformers_loss, 'packed': transformers_loss,
            'minimal': lambda b: minimal_loss(model, b)}
    data = {'padded': padded, 'grouped': grouped, 'packed': packed, 'minimal': packed}
    times = {k: [] for k in ways}
    for way in ways:  # one warm-up round each
        for b in data[way][:3]:
            grads(ways[way](b))
    for _ in range(args.rounds):
        for way, fn in ways.items():
            t = time.perf_counter()
            for b in data[way]:
                fn(b).backward()
                model.zero_grad(set_to_none=True)
            times[way].append((time.perf_counter() - t) / len(data[way]) * 1000)
    ms = {k: statistics.median(v) for k, v in times.items()}

    def positions(bs):
        return sum(b['input_ids'].numel() + b['labels'].numel() for b in bs)

    print(f'{args.task} {args.size}, max length {size}, {args.batches} batches of {n}, {args.threads} thread(s), median of {args.rounds} '
          f'rounds; load average {" ".join(f"{x:.2f}" for x in os.getloadavg())} at the end')
    for way in ways:
        print(f'{way:<8} {ms[way]:7.1f} ms a step  ({positions(data[way]):,} positions; rounds '
              f'{" ".join(f"{x:.1f}" for x in times[way])})')
    for way in ('padded', 'grouped'):
        print(f'{way} / packed {ms[way] / ms["packed"]:.2f}x (positions {positions(data[way]) / positions(packed):.2f}x)')
    print(f'packed / minimal {ms["packed"] / ms["minimal"]:.2f}x')


if __name__ == '__main__':
    main()
