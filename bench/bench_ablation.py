"""The ablation upstream never ran (ChatLM-mini-Chinese issue #34): at the same compute, does
T5's span corruption on raw text before the prompt/response pairs make a better model than the
pairs alone? A benchmark, not a test: every run is the CLI a user types, printed as it runs.

    .venv/bin/python bench/bench_ablation.py                          # demo corpus, arms a and b, 2 seeds: 22 min here
    .venv/bin/python bench/bench_ablation.py --corpus=real --steps=400  # the real 3k pairs (slower, near the plateau)
    .venv/bin/python bench/bench_ablation.py --seeds=1 --steps=100      # a quick look

Arms, each ``--steps`` optimizer steps of the same batch and length (the same model, tokenizer,
optimizer and schedule shape):
  (a) pairs only: ``--steps`` steps on the prompt/response pairs;
  (b) two stages: ``--span_share`` of the steps span corruption on raw text, then the rest on the
      pairs, warm-started (``--init_from``) with a fresh optimizer and schedule;
  (c) with ``--arms=a,b,c``, not the same compute: (b)'s span-corruption stage, then all
      ``--steps`` on the pairs: what the pretraining adds when the pairs get their full budget.
Scored on held-out pairs with ``train_low_mem.py test`` (loss, BLEU-4, exact match).

Corpora: ``demo`` is the built-in corpus (``prepare_data.py demo``: templated tasks whose held-out
prompts are unseen; the demo preset's model and recipe); ``real`` is ../shared/data/real_train_3k
(held out: real_valid_1k). In both the raw text is the training pairs written as documents
(prompt, newline, response): the arms see the same text and differ only in the objective. The
tokenizer is trained on the pairs as the demo does (+ 100 sentinels). Span-corruption steps hold
full inputs of max_seq_len tokens (a pairs step is padded to its batch's longest row), so arm (b)
processes more tokens: the table gives each arm's tokens and seconds beside the scores.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, 'bench', 'out', 'ablation')
SHARED = os.path.join(os.path.dirname(ROOT), 'shared', 'data')
CORPORA = {  # pairs (train, held out), and what the runs change of the demo preset
    'demo': {'train': os.path.join(OUT, 'demo', 'train.parquet'), 'valid': os.path.join(OUT, 'demo', 'valid.parquet'),
             'vocab_size': 1200, 'flags': {}},
    'real': {'train': os.path.join(SHARED, 'real_train_3k.parquet'),
             'valid': os.path.join(SHARED, 'real_valid_1k.parquet'), 'vocab_size': 6000,
             'flags': {'max_seq_len': 64, 'batch_size_per_gpu': 32, 'num_layers': 2, 'num_decoder_layers': 2,
                       'learn_rate': 1e-3}},
}
RECIPE = dict(preset='demo', mixed_precision='no', epochs=1000, logging_steps=25, save_steps=10**6, eval_steps=0,
              max_eval_rows=256, bleu_samples=0, show_samples=0)
ARGS = None
# one thread: the scores are per step, and a machine shared with other work spins OpenMP threads
ENV = {**os.environ, 'HF_HUB_OFFLINE': '1', 'TRANSFORMERS_OFFLINE': '1', 'TOKENIZERS_PARALLELISM': 'false',
       'OMP_NUM_THREADS': os.environ.get('OMP_NUM_THREADS', '1')}


def sh(args: list[str]) -> str:
    """Run a CLI command of this toolkit, printed as a user would type it; its output."""
    print('$ python ' + ' '.join(args), flush=True)
    r = subprocess.run([sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f'failed ({r.returncode}):\n{(r.stdout + r.stderr)[-3000:]}')
    return r.stdout


def flags(d: dict) -> list[str]:
    return [f'--{k}={v}' for k, v in d.items()]


def prepare(corpus: str) -> tuple[str, str, str]:
    """(text train file, text validation file, tokenizer folder) of the corpus, made once."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    c = CORPORA[corpus]
    base = os.path.join(OUT, corpus)
    os.makedirs(base, exist_ok=True)
    if corpus == 'demo' and not os.path.exists(c['valid']):
        sh(['prepare_data.py', 'demo', f'--out_dir={base}'])
    text, text_valid, tok = (os.path.join(base, n) for n in ('text_train.parquet', 'text_valid.parquet', 'tokenizer'))
    if not os.path.exists(text_valid):
        for src, dst in ((c['train'], text), (c['valid'], text_valid)):
            t = pq.read_table(src, columns=['prompt', 'response']).to_pydict()
            docs = [f'{p}\n{r}' for p, r in zip(t['prompt'], t['response'])]
            pq.write_table(pa.table({'text': docs}), dst)
    if not os.path.isfile(os.path.join(tok, 'tokenizer.json')):
        sh(['train_low_mem.py', 'train_tokenizer', '--preset=demo', f'--train_file={c["train"]}',
            f'--tokenizer_dir={tok}', f'--vocab_size={c["vocab_size"]}'])
    return text, text_valid, tok


