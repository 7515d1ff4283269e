"""Which recipe learns fastest per compute (a benchmark, not a test): the same optimizer steps of the
same batch for every setting, scored on held-out prompts.

    .venv/bin/python bench/bench_recipe.py                          # the full table, ~45 min on two busy cores
    .venv/bin/python bench/bench_recipe.py --quick                  # two settings, a few steps: does it run
    .venv/bin/python bench/bench_recipe.py --phases=1 --lrs='{"adamw": [5e-4]}'   # more rates, phase 1 only
    .venv/bin/python bench/bench_recipe.py --task=demo --steps=800 --settings='[{...}, {...}]'  # given settings only

The task is ``numbers`` of bench/tasks.py (Chinese numerals <-> digits with held-out numbers,
weekdays and months), batch 64 drawn at random (not grouped by length, as the demo preset), packed,
max_seq_len 32, fp32, cosine schedule, this toolkit's trainer.
Three phases, each setting run once per seed in a fresh process with one thread, --jobs of them at
a time (the figures are step-based, so the machine's load does not change them, only how long the
table takes):

1. at the first size (d128, the demo preset's shape): optimizer x learning rate -- Adafactor
   without parameter scaling (the toolkit's default), with it (``--adafactor_scale_parameter``:
   the rate is relative to each weight's RMS), AdamW -- a few rates each, warmup 5% of the run;
2. at the first size, around the best of phase 1 (median exact match, then validation loss):
   warmup as fixed steps (a third of the run, as the guide's 1,024 steps are for a short run)
   instead of 5%, dropout 0.1 instead of 0, gated-gelu instead of relu, the embedding, layer norms
   and position biases with Adam at their own rate (``--aux_learn_rate``);
3. at the second size (d256, ~4x the compute a step): each optimizer at its best rate of phase 1.

Each run reports the held-out validation loss and exact match (bench/heldout.py) halfway and at
the end; the table gives the medians over the seeds and every seed's final exact match.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, 'bench', 'out')
sys.path.insert(0, os.path.join(ROOT, 'bench'))
import heldout  # noqa: E402  (no torch at its import)

LRS = {  # the rates tried per optimizer (phase 1); the guide's 1e-4 for Adafactor as the reference point
    'adafactor': (1e-4, 1e-3, 1e-2),
    'adafactor+scale': (1e-2, 3e-2),
    'adamw': (1e-3, 2e-3, 4e-3),
}
# what phase 2 varies, and batches as the demo preset and the recommended recipe draw them: not grouped by
# length (the config's default groups them: one task a batch here, which learns far less per step)
AUX_LEARN_RATE = 0.05  # phase 2's --aux_learn_rate (bench/RECIPE_NOTES.md, section "aux_learn_rate")
RECIPE = dict(warmup_ratio=0.05, dropout_rate=0.0, feed_forward_proj='relu', group_by_length=False)


def optimizer_fields(name: str) -> dict:
    return {'optimizer': name.split('+')[0], 'adafactor_scale_parameter': name.endswith('+scale')}


def setting(name: str, lr: float, **changed) -> dict:
    return {**RECIPE, **optimizer_fields(name), 'learn_rate': lr, **changed}


def label(fields: dict) -> str:
    opt = fields['optimizer'] + ('+scale' if fields.get('adafactor_scale_parameter') else '')
    warm = (f'warmup {fields["warmup_steps"]} steps' if not fields.get('warmup_ratio')
            else f'warmup {fields["warmup_ratio"]:.0%}')
    shown = {'optimizer', 'adafactor_scale_parameter', 'learn_rate', 'warmup_ratio', 'warmup_steps', 'dropout_rate',
             'feed_forward_proj', 'group_by_length', 'aux_learn_rate'}
    other = ''.join(f' {k}={v}' for k, v in fields.items() if k not in shown)  # e.g. a d_ff of the setting's own
    return (f'{opt:<15} lr {fields["learn_rate"]:<6g} {warm:<17} dropout {fields["dropout_rate"]:<3g} '
            f'{fields["feed_forward_proj"]}' + (' grouped' if fields.get('group_by_length', True) else '')
            + (f' aux {fields["aux_learn_rate"]:g}' if fields.get('aux_learn_rate') else '') + other)


def run_child(task: str, size: str, seed: int, steps: int, fields: dict) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), '--child', json.dumps([task, size, seed, steps, fields])]
    env = dict(os.environ, HF_HUB_OFFLINE='1', TRANSFORMERS_OFFLINE='1', TOKENIZERS_PARALLELISM='false',
               RAYON_NUM_THREADS='1', OMP_NUM_THREADS='1')
    proc = heldout.run_child(cmd, env)
    for line in proc.stdout.splitlines():
        if line.startswith('RESULT '):
            return json.loads(line[7:])
    raise RuntimeError(f'{size} {fields}: failed\n{proc.stderr[-3000:]}')


def child(task: str, size: str, seed: int, steps: int, fields: dict) -> dict:
    import torch

    from heldout import BASE, SIZES, HeldOutScorer, run_toolkit
    from tasks import task_files

    torch.set_num_threads(1)  # step-based: one core, the other left to the machine
    paths = task_files(task)
    scorer = HeldOutScorer(paths['valid'], paths['tok'], BASE['max_seq_len'])
    out = run_toolkit(paths, {**BASE, **SIZES[size], **fields, 'seed': seed}, steps, max(1, steps // 2), scorer)
    return {'curve': out['curve'], 'steps': out['steps']}


class Table:
    """Runs a setting over the seeds, prints its line, keeps its medians (printed lines also go to a file)."""

    def __init__(self, task: str, seeds, log, jobs: int):
        self.task, self.seeds, self.log, self.rows, self.jobs = task, seeds, log, [], jobs

    def say(self, text: str) -> None:
        print(text, flush=True)
        self.log.write(text + '\n')
        self.log.flush()

    def measure(self, phase: str, size: str, steps: int, fields: dict) -> dict:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(self.jobs) as pool:  # threads that wait on child processes
            runs = list(pool.map(lambda seed: run_child(self.task, size, seed, steps, fields), self.seeds))
        final = [r['curve'][-1] for r in runs]
        half = [r['curve'][0] for r in runs]
        row = {'phase': phase, 'size': size, 'steps': steps, 'fields': fields,
               'loss': statistics.median(c[2] for c in final), 'em': statistics.median(c[3] for c in final),
               'half_loss': statistics.median(c[2] for c in half), 'half_em': statistics.median(c[3] for c in half),
               'ems': [c[3] for c in final]}
        self.rows.append(row)
        self.say(f'{phase:<3} {size:<5} {steps:>5} {label(fields)}  {row["half_loss"]:>7.4f} {row["half_em"]:>6.1%}  '
                 f'{row["loss"]:>7.4f} {row["em"]:>6.1%}   ' + ' '.join(f'{x:.1%}' for x in row['ems']))
        return row


def best(rows: list[dict]) -> dict:
    return max(rows, key=lambda r: (r['em'], -r['loss']))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--sizes', default='d128,d256', help='two sizes of bench/heldout.py SIZES: phases 1-2, phase 3')
    ap.add_argument('--steps', default='400,200', help='optimizer steps of a run at each size')
    ap.add_argument('--seeds', default='1,2', help='one run of each setting per seed')
    ap.add_argument('--task', default='numbers', help='a task of bench/tasks.py (numbers: the table below)')
    ap.add_argument('--phases', default='1,2,3', help='which phases to run')
    ap.add_argument('--lrs', default='', help='phase 1\'s rates per optimizer, as JSON (default: LRS)')
    ap.add_argument('--settings', default='', help='instead of the phases: these settings (JSON list of config '
                    'fields over RECIPE) at the first size')
    ap.add_argument('--jobs', type=int, default=1, help='runs at a time (each one thread)')
    ap.add_argument('--quick', action='store_true', help='one seed, 30 steps, two settings at the first size')
    ap.add_argument('--out_dir', default=OUT, help='where the printed output goes (a new name each run)')
    ap.add_argument('--child', help=argparse.SUPPRESS)
    args = ap.parse_args()
    heldout.check_common_flags(ap, args)
    heldout.stop_on_sigterm(child=bool(args.child))
    if args.child:
        print('RESULT ' + json.dumps(child(*json.loads(args.child))), flush=True)
        return
    sizes, steps = args.sizes.split(','), [int(s) for s in str(args.steps).split(',')]
    phases, lrs = str(args.phases).split(','), json.loads(args.lrs) if args.lrs else LRS
    seeds = [int(s) for s in str(args.seeds).split(',')]
    if args.quick:
        sizes, steps, seeds = sizes[:1], [30], seeds[:1]
    from heldout import new_log
    from tasks import task_files

    log, path = new_log(args.out_dir, 'recipe', args.quick)  # an earlier run's table is never replaced; first: a
    task_files(args.task)  # place it cannot write stops the bench before anything is written
    path += '.txt'
    with log:
        table = Table(args.task, seeds, log, args.jobs)
        table.say(f'bench_recipe {" ".join(sys.argv[1:])}: task {args.task}, seeds {seeds}, {os.cpu_count()} cores, '
                  f'{args.jobs} run(s) at a time, load average {" ".join(f"{x:.2f}" for x in os.getloadavg())} at the start')
        table.say(f'{"":<3} {"size":<5} {"steps":>5} {"setting":<65}  {"half-way":>14}  {"final":>14}   '
                  f'final exact match per seed')
        table.say(f'{"":<3} {"":<5} {"":>5} {"":<65}  {"val loss":>7} {"EM":>6}  {"val loss":>7} {"EM":>6}')
        if args.quick:
            for name in ('adafactor', 'adamw'):
                table.measure('1', sizes[0], steps[0], setting(name, 1e-3))
            table.say(f'saved to {path}')
            return
        if args.settings:
            for changed in json.loads(args.settings):
                table.measure('s', sizes[0], steps[0], {**RECIPE, **changed})
            table.say(f'saved to {path}')
            return
        first = {name: [table.measure('1', sizes[0], steps[0], setting(name, lr)) for lr in rates]
                 for name, rates in lrs.items()}
        if phases == ['1']:
            table.say(f'saved to {path}')
            return
        top = best([r for rows in first.values() for r in rows])
        table.say(f'best of phase 1: {label(top["fields"])}')
        base = top['fields']
        for changed in ({'warmup_ratio': 0.0, 'warmup_steps': steps[0] // 3}, {'dropout_rate': 0.1},
                        {'feed_forward_proj': 'gated-gelu'}, {'aux_learn_rate': AUX_LEARN_RATE}):
            table.measure('2', sizes[0], steps[0], {**base, **changed})
        if len(sizes) > 1:
            for name, rows in first.items():
                table.measure('3', sizes[1], steps[1], setting(name, best(rows)['fields']['learn_rate']))
        table.say(f'load average at the end {" ".join(f"{x:.2f}" for x in os.getloadavg())}; saved to {path}')


if __name__ == '__main__':
    main()
