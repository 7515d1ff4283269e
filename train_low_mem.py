"""Pretrain chat_small_t5 on streamed prompt/response Parquet (a Fire CLI).

Examples:
    # the guide's command: 3 GPUs, the 10M-row configuration
    accelerate launch --multi_gpu --num_processes 3 ./train_low_mem.py train --use_large_config=True
    # overrides map one-to-one to config fields
    python train_low_mem.py train --use_large_config=True --max_seq_len=128 --batch_size_per_gpu=24
    # continue exactly where the last saved state stopped
    python train_low_mem.py train --use_large_config=True --is_keep_training=True
    # print the resolved config and check data and tokenizer, without training
    python train_low_mem.py train --preset=demo --dry_run=True
    # train the sentencepiece tokenizer the config points to
    python train_low_mem.py train_tokenizer --train_file=data/pretrain_train_10m.parquet --vocab_size=32000
    # answer prompts with a trained model
    python train_low_mem.py generate --preset=demo --prompts='["计算：12+35="]'
    # two CPU processes (gloo), e.g. to try the multi-process path on a laptop
    ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 train_low_mem.py train --preset=demo

Presets: --preset=1m|5m|10m|50m (SEED §6 templates; 10m = the defaults =
--use_large_config=True) and --preset=demo (tiny model, built-in corpus, CPU).
Exit codes: 0 done, 1 dry run found something missing, 2 a user error
(one line on stderr), 130/143 stopped by SIGINT/SIGTERM after saving.
"""

from __future__ import annotations

import logging
import os
import sys

import fire

from config import MODEL_FIELDS, TRAIN_FIELDS, ResolvedConfig, UserError, coerce, resolve_config, unknown_option

RUN_FLAGS = {'use_large_config': bool, 'preset': str, 'is_keep_training': bool, 'dry_run': bool}
TOKENIZER_FIELDS = ('train_file', 'tokenizer_dir', 'vocab_size', 'tokenizer_max_rows',
                    'character_coverage', 'seed')


def _resolve(preset, use_large_config, overrides: dict, allowed=None) -> ResolvedConfig:
    candidates = set(allowed) if allowed is not None else {*TRAIN_FIELDS, *MODEL_FIELDS}
    for name in overrides:
        if name not in candidates:
            raise unknown_option(name, candidates | set(RUN_FLAGS))
    use_large_config = coerce('use_large_config', use_large_config, bool)
    return resolve_config(preset=None if preset is None else coerce('preset', preset, str),
                          use_large_config=use_large_config, overrides=overrides)


def _cli_prefix(cfg: ResolvedConfig) -> str:
    return f'python train_low_mem.py %s{" --preset=" + cfg.preset if cfg.preset else ""}'


def readiness(cfg: ResolvedConfig) -> list[str]:
    """What is missing before training can start, each with the command that creates it."""
    from model.files import inspect_parquet, resolve_parquet_files

    t = cfg.train
    problems = []
    demo = cfg.preset == 'demo'
    for name in ('train_file', 'validation_file'):
        path = getattr(t, name)
        try:
            for f in resolve_parquet_files(path):
                inspect_parquet(f)
        except UserError as e:
            if demo:
                fix = f'python prepare_data.py demo --out_dir={os.path.dirname(t.train_file)}'
            else:
                fix = (f'python prepare_data.py convert YOUR_DATA.jsonl data/all.parquet && '
                       f'python prepare_data.py split data/all.parquet '
                       f'--train_out={t.train_file} --valid_out={t.validation_file}')
            problems.append(f'{name}: {e}\n    create it with: {fix}')
    if not os.path.isfile(os.path.join(t.tokenizer_dir, 'tokenizer.json')):
        cmd = _cli_prefix(cfg) % 'train_tokenizer'
        if 'train_file' in cfg.sources and cfg.sources['train_file'] == 'flag':
            cmd += f' --train_file={t.train_file}'
        if cfg.sources.get('tokenizer_dir') == 'flag':
            cmd += f' --tokenizer_dir={t.tokenizer_dir}'
        problems.append(f'tokenizer_dir: {t.tokenizer_dir}: no tokenizer.json\n'
                        f'    create it with: {cmd}')
    return problems