def train(run: str, steps: int, seed: int, tok: str, **extra) -> dict:
    out = os.path.join(OUT, ARGS.corpus, run)
    paths = dict(tokenizer_dir=tok, output_dir=out, train_state_dir=f'{out}/state', model_file=f'{out}/m.{{}}.bin',
                 log_dir=f'{out}/logs')
    start = time.perf_counter()
    sh(['train_low_mem.py', 'train', *flags({**RECIPE, **CORPORA[ARGS.corpus]['flags'], **paths, 'seed': seed,
                                            'max_steps': steps, 'warmup_steps': max(1, steps // 20), **extra})])
    seconds = time.perf_counter() - start
    log = open(max((os.path.join(out, 'logs', f) for f in os.listdir(f'{out}/logs')), key=os.path.getmtime),
               encoding='utf-8').read()
    batch = int(CORPORA[ARGS.corpus]['flags'].get('batch_size_per_gpu', 64))
    tokens = sum(float(s) * 25 * batch / float(r) for r, s in  # tokens/s x the interval's seconds
                 re.findall(r'([0-9.]+) samples/s \| ([0-9.]+) tokens/s', log))
    return {'model': f'{out}/final', 'seconds': seconds, 'tokens': tokens}


def score(model: str, tok: str, rows: int) -> dict:
    text = sh(['train_low_mem.py', 'test', '--preset=demo', f'--model_dir={model}',
               f'--test_file={CORPORA[ARGS.corpus]["valid"]}', f'--max_test_rows={rows}',
               f'--out={model}.predictions.jsonl'])
    m = re.search(r'loss ([0-9.]+) \| perplexity ([0-9.]+) \| BLEU-4 ([0-9.]+) \| exact match ([0-9.]+)%', text)
    if not m:
        raise SystemExit(f'no scores in:\n{text}')
    return {'loss': float(m.group(1)), 'bleu': float(m.group(3)), 'em': float(m.group(4))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--corpus', choices=sorted(CORPORA), default='demo')
    ap.add_argument('--seeds', default='1,2')
    ap.add_argument('--steps', type=int, default=1500, help='optimizer steps of each arm')
    ap.add_argument('--span_share', type=float, default=0.5, help="arm (b): the share of the steps on span corruption")
    ap.add_argument('--test_rows', type=int, default=500)
    ap.add_argument('--arms', default='a,b', help='a: pairs only; b: span then pairs, same steps; c: span then all the '
                                                  'steps on pairs (more compute)')
    args = ap.parse_args()
    global ARGS
    ARGS = args
    c = CORPORA[args.corpus]
    print(f'{os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}; {args.steps} steps an arm, '
          f'{args.span_share:.0%} of arm (b) span corruption', flush=True)
    text, text_valid, tok = prepare(args.corpus)
    rows = []
    arms = args.arms.split(',')
    for seed in [int(s) for s in args.seeds.split(',')]:
        if 'a' in arms:
            a = train(f'a_pairs{args.steps}_s{seed}', args.steps, seed, tok, train_file=c['train'],
                      validation_file=c['valid'])
            rows.append({'arm': '(a) pairs only', 'seed': seed, **score(a['model'], tok, args.test_rows),
                         'seconds': a['seconds'], 'tokens': a['tokens']})
        k = int(round(args.steps * args.span_share))
        if 'b' in arms or 'c' in arms:
            b1 = train(f'b_span{k}_s{seed}', k, seed, tok, train_file=text, validation_file=text_valid,
                       objective='span_corruption')
        for arm, pairs_steps in (('b', args.steps - k), ('c', args.steps)):
            if arm not in arms:
                continue
            b2 = train(f'{arm}_pairs{pairs_steps}_s{seed}', pairs_steps, seed, tok, train_file=c['train'],
                       validation_file=c['valid'], init_from=b1['model'])
            rows.append({'arm': f'({arm}) span {k} + pairs {pairs_steps}', 'seed': seed,
                         **score(b2['model'], tok, args.test_rows), 'seconds': b1['seconds'] + b2['seconds'],
                         'tokens': b1['tokens'] + b2['tokens']})
        print(json.dumps(rows[-len(arms):], ensure_ascii=False), flush=True)
    print(f'\n{args.corpus} corpus; held-out pairs: the first {args.test_rows} rows of {c["valid"]}; '
          f'{args.steps} optimizer steps an arm; the demo preset with {c["flags"] or "no changes"}')
    print('| arm | seed | test loss | BLEU-4 | exact match | tokens trained | seconds |\n|---|---|---|---|---|---|---|')
    for r in rows:
        print(f'| {r["arm"]} | {r["seed"]} | {r["loss"]:.4f} | {r["bleu"]:.2f} | {r["em"]:.1f}% | '
              f'{r["tokens"] / 1e6:.2f}M | {r["seconds"]:.0f} |')
    for arm in dict.fromkeys(r['arm'] for r in rows):
        mine = [r for r in rows if r['arm'] == arm]
        print(f'| {arm} | median | {statistics.median(r["loss"] for r in mine):.4f} | '
              f'{statistics.median(r["bleu"] for r in mine):.2f} | {statistics.median(r["em"] for r in mine):.1f}% | '
              f'{statistics.median(r["tokens"] for r in mine) / 1e6:.2f}M | '
              f'{statistics.median(r["seconds"] for r in mine):.0f} |')
    name = f'results-{args.arms.replace(",", "")}-{args.steps}.json'
    with open(os.path.join(OUT, args.corpus, name), 'w', encoding='utf-8') as f:
        json.dump(rows, f, ensure_ascii=False, indent=1)


if __name__ == '__main__':
    main()
