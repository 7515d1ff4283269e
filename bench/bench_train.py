"""This toolkit against transformers' Seq2SeqTrainer on tasks where both learn (a benchmark, not a
test): time to a stated quality on held-out prompts, and the quality each reaches in the same time.

    .venv/bin/python bench/bench_train.py                                  # both tasks, 3 seeds, 1,500 steps: ~1 hour on 2 cores (--steps=1000: ~40 min)
    .venv/bin/python bench/bench_train.py --tasks=numbers --seeds=42       # one task, one seed
    .venv/bin/python bench/bench_train.py --quick                          # does it run (a few steps, no timing)

Tasks (bench/tasks.py): ``demo``, the built-in demo corpus (its validation prompts are unseen), and
``numbers``, Chinese numerals <-> digits with held-out numbers plus weekdays and months. Same model
(the demo preset's T5, d128, fp32, --sizes=d256 for 4x the compute), data files, tokenizer, batch
(64 x 1, max length 32; --ours='{"batch_size_per_gpu": 16}' sets both), step horizon (--steps, the cosine schedule's length for both) and
threads for both. Each trainer at the recipe it is best at:

- this toolkit: the recipe bench/bench_recipe.py measured best, ungrouped and packed (OURS below;
  --ours changes it; --ours_lrs sweeps its learning rate as the peer's is swept);
- the peer: Seq2SeqTrainer with the same optimizer (passed in: the same Adafactor with parameter
  scaling), its own cosine schedule with OURS' warmup_ratio (5% by default), its sampler
  (length-grouped when OURS groups, else random: random learned faster on both tasks), the data
  tokenized up front as its examples
  do, and the learning rate that a sweep picks (--peer_lrs, one seed, same steps, best exact match
  then loss; the sweep is printed); --peer_lr skips the sweep. Packing is this toolkit's own
  (Seq2SeqTrainer pads every pair to the longest of its batch), and so is --aux_learn_rate (the
  embedding, layer norms and position biases with Adam at their own rate: Seq2SeqTrainer has no
  option for it); --peer_aux hands the peer that too, its optimizer built as this toolkit builds
  it and passed in by hand, to show where a gain comes from.

One run of each per seed (42, 43, 44 by default: a seed sets the initial weights and the data order
of both), alternating ours / peer, each in a fresh process. Every --eval_every optimizer steps both
are paused and scored by one function (bench/heldout.py: the token-weighted validation loss on 512
held-out rows, and the exact match of greedy answers to 256 distinct held-out prompts, the
toolkit's model/use/scoring.exact_match); scoring time is left out of the training time. Reported,
medians over the seeds: training seconds to the stated exact match (--target_em) and validation loss
(--target_loss) -- a run that never reaches one counts as never; and the validation loss and exact
match each has at the same time budget, the faster trainer's whole run (the slower one's last
evaluation by then), and after the whole horizon (the same compute).
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
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
import heldout  # noqa: E402  (no torch at its import)

OURS = dict(optimizer='adafactor', adafactor_scale_parameter=True, learn_rate=1.5e-2, aux_learn_rate=0.05,
            warmup_ratio=0.05, dropout_rate=0.0, feed_forward_proj='relu', group_by_length=False, packing=True)
# the recipe recommended for runs of about this bench's 1,000 steps: --aux_learn_rate, and with it half the
# learning rate and a twentieth of the run as warmup (bench/RECIPE_NOTES.md, B); the demo preset's own is 3e-2,
# a third, no aux rate
PEER_LRS = {'adamw': '5e-4,1e-3,2e-3', 'adafactor': '3e-4,1e-3,3e-3', 'adafactor+scale': '1e-2,1.5e-2,3e-2'}
STEPS = {'demo': 1500, 'numbers': 1500}
TARGETS = {'demo': {'em': 0.3, 'loss': 1.0}, 'numbers': {'em': 0.3, 'loss': 0.5}}  # stated qualities


def run_ours(task: str, size: str, seed: int, steps: int, eval_every: int, recipe: dict, threads: int) -> dict:
    import torch

    from heldout import BASE, SIZES, HeldOutScorer, run_toolkit
    from tasks import task_files

    torch.set_num_threads(threads)
    paths = task_files(task)
    scorer = HeldOutScorer(paths['valid'], paths['tok'], BASE['max_seq_len'])
    return run_toolkit(paths, {**BASE, **SIZES[size], **recipe, 'seed': seed}, steps, eval_every, scorer)


def run_peer(task: str, size: str, seed: int, steps: int, eval_every: int, recipe: dict, threads: int) -> dict:
    import torch
    from transformers import set_seed

    from config import T5ModelConfig
    from heldout import BASE, SIZES, Clock, HeldOutScorer
    from model.data.files import iter_usable_rows
    from model.data.tokenizer import load_tokenizer
    from model.net.chat_model import build_model
    from tasks import task_files

    torch.set_num_threads(threads)
    paths = task_files(task)
    scorer = HeldOutScorer(paths['valid'], paths['tok'], BASE['max_seq_len'])
    set_seed(seed)
    tok = load_tokenizer(paths['tok'])
    model = build_model(T5ModelConfig(**SIZES[size], dropout_rate=recipe.get('dropout_rate', 0.0),
                                      feed_forward_proj=recipe.get('feed_forward_proj', 'relu')), len(tok))
    clock = Clock()
    rows = list(iter_usable_rows(paths['train'], 10**9))  # as a user would: tokenized up front, timed
    enc = tok([p for p, _ in rows], truncation=True, max_length=BASE['max_seq_len'])
    labels = tok([r for _, r in rows], truncation=True, max_length=BASE['max_seq_len'])['input_ids']
    dataset = [{'input_ids': i, 'attention_mask': m, 'labels': y}
               for i, m, y in zip(enc['input_ids'], enc['attention_mask'], labels)]
    work = heldout.temp_folder('bench-peer-')
    try:  # its own new folder (save_strategy no: logs at most), removed whatever comes
        return _train_peer(work, model, tok, dataset, recipe, seed, steps, eval_every, clock, scorer)
    finally:
        heldout.remove_folder(work)


def _train_peer(work, model, tok, dataset, recipe, seed, steps, eval_every, clock, scorer) -> dict:
    import torch
    from transformers import DataCollatorForSeq2Seq, Seq2SeqTrainer, Seq2SeqTrainingArguments, TrainerCallback

    from heldout import BASE

    args = Seq2SeqTrainingArguments(
        output_dir=work, per_device_train_batch_size=recipe.get('batch_size_per_gpu', BASE['batch_size_per_gpu']),
        gradient_accumulation_steps=BASE['gradient_accumulation_steps'], learning_rate=recipe['learn_rate'],
        lr_scheduler_type=BASE['lr_schedule'], warmup_steps=recipe.get('warmup_ratio', 0.05),  # < 1: a ratio
        weight_decay=BASE['weight_decay'],
        max_grad_norm=BASE['max_grad_norm'], max_steps=steps,
        train_sampling_strategy='group_by_length' if recipe.get('group_by_length', True) else 'random',
        seed=seed, logging_steps=eval_every, save_strategy='no', report_to=[], use_cpu=True,
        dataloader_num_workers=0, disable_tqdm=True)
    curve = []

    class Score(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step % eval_every == 0 or state.global_step == state.max_steps:
                scores = clock.score(lambda: scorer(model))
                curve.append((state.global_step, clock.train_seconds(), scores['loss'], scores['em']))

    # the same optimizer as ours; its schedule is the Trainer's own (cosine, warmup as a ratio)
    if recipe.get('aux_learn_rate'):  # --peer_aux: Seq2SeqTrainer has no such option; built as ours, passed in
        from config import TrainConfigPretrainLarge
        from model.train.factory import build_optimizer

        optimizer = build_optimizer(TrainConfigPretrainLarge(
            optimizer=recipe['optimizer'], learn_rate=recipe['learn_rate'], aux_learn_rate=recipe['aux_learn_rate'],
            adafactor_scale_parameter=recipe.get('adafactor_scale_parameter', False), weight_decay=0.0), model)
    elif recipe.get('optimizer', 'adamw') == 'adafactor':
        from transformers.optimization import Adafactor

        optimizer = Adafactor(model.parameters(), lr=recipe['learn_rate'], relative_step=False, warmup_init=False,
                              scale_parameter=recipe.get('adafactor_scale_parameter', False), weight_decay=0.0)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=recipe['learn_rate'], weight_decay=0.0)
    trainer = Seq2SeqTrainer(model=model, args=args, train_dataset=dataset, callbacks=[Score()],
                             optimizers=(optimizer, None),
                             data_collator=DataCollatorForSeq2Seq(tok, model=model, label_pad_token_id=-100))
    trainer.train()
    return {'curve': curve, 'steps': trainer.state.global_step, 'batch': trainer.args.per_device_train_batch_size}


def run_child(kind: str, task: str, size: str, seed: int, steps: int, eval_every: int, recipe: dict,
              threads: int) -> dict:
    spec = json.dumps([kind, task, size, seed, steps, eval_every, recipe, threads])
    env = dict(os.environ, HF_HUB_OFFLINE='1', TRANSFORMERS_OFFLINE='1', TOKENIZERS_PARALLELISM='false')
    proc = heldout.run_child([sys.executable, os.path.abspath(__file__), '--child', spec], env)
    for line in proc.stdout.splitlines():
        if line.startswith('RESULT '):
            return json.loads(line[7:])
    raise RuntimeError(f'{kind} {task} {size} seed {seed}: failed\n{proc.stderr[-3000:]}')


def time_to(curve, metric: int, target: float, higher: bool) -> float:
    """Training seconds at the first evaluation that reaches the target (inf: never)."""
    for point in curve:
        if (point[metric] >= target) if higher else (point[metric] <= target):
            return point[1]
    return float('inf')


def at_time(curve, seconds: float):
    """(loss, em) of the last evaluation within ``seconds`` of training (the first one if none)."""
    within = [p for p in curve if p[1] <= seconds + 1e-9] or curve[:1]
    return within[-1][2], within[-1][3]


def fmt_s(x: float) -> str:
    return 'never' if x == float('inf') else f'{x:.0f} s'


def sweep(kind, task, size, seed, steps, eval_every, recipe, lrs, threads, say) -> float:
    """The learning rate of ``lrs`` with the best final exact match (then loss) for one trainer."""
    results = []
    for lr in lrs:
        r = run_child(kind, task, size, seed, steps, eval_every, {**recipe, 'learn_rate': lr}, threads)
        _, _, loss, em = r['curve'][-1]
        results.append((em, -loss, lr))
        say(f'  {kind} lr sweep {task} {size} seed {seed}: lr {lr:g}: val loss {loss:.4f}, exact match {em:.1%}')
    best = max(results)[2]
    say(f'  {kind} lr for {task} {size}: {best:g} (best exact match, then loss, of {", ".join(f"{x:g}" for x in lrs)})')
    return best


def compare(task, size, seeds, steps, eval_every, ours, peer_lr, threads, target, say, stem, peer_aux=False) -> None:
    runs = {'ours': [], 'peer': []}
    # packing: this toolkit's only; --aux_learn_rate too unless --peer_aux hands it over
    recipes = {'ours': ours, 'peer': {**ours, 'learn_rate': peer_lr,
                                      'aux_learn_rate': ours.get('aux_learn_rate', 0.0) if peer_aux else 0.0}}
    for seed in seeds:
        for kind in ('ours', 'peer'):
            r = run_child(kind, task, size, seed, steps, eval_every, recipes[kind], threads)
            runs[kind].append(r)
            _, seconds, loss, em = r['curve'][-1]
            say(f'  {task} {size} seed {seed} {kind}: {r["steps"]} steps of batch {r["batch"]} in {seconds:.1f} s, '
                f'val loss {loss:.4f}, '
                f'exact match {em:.1%}')
    with open(f'{stem}_{task}_{size}.json', 'w', encoding='utf-8') as f:
        json.dump({'task': task, 'size': size, 'seeds': seeds, 'steps': steps, 'ours': ours, 'peer_lr': peer_lr,
                   'peer_aux': recipes['peer']['aux_learn_rate'], 'target': target, 'runs': runs}, f)
    summarize(task, size, seeds, steps, ours, peer_lr, target, runs, say, recipes['peer']['aux_learn_rate'])
    say(f'the curves: {stem}_{task}_{size}.json (--report= prints this again)')


def summarize(task, size, seeds, steps, ours, peer_lr, target, runs, say, peer_aux=0.0) -> None:
    """The table of one task and size from the runs' curves (also: --report, from the saved curves)."""
    budget = min(statistics.median(r['curve'][-1][1] for r in runs[k]) for k in runs)
    med = {}
    for kind, rs in runs.items():
        med[kind] = {'em_s': statistics.median(time_to(r['curve'], 3, target['em'], True) for r in rs),
                     'loss_s': statistics.median(time_to(r['curve'], 2, target['loss'], False) for r in rs),
                     'budget_loss': statistics.median(at_time(r['curve'], budget)[0] for r in rs),
                     'budget_em': statistics.median(at_time(r['curve'], budget)[1] for r in rs),
                     'loss': statistics.median(r['curve'][-1][2] for r in rs),
                     'em': statistics.median(r['curve'][-1][3] for r in rs),
                     'train_s': statistics.median(r['curve'][-1][1] for r in rs)}
    # the quality the peer ends its whole run with, seed by seed (the same initial weights and data order for
    # both), and how long each takes to it: the first evaluation at or past it, the peer's own too (it may get
    # there before its end); medians over the seeds
    for name, metric, higher in (('goal_loss_s', 2, False), ('goal_em_s', 3, True)):
        for kind, rs in runs.items():
            med[kind][name] = statistics.median(time_to(r['curve'], metric, p['curve'][-1][metric], higher)
                                                for r, p in zip(rs, runs['peer']))
    given = f', and aux_learn_rate {peer_aux:g} by hand' if peer_aux else ''
    say(f'\n{task} {size}, {steps} steps, medians over seeds {seeds}; ours {ours}; peer lr {peer_lr:g}{given}:')
    say(f'{"":<5} {"to EM " + format(target["em"], ".0%"):>10} {"to loss " + format(target["loss"], "g"):>11} '
        f'{"at " + format(budget, ".0f") + " s: loss":>15} {"EM":>6} {"all steps: s":>13} {"loss":>7} {"EM":>6}')
    for kind, m in med.items():
        say(f'{kind:<5} {fmt_s(m["em_s"]):>10} {fmt_s(m["loss_s"]):>11} {m["budget_loss"]:>15.4f} '
            f'{m["budget_em"]:>6.1%} {m["train_s"]:>13.0f} {m["loss"]:>7.4f} {m["em"]:>6.1%}')

    def ratio(name):
        o, p = med['ours'][name], med['peer'][name]
        if o == p == float('inf'):
            return 'neither reached it'
        if o == float('inf'):
            return 'ours never reached it'
        return 'the peer never reached it' if p == float('inf') else f'{p / o:.2f}x'

    say(f'speed-up (peer time / our time): to the exact match {ratio("em_s")}, to the loss {ratio("loss_s")}; '
        f'whole horizon {med["peer"]["train_s"] / med["ours"]["train_s"]:.2f}x')
    say(f'to the quality the peer ends with, seed by seed (val loss {med["peer"]["loss"]:.4f}, exact match '
        f'{med["peer"]["em"]:.1%} their medians): ours '
        f'{fmt_s(med["ours"]["goal_loss_s"])} / {fmt_s(med["ours"]["goal_em_s"])}, the peer '
        f'{fmt_s(med["peer"]["goal_loss_s"])} / {fmt_s(med["peer"]["goal_em_s"])}; speed-up to the loss '
        f'{ratio("goal_loss_s")}, to the exact match {ratio("goal_em_s")}')


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--tasks', default='demo,numbers')
    ap.add_argument('--sizes', default='d128', help='d128 (the demo preset) and/or d256')
    ap.add_argument('--seeds', default='42,43,44', help='one run of each trainer per seed')
    ap.add_argument('--steps', type=int, default=0, help='optimizer steps of every run (0 = per task: %s)' % STEPS)
    ap.add_argument('--eval_every', type=int, default=100, help='optimizer steps between scorings')
    ap.add_argument('--ours', default='{}', help='config fields changed from OURS for this toolkit, as JSON (its '
                    'batch_size_per_gpu is the peer\'s too)')
    ap.add_argument('--peer_lrs', default='', help='the peer\'s learning-rate sweep (default per optimizer: %s)'
                    % PEER_LRS)
    ap.add_argument('--peer_lr', type=float, default=0.0, help='the peer\'s learning rate, no sweep')
    ap.add_argument('--peer_aux', action='store_true', help='give the peer this toolkit\'s --aux_learn_rate too '
                    '(Seq2SeqTrainer has no such option: its optimizer built as this toolkit builds it, passed in by '
                    'hand): where the gain comes from')
    ap.add_argument('--ours_lrs', default='', help='sweep this toolkit\'s learning rate too, as the peer\'s '
                    '(e.g. 1e-2,3e-2); default: the rate of OURS / --ours')
    ap.add_argument('--target_em', type=float, default=0.0, help='0 = per task: %s' % TARGETS)
    ap.add_argument('--target_loss', type=float, default=0.0, help='0 = per task')
    ap.add_argument('--threads', type=int, default=os.cpu_count(), help='torch threads of every run')
    ap.add_argument('--quick', action='store_true', help='numbers, one seed, 20 steps, no sweep')
    ap.add_argument('--out_dir', default=OUT, help='where the printed output and the curves go (new names each run)')
    ap.add_argument('--report', default=None, help='print the tables again from the curves a run saved (its '
                    'bench_train_<time>_<task>_<size>.json, comma-separated), no run')
    ap.add_argument('--child', help=argparse.SUPPRESS)
    args = ap.parse_args()
    heldout.check_common_flags(ap, args)
    heldout.stop_on_sigterm(child=bool(args.child))
    if args.child:
        kind, *rest = json.loads(args.child)
        print('RESULT ' + json.dumps((run_ours if kind == 'ours' else run_peer)(*rest)), flush=True)
        return
    if args.report is not None:  # given, even empty (an unset variable): never the whole bench instead
        for path in args.report.split(','):
            try:
                with open(path, encoding='utf-8') as f:
                    saved = json.load(f)
                summarize(saved['task'], saved['size'], saved['seeds'], saved['steps'], saved['ours'],
                          saved['peer_lr'], saved['target'], saved['runs'], print, saved.get('peer_aux', 0.0))
            except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
                why = e.strerror if isinstance(e, OSError) and e.strerror else f'{type(e).__name__}: {e}'
                heldout.refuse_flag('report', path, f'is not the curves a bench_train run saved ({why})')
        return
    from tasks import task_files

    tasks, sizes = args.tasks.split(','), args.sizes.split(',')
    seeds = [int(s) for s in str(args.seeds).split(',')]
    ours = {**OURS, **json.loads(args.ours)}
    if args.quick:
        tasks, sizes, seeds, args.steps, args.eval_every = ['numbers'], sizes[:1], seeds[:1], 20, 10
        args.peer_lr = args.peer_lr or 1e-2  # no sweep; a rate given is kept
    from heldout import new_log

    log, stem = new_log(args.out_dir, 'bench_train', args.quick)  # an earlier run's results are never replaced

    def say(text):
        print(text, flush=True)
        log.write(text + '\n')
        log.flush()

    say(f'bench_train {" ".join(sys.argv[1:])}: {os.cpu_count()} cores, {args.threads} thread(s) a run, load '
        f'average {" ".join(f"{x:.2f}" for x in os.getloadavg())} at the start')
    for task in tasks:
        task_files(task)
        steps = args.steps or STEPS[task]
        target = {'em': args.target_em or TARGETS[task]['em'], 'loss': args.target_loss or TARGETS[task]['loss']}
        for size in sizes:
            name = ours['optimizer'] + ('+scale' if ours.get('adafactor_scale_parameter') else '')
            lrs = [float(x) for x in (args.peer_lrs or PEER_LRS[name]).split(',')]
            peer_base = {**ours, 'aux_learn_rate': ours.get('aux_learn_rate', 0.0) if args.peer_aux else 0.0}
            peer_lr = args.peer_lr or sweep('peer', task, size, seeds[0], steps, args.eval_every, peer_base, lrs,
                                            args.threads, say)
            mine = dict(ours)
            if args.ours_lrs:
                mine['learn_rate'] = sweep('ours', task, size, seeds[0], steps, args.eval_every, ours,
                                           [float(x) for x in args.ours_lrs.split(',')], args.threads, say)
            compare(task, size, seeds, steps, args.eval_every, mine, peer_lr, args.threads, target, say, stem,
                    args.peer_aux)
    say(f'load average at the end {" ".join(f"{x:.2f}" for x in os.getloadavg())}')


if __name__ == '__main__':
    main()
