"""Pretrain chat_small_t5 on streamed prompt/response Parquet (a Fire CLI).

Examples:
    # the guide's command: 3 GPUs, the 10M-row configuration
    accelerate launch --multi_gpu --num_processes 3 ./train_low_mem.py train --use_large_config=True
    # overrides map one-to-one to config fields
    python train_low_mem.py train --use_large_config=True --max_seq_len=128 --batch_size_per_gpu=24
    # continue exactly where the last saved state stopped
    python train_low_mem.py train --use_large_config=True --is_keep_training=True
    # print the resolved config and check everything the run needs, without training
    python train_low_mem.py train --preset=demo --dry_run=True
    # train the sentencepiece tokenizer the config points to
    python train_low_mem.py train_tokenizer --train_file=data/pretrain_train_10m.parquet --vocab_size=32000
    # answer prompts with a trained model
    python train_low_mem.py generate --preset=demo --prompts='["计算：12+35="]'
    # every option of a command, with its meaning
    python train_low_mem.py train --help
    # two CPU processes (gloo), e.g. to try the multi-process path on a laptop
    ACCELERATE_USE_CPU=1 torchrun --standalone --nproc_per_node 2 train_low_mem.py train --preset=demo

Presets: --preset=1m|5m|10m|50m (the guide's templates; 10m = the defaults =
--use_large_config=True) and --preset=demo (tiny model, built-in corpus, CPU).
Exit codes: 0 done, 1 dry run not ready or training diverged, 2 a user error
(one line on stderr), 130/143 stopped by SIGINT/SIGTERM after saving.
"""

from __future__ import annotations

import json
import logging
import os
import sys

import fire

from config import (MAX_NEW_TOKENS, MODEL_FIELDS, TRAIN_FIELDS, GenerateFlags, ResolvedConfig, RunFlags,
                    T5ModelConfig, TrainConfigPretrainLarge, UserError, check_repeated_flags, coerce,
                    format_options, resolve_config, unknown_option)

TOKENIZER_FIELDS = ('train_file', 'tokenizer_dir', 'vocab_size', 'tokenizer_max_rows',
                    'character_coverage', 'seed')
CONFIG_FLAGS = ('preset', 'use_large_config')


def _resolve(preset, use_large_config, overrides: dict, allowed=None, extra=()) -> ResolvedConfig:
    candidates = set(allowed) if allowed is not None else {*TRAIN_FIELDS, *MODEL_FIELDS}
    for name in overrides:
        if name not in candidates:
            raise unknown_option(name, candidates | set(extra) | set(CONFIG_FLAGS))
    use_large_config = coerce('use_large_config', use_large_config, bool)
    preset = None if preset in (None, '') else coerce('preset', preset, str)
    return resolve_config(preset=preset, use_large_config=use_large_config, overrides=overrides)


def dry_run_report(cfg: ResolvedConfig, resume: bool) -> int:
    """The resolved config, the paths, and every problem the run would meet (exit 0 ready, 1 not)."""
    from model import preflight

    print(cfg.describe())
    t = cfg.train
    print('[paths]')
    for name in ('train_file', 'validation_file', 'tokenizer_dir', 'model_file', 'train_state_dir',
                 'output_dir', 'log_dir'):
        print(f'  path.{name}={getattr(t, name)}')
    from model.state_files import latest_state

    print(f'  path.latest_state={latest_state(t.train_state_dir) or "none"}')
    world = int(os.environ.get('WORLD_SIZE', os.environ.get('NUM_GPUS', '1')) or 1)
    report = preflight.check_train(cfg, resume, world)
    if report.total_steps:
        per_step = t.batch_size_per_gpu * world * t.gradient_accumulation_steps
        print(f'[schedule]\n  train rows {report.train_rows:,}; {world} process(es) x {t.batch_size_per_gpu} rows x '
              f'{t.gradient_accumulation_steps} accumulation = {per_step} rows per optimizer step; '
              f'{report.total_steps:,} optimizer steps over {t.epochs} epoch(s); '
              f'{report.parameters / 1e6:.1f}M parameters')
    for note in report.notes:
        print(f'note: {note}')
    if report.ready:
        print('ready: data, tokenizer and output places checked')
        return 0
    print('not ready:')
    for p in report.problems:
        print(f'  - {p.message}' + (f'\n    {p.fix}' if p.fix else ''))
    return 1


def train(*, use_large_config=False, preset=None, is_keep_training=False, dry_run=False, **overrides):
    """Train (or, with --dry_run=True, print the resolved config and check everything)."""
    cfg = _resolve(preset, use_large_config, overrides, extra=('is_keep_training', 'dry_run'))
    resume = coerce('is_keep_training', is_keep_training, bool)
    if coerce('dry_run', dry_run, bool):
        sys.exit(dry_run_report(cfg, resume))
    from model.trainer import run_training

    sys.exit(run_training(cfg, resume=resume))