def dry_run_report(cfg: ResolvedConfig) -> int:
    from model.files import inspect_parquet, resolve_parquet_files

    print(cfg.describe())
    t = cfg.train
    print('[paths]')
    for name in ('train_file', 'validation_file', 'tokenizer_dir', 'model_file', 'train_state_dir',
                 'output_dir', 'log_dir'):
        print(f'  path.{name}={getattr(t, name)}')
    from model.checkpoint import latest_state

    print(f'  path.latest_state={latest_state(t.train_state_dir) or "none"}')
    problems = readiness(cfg)
    if not problems:
        rows = sum(inspect_parquet(f).num_rows for f in resolve_parquet_files(t.train_file))
        world = int(os.environ.get('WORLD_SIZE', os.environ.get('NUM_GPUS', '1')) or 1)
        per_step = t.batch_size_per_gpu * world * t.gradient_accumulation_steps
        steps = rows // per_step * t.epochs
        if t.max_steps:
            steps = min(steps, t.max_steps)
        print(f'[schedule]\n  train rows {rows:,}; {world} process(es) x {t.batch_size_per_gpu} rows x '
              f'{t.gradient_accumulation_steps} accumulation = {per_step} rows per optimizer step; '
              f'{steps:,} optimizer steps over {t.epochs} epoch(s)')
        print('ready: data and tokenizer found')
        return 0
    print('not ready:')
    for p in problems:
        print(f'  - {p}')
    return 1


def train(*, use_large_config=False, preset=None, is_keep_training=False, dry_run=False, **overrides):
    """Train (or, with --dry_run=True, print the resolved config and check the inputs)."""
    cfg = _resolve(preset, use_large_config, overrides)
    if coerce('dry_run', dry_run, bool):
        sys.exit(dry_run_report(cfg))
    from model.trainer import run_training

    sys.exit(run_training(cfg, resume=coerce('is_keep_training', is_keep_training, bool)))


def train_tokenizer(*, use_large_config=False, preset=None, **overrides):
    """Train the sentencepiece tokenizer on the train file (defaults from the config)."""
    cfg = _resolve(preset, use_large_config, overrides, allowed=TOKENIZER_FIELDS)
    from model.tokenizer import train_tokenizer as build

    t = cfg.train
    tok = build(t.train_file, t.tokenizer_dir, vocab_size=t.vocab_size, max_rows=t.tokenizer_max_rows,
                character_coverage=t.character_coverage, seed=t.seed)
    print(f'tokenizer: {len(tok)} pieces (pad {tok.pad_token_id}, eos {tok.eos_token_id}, '
          f'unk {tok.unk_token_id}) -> {t.tokenizer_dir}')


def generate(*, use_large_config=False, preset=None, prompts=None, model_dir=None,
             max_new_tokens=None, **overrides):
    """Answer prompts with the best (else final) model saved under output_dir."""
    cfg = _resolve(preset, use_large_config, overrides)
    from model.chat_model import answer, load_trained

    if prompts is None:
        from model.data_prep import demo_prompts

        prompts = demo_prompts()
    elif isinstance(prompts, str):
        prompts = [prompts]
    model, tok, where = load_trained(cfg, model_dir)
    limit = coerce('max_new_tokens', max_new_tokens, int) if max_new_tokens else cfg.train.max_seq_len
    print(f'model: {where}')
    for p, a in zip(prompts, answer(model, tok, [str(p) for p in prompts], max_new_tokens=limit)):
        print(f'  {p}  ->  {a}')


COMMANDS = {'train': train, 'train_tokenizer': train_tokenizer, 'generate': generate}


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname)s %(name)s: %(message)s')
    try:
        fire.Fire(COMMANDS, command=argv)
    except UserError as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(2)


if __name__ == '__main__':
    main()
