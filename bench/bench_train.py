"""This toolkit against transformers' Seq2SeqTrainer, the trainer users would otherwise pick
(a benchmark, not a test).

    .venv/bin/python bench/bench_train.py                         # both model sizes, 3 seeds each, ~35 min on 2 cores
    .venv/bin/python bench/bench_train.py --sizes=tiny --seeds=42  # a quick look

Same model (T5, fp32), data (../shared/data/real_train_3k.parquet, one epoch; validation: the
first 256 rows of real_valid_1k), tokenizer (sentencepiece, vocab 8000, trained on the train
file), optimizer (Adafactor, lr 1e-2, no relative step), schedule (10 warmup steps, cosine),
batch 16 x accumulation 2, max length 128, dropout 0.1, on the CPU. One run of each per seed
(42, 43, 44 by default: a seed sets the initial weights and the data order of both), alternating
(ours, peer, ours, peer, ...), each in a fresh process; the figures are medians over the seeds.
After one epoch of 3k rows both are near the token-frequency plateau, where a single seed's data
order moves the final validation loss by a few hundredths: hence several seeds, not one repeated.

Every 10 optimizer steps both are paused and scored with one function: the token-weighted
validation loss on the same padded batches; evaluation time is left out of the training time.
"time to the peer's final validation loss" is our training time until our validation loss first
reaches the loss the peer ends its epoch with under the same seed, against the peer's whole
training time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, 'bench', 'out')
SHARED = os.path.join(os.path.dirname(ROOT), 'shared', 'data')
TRAIN, VALID = os.path.join(SHARED, 'real_train_3k.parquet'), os.path.join(SHARED, 'real_valid_1k.parquet')
SIZES = {'tiny': dict(d_model=128, num_heads=4, d_kv=32, d_ff=512, num_layers=2, num_decoder_layers=2),
         'small': dict(d_model=256, num_heads=4, d_kv=64, d_ff=1024, num_layers=4, num_decoder_layers=4)}
COMMON = dict(batch_size_per_gpu=16, gradient_accumulation_steps=2, max_seq_len=128, learn_rate=1e-2,
              warmup_steps=10, lr_schedule='cosine', optimizer='adafactor', weight_decay=0.0, max_grad_norm=1.0,
              dropout_rate=0.1, epochs=1, mixed_precision='no')
EVAL_EVERY, EVAL_ROWS = 10, 256
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def tokenizer_dir() -> str:
    d = os.path.join(OUT, 'tokenizer_real8k')
    if not os.path.isfile(os.path.join(d, 'tokenizer.json')):
        from model.data.tokenizer import train_tokenizer

        train_tokenizer(TRAIN, d, vocab_size=8000, num_threads=os.cpu_count())
    return d


# --------------------------------------------------------------------------- shared measures


class ValidationScorer:
    """The token-weighted validation loss of any T5 on fixed padded batches (one function for both)."""

    def __init__(self, tok_dir: str):
        from model.data.files import iter_usable_rows
        from model.data.batches import TokenEncoder, make_batches, to_torch
        from model.data.tokenizer import load_tokenizer

        encoder = TokenEncoder(load_tokenizer(tok_dir), COMMON['max_seq_len'])
        rows = list(iter_usable_rows(VALID, EVAL_ROWS))
        self.batches = [to_torch(b) for b in make_batches(
            [([p for p, _ in rows[i:i + 32]], [r for _, r in rows[i:i + 32]], None, 0) for i in range(0, len(rows), 32)],
            encoder)]

    def __call__(self, model) -> float:
        import torch
        import torch.nn.functional as F

        was = model.training
        model.eval()
        total, tokens = 0.0, 0
        with torch.no_grad():
            for b in self.batches:
                dec = model.prepare_decoder_input_ids_from_labels(labels=b['labels'])
                logits = model(input_ids=b['input_ids'], attention_mask=b['attention_mask'], decoder_input_ids=dec).logits
                total += float(F.cross_entropy(logits.flatten(0, 1), b['labels'].flatten(), ignore_index=-100,
                                               reduction='sum'))
                tokens += int((b['labels'] != -100).sum())
        model.train(was)
        return total / tokens


class Clock:
    """Training time with the evaluations taken out."""

    def __init__(self):
        self.start, self.paused = time.perf_counter(), 0.0

    def train_seconds(self) -> float:
        return time.perf_counter() - self.start - self.paused

    def score(self, fn):
        t = time.perf_counter()
        try:
            return fn()
        finally:
            self.paused += time.perf_counter() - t


def peak_rss_mb() -> float:
    with open('/proc/self/status') as f:
        return next(int(line.split()[1]) for line in f if line.startswith('VmHWM:')) / 1024


# --------------------------------------------------------------------------- the two trainers


def run_ours(size: str, seed: int, tok_dir: str, extra: dict) -> dict:
    import torch

    from config import resolve_config
    from model.train import trainer as trainer_module
    from model.train.evaluation import EvalResult

    torch.set_num_threads(os.cpu_count())
    work = tempfile.mkdtemp(prefix='bench-ours-')
    overrides = {**COMMON, **SIZES[size], **extra, 'seed': seed, 'train_file': TRAIN, 'validation_file': VALID,
                 'tokenizer_dir': tok_dir, 'output_dir': work, 'train_state_dir': f'{work}/state',
                 'model_file': f'{work}/m.{{}}.bin', 'log_dir': f'{work}/logs', 'save_steps': 10**6,
                 'logging_steps': EVAL_EVERY, 'eval_steps': EVAL_EVERY, 'bleu_samples': 0, 'show_samples': 0}
    cfg = resolve_config(overrides=overrides)
    trainer = trainer_module.Trainer(cfg)
    scorer, curve, counts = ValidationScorer(tok_dir), [], {'real': 0, 'padded': 0, 'rows': 0}
    clock = Clock()

    def evaluate(model):
        loss = clock.score(lambda: scorer(trainer.accelerator.unwrap_model(model)))
        curve.append((trainer.state.global_step, clock.train_seconds(), loss))
        return EvalResult(loss=loss)

    trainer.evaluator.evaluate_all_ranks = evaluate
    step = trainer.train_step

    def counting_step(micro, label_tokens, global_tokens):
        for b in micro:
            counts['real'] += int(b['attention_mask'].sum()) + int((b['labels'] != -100).sum())
            counts['padded'] += b['input_ids'].numel() + b['labels'].numel()
            counts['rows'] += b['num_rows']
        return step(micro, label_tokens, global_tokens)

    trainer.train_step = counting_step
    clock.start = time.perf_counter()
    trainer.train()
    seconds = curve[-1][1]
    log = open(trainer.log_file, encoding='utf-8').read()
    import re

    final_loss = float(re.findall(r'\| loss ([0-9.]+)', log)[-1])
    return result('ours', curve, counts, seconds, final_loss)


def run_peer(size: str, seed: int, tok_dir: str, extra: dict) -> dict:
    import torch
    from transformers import (DataCollatorForSeq2Seq, Seq2SeqTrainer, Seq2SeqTrainingArguments, TrainerCallback,
                              set_seed)

    from config import T5ModelConfig
    from model.net.chat_model import build_model
    from model.data.files import iter_usable_rows
    from model.data.tokenizer import load_tokenizer

    torch.set_num_threads(os.cpu_count())
    set_seed(seed)
    tok = load_tokenizer(tok_dir)
    model = build_model(T5ModelConfig(dropout_rate=COMMON['dropout_rate'], **SIZES[size]), len(tok))
    rows = list(iter_usable_rows(TRAIN, 10**9))  # as a user would: tokenize up front
    t0 = time.perf_counter()
    enc = tok([p for p, _ in rows], truncation=True, max_length=COMMON['max_seq_len'])
    lab = tok([r for _, r in rows], truncation=True, max_length=COMMON['max_seq_len'])['input_ids']
    dataset = [{'input_ids': i, 'attention_mask': m, 'labels': y}
               for i, m, y in zip(enc['input_ids'], enc['attention_mask'], lab)]
    tokenize_s = time.perf_counter() - t0
    collator = DataCollatorForSeq2Seq(tok, model=model, label_pad_token_id=-100, padding='longest')
    counts = {'real': 0, 'padded': 0, 'rows': 0}

    def counting_collator(features):
        batch = collator(features)
        counts['real'] += int(batch['attention_mask'].sum()) + int((batch['labels'] != -100).sum())
        counts['padded'] += batch['input_ids'].numel() + batch['labels'].numel()
        counts['rows'] += len(features)
        return batch

    work = tempfile.mkdtemp(prefix='bench-peer-')
    args = Seq2SeqTrainingArguments(
        output_dir=work, per_device_train_batch_size=COMMON['batch_size_per_gpu'],
        gradient_accumulation_steps=COMMON['gradient_accumulation_steps'], learning_rate=COMMON['learn_rate'],
        lr_scheduler_type=COMMON['lr_schedule'], warmup_steps=COMMON['warmup_steps'], optim='adafactor',
        weight_decay=COMMON['weight_decay'], max_grad_norm=COMMON['max_grad_norm'], num_train_epochs=1,
        seed=seed, logging_steps=EVAL_EVERY, save_strategy='no', report_to=[], use_cpu=True,
        dataloader_num_workers=0, disable_tqdm=True, **extra)
    scorer, curve, clock = ValidationScorer(tok_dir), [], Clock()

    class Score(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step % EVAL_EVERY == 0 or state.global_step == state.max_steps:
                loss = clock.score(lambda: scorer(model))
                curve.append((state.global_step, clock.train_seconds(), loss))

    trainer = Seq2SeqTrainer(model=model, args=args, train_dataset=dataset, data_collator=counting_collator,
                             callbacks=[Score()])
    clock.start = time.perf_counter()
    trainer.train()
    seconds = curve[-1][1]
    final_loss = [h['loss'] for h in trainer.state.log_history if 'loss' in h][-1]
    out = result('peer', curve, counts, seconds, final_loss)
    out['tokenize_s'] = tokenize_s
    return out


def result(who, curve, counts, seconds, final_loss) -> dict:
    return {'who': who, 'curve': curve, 'train_s': seconds, 'samples_per_s': counts['rows'] / seconds,
            'tokens_per_s': counts['real'] / seconds, 'pad_fraction': 1 - counts['real'] / counts['padded'],
            'final_train_loss': final_loss, 'final_val_loss': curve[-1][2], 'peak_rss_mb': peak_rss_mb()}


# --------------------------------------------------------------------------- parent


def run_child(kind: str, size: str, seed: int, extra: dict) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), '--child', json.dumps([kind, size, seed, extra])]
    env = dict(os.environ, HF_HUB_OFFLINE='1', TRANSFORMERS_OFFLINE='1', TOKENIZERS_PARALLELISM='false')
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    for line in proc.stdout.splitlines():
        if line.startswith('RESULT '):
            return json.loads(line[7:])
    raise RuntimeError(f'{kind} {size}: failed\n{proc.stderr[-3000:]}')


def time_to(curve, target: float) -> float | None:
    for _, seconds, loss in curve:
        if loss <= target:
            return seconds
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--sizes', default='tiny,small')
    ap.add_argument('--seeds', default='42,43,44', help='one run of each trainer per seed')
    ap.add_argument('--ours', default='{}', help='extra config fields for this toolkit, as JSON')
    ap.add_argument('--peer', default='{}', help='extra Seq2SeqTrainingArguments, as JSON')
    ap.add_argument('--child', help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, size, seed, extra = json.loads(args.child)
        out = (run_ours if kind == 'ours' else run_peer)(size, seed, tokenizer_dir(), extra)
        out['seed'] = seed
        print('RESULT ' + json.dumps(out), flush=True)
        return
    os.makedirs(OUT, exist_ok=True)
    tokenizer_dir()
    print(f'{os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}; ours {args.ours}; peer {args.peer}')
    seeds = [int(s) for s in str(args.seeds).split(',')]
    for size in args.sizes.split(','):
        runs = {'ours': [], 'peer': []}
        for seed in seeds:
            for kind in ('ours', 'peer'):
                r = run_child(kind, size, seed, json.loads(args.ours if kind == 'ours' else args.peer))
                runs[kind].append(r)
                print(f'  {size} seed {seed} {kind}: {r["train_s"]:.1f} s, {r["samples_per_s"]:.1f} samples/s, '
                      f'val {r["final_val_loss"]:.4f}', flush=True)
        for r, p in zip(runs['ours'], runs['peer']):  # the peer's run under the same seed
            r['time_to_peer_s'] = time_to(r['curve'], p['final_val_loss'])
            print(f'  {size} seed {r["seed"]}: ours reaches the peer\'s {p["final_val_loss"]:.4f} at '
                  + (f'{r["time_to_peer_s"]:.1f} s' if r['time_to_peer_s'] is not None else 'no point')
                  + f' of {r["train_s"]:.1f} s; the peer ends at {p["train_s"]:.1f} s')
        for r in runs['peer']:
            r['time_to_peer_s'] = r['train_s']
        med = {k: {m: statistics.median(x[m] for x in v if x.get(m) is not None)
                   for m in ('samples_per_s', 'tokens_per_s', 'pad_fraction', 'peak_rss_mb', 'final_train_loss',
                             'final_val_loss', 'train_s')} for k, v in runs.items()}
        reached = [r['time_to_peer_s'] for r in runs['ours'] if r['time_to_peer_s'] is not None]
        # a run that never reached the peer's loss counts as infinitely slow, not as left out
        med['ours']['time_to_peer_s'] = statistics.median(
            r['time_to_peer_s'] if r['time_to_peer_s'] is not None else float('inf') for r in runs['ours'])
        speedups = [p['train_s'] / r['time_to_peer_s'] if r['time_to_peer_s'] else 0.0
                    for r, p in zip(runs['ours'], runs['peer'])]
        med['peer']['time_to_peer_s'] = med['peer']['train_s']
        print(f'\n{size} ({SIZES[size]}), medians over seeds {seeds}:')
        print(f'{"":<6} {"samples/s":>10} {"tokens/s":>9} {"pad":>6} {"peak RSS":>9} {"train loss":>10} '
              f'{"val loss":>9} {"epoch s":>8} {"to peer val":>11}')
        for k in ('ours', 'peer'):
            m = med[k]
            print(f'{k:<6} {m["samples_per_s"]:>10.1f} {m["tokens_per_s"]:>9.0f} {m["pad_fraction"]:>6.1%} '
                  f'{m["peak_rss_mb"]:>6.0f} MB {m["final_train_loss"]:>10.4f} {m["final_val_loss"]:>9.4f} '
                  f'{m["train_s"]:>8.1f} {m["time_to_peer_s"]:>10.1f}s')
        print(f'samples/s ratio {med["ours"]["samples_per_s"] / med["peer"]["samples_per_s"]:.2f}x; time to the '
              f'peer\'s final validation loss: {statistics.median(speedups):.2f}x faster, median over the seeds '
              f'(per seed {", ".join(f"{x:.2f}x" for x in speedups)}; {len(reached)}/{len(seeds)} of our runs '
              f'reached it)', flush=True)


if __name__ == '__main__':
    main()