def train_tokenizer(*, use_large_config=False, preset=None, **overrides):
    """Train the sentencepiece tokenizer on the train file (defaults from the config)."""
    cfg = _resolve(preset, use_large_config, overrides, allowed=TOKENIZER_FIELDS)
    from model.tokenizer import check_tokenizer_inputs
    from model.tokenizer import train_tokenizer as build

    t = cfg.train
    check_tokenizer_inputs(t.train_file, t.tokenizer_dir)  # before the imports of the real work
    tok = build(t.train_file, t.tokenizer_dir, vocab_size=t.vocab_size, max_rows=t.tokenizer_max_rows,
                character_coverage=t.character_coverage, seed=t.seed)
    print(f'tokenizer: {len(tok)} pieces (pad {tok.pad_token_id}, eos {tok.eos_token_id}, '
          f'unk {tok.unk_token_id}) -> {t.tokenizer_dir}')


def parse_prompts(prompts) -> list[str]:
    """--prompts as Fire hands it over: a list, a JSON list in a string, or one prompt."""
    if isinstance(prompts, bool):  # --prompts without a value
        raise UserError('--prompts needs a value: --prompts=\'["你好","1+1="]\'')
    if prompts in (None, ''):
        from model.demo_corpus import demo_prompts

        return demo_prompts()
    if isinstance(prompts, str) and prompts.lstrip().startswith('['):
        try:
            prompts = json.loads(prompts)
        except ValueError:
            pass
    if isinstance(prompts, (list, tuple)):
        if not prompts or any(isinstance(p, (list, tuple, dict)) for p in prompts):
            raise UserError('--prompts: give one prompt, or a list of prompts such as --prompts=\'["你好","1+1="]\'')
        return [str(p) for p in prompts]
    if isinstance(prompts, dict):
        raise UserError('--prompts: give one prompt, or a list of prompts such as --prompts=\'["你好","1+1="]\'')
    return [str(prompts)]


def generate(*, use_large_config=False, preset=None, prompts=None, model_dir=None,
             max_new_tokens=None, **overrides):
    """Answer prompts with the best (else final) model saved under output_dir."""
    cfg = _resolve(preset, use_large_config, overrides, extra=('prompts', 'model_dir', 'max_new_tokens'))
    prompts = parse_prompts(prompts)
    limit = coerce('max_new_tokens', max_new_tokens, int) if max_new_tokens not in (None, 0, '') else 0
    if limit < 0 or limit > MAX_NEW_TOKENS:
        raise UserError(f'--max_new_tokens={limit}: give 1 to {MAX_NEW_TOKENS} (0 = max_seq_len)')
    from model.chat_model import answer, load_trained

    model, tok, where, max_seq_len = load_trained(cfg, None if model_dir in (None, '') else
                                                  coerce('model_dir', model_dir, str))
    print(f'model: {where}')
    for p, a in zip(prompts, answer(model, tok, prompts, max_new_tokens=limit or max_seq_len,
                                    max_seq_len=max_seq_len)):
        print(f'  {p}  ->  {a}')


COMMANDS = {'train': train, 'train_tokenizer': train_tokenizer, 'generate': generate}


def command_help(name: str) -> str:
    """Every option of a command with its comment from config.py (generated, not written twice)."""
    doc = (COMMANDS[name].__doc__ or '').strip()
    lines = [f'usage: python train_low_mem.py {name} [--option=value ...]', '', doc, '']
    if name == 'train':
        lines += ['run:'] + format_options(RunFlags)
        lines += ['', 'training (config.py TrainConfigPretrainLarge):'] + format_options(TrainConfigPretrainLarge)
        lines += ['', 'model shape (config.py T5ModelConfig):'] + format_options(T5ModelConfig)
    elif name == 'train_tokenizer':
        lines += ['config:'] + format_options(RunFlags, only=CONFIG_FLAGS)
        lines += ['', 'tokenizer (config.py TrainConfigPretrainLarge):'] + \
            format_options(TrainConfigPretrainLarge, only=TOKENIZER_FIELDS)
    else:
        lines += ['generate:'] + format_options(GenerateFlags)
        lines += ['', 'config:'] + format_options(RunFlags, only=CONFIG_FLAGS)
        lines += ['', 'paths and lengths (config.py TrainConfigPretrainLarge; any field is accepted):'] + \
            format_options(TrainConfigPretrainLarge, only=('output_dir', 'max_seq_len'))
    return '\n'.join(lines)


def main(argv=None) -> None:
    args = sys.argv[1:] if argv is None else list(argv)
    if not args or args[0] in ('-h', '--help', 'help'):
        print((__doc__ or '').strip())
        print('\ncommands: ' + ', '.join(COMMANDS) + '   (python train_low_mem.py COMMAND --help)')
        return
    if args[0] in COMMANDS and any(a in ('-h', '--help') for a in args[1:]):
        print(command_help(args[0]))
        return
    if args[0] not in COMMANDS:
        raise SystemExit(_error(f'unknown command {args[0]!r}: choose one of {", ".join(COMMANDS)}'))
    logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname)s %(name)s: %(message)s')
    try:
        check_repeated_flags(args[1:])
        fire.Fire(COMMANDS, command=args)
    except UserError as e:
        sys.exit(_error(str(e)))


def _error(message: str) -> int:
    """One line on stderr (from the first process only, under a launcher); exit status 2."""
    if message and os.environ.get('RANK', '0') == '0':
        print(f"error: {' '.join(message.splitlines())}", file=sys.stderr)
    return 2


if __name__ == '__main__':
    main()
