"""Pretrain chat_small_t5 on streamed Parquet: prompt/response pairs, or raw text with T5's span
corruption (a Fire CLI).

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
    # answer prompts with a trained model; beam search or sampling
    python train_low_mem.py generate --preset=demo --prompts='["计算：12+35="]'
    python train_low_mem.py generate --preset=demo --do_sample=True --temperature=0.7 --top_p=0.9 --sample_seed=1
    # talk with it (streams on a terminal; reads a pipe too)
    python train_low_mem.py chat --preset=demo
    # score it on test_file: loss, perplexity, BLEU-4, exact match; predictions JSONL beside the model
    python train_low_mem.py test --preset=demo
    # raw text (prepare_data.py convert --text_col=...): T5's span corruption, then pairs from it
    python train_low_mem.py train --objective=span_corruption --train_file=data/text_train.parquet --validation_file=data/text_valid.parquet --output_dir=model_save/stage1/
    python train_low_mem.py generate --model_dir=model_save/stage1/best --prompts='["北京是<extra_id_0>的首都"]'
    # warm start: a new run from trained weights (fresh optimizer, schedule, data position)
    python train_low_mem.py train --init_from=model_save/pretrain_large/best --train_file=data/sft.parquet ...
    # curves: TensorBoard while training, or a PNG from the log
    python train_low_mem.py train --preset=demo --log_with=tensorboard
    python train_low_mem.py plot --preset=demo --out=loss.png
    # every option of a command, with its meaning
    python train_low_mem.py train --help
    # two CPU processes (gloo), e.g. to try the multi-process path on a laptop
    ACCELERATE_USE_CPU=1 torchrun --standalone --nproc_per_node 2 train_low_mem.py train --preset=demo

Presets: --preset=1m|5m|10m|50m (the guide's templates; 10m = the defaults =
--use_large_config=True) and --preset=demo (tiny model, built-in corpus, CPU).
Exit codes: 0 done, 1 dry run not ready or training diverged, 2 a user error
(one line on stderr), 130/143 stopped by SIGINT/SIGTERM (one line: what was saved or written).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import signal
import sys

from model import stopping  # first: a signal from here on ends in one line, never a traceback
from config import (DECODE_FIELDS, MODEL_FIELDS, TRAIN_FIELDS, DecodeConfig, ModelFlags, ResolvedConfig, RunFlags,
                    T5ModelConfig, TrainConfigPretrainLarge, resolve_config, validate_decode)
from model.cli import (check_repeated_flags, coerce, format_options, keep_text, quiet_on_broken_pipe, text_fields,
                       unknown_option)
from model.errors import UserError
from model.state import ownership

TOKENIZER_FIELDS = ('train_file', 'tokenizer_dir', 'vocab_size', 'tokenizer_max_rows',
                    'character_coverage', 'seed')
CONFIG_FLAGS = ('preset', 'use_large_config')
# the fields a command uses: a flag of another field would have no effect there, and is refused
NOT_FOR_TRAIN = {
    'vocab_size': 'the vocabulary comes from the tokenizer in tokenizer_dir; train_tokenizer uses --vocab_size',
    'tokenizer_max_rows': 'train_tokenizer uses it', 'character_coverage': 'train_tokenizer uses it',
    'test_file': 'train_low_mem.py test scores it', 'max_test_rows': 'train_low_mem.py test uses it'}
INFERENCE_FIELDS = ('output_dir', 'tokenizer_dir', 'max_seq_len', *MODEL_FIELDS)
EFFECTIVE = {'train': tuple(f for f in (*TRAIN_FIELDS, *MODEL_FIELDS) if f not in NOT_FOR_TRAIN),
             'train_tokenizer': TOKENIZER_FIELDS, 'generate': INFERENCE_FIELDS, 'chat': INFERENCE_FIELDS,
             'test': (*INFERENCE_FIELDS, 'test_file', 'max_test_rows'), 'plot': ('log_dir', 'output_dir')}


def _resolve(command: str, preset, use_large_config, overrides: dict, extra=()) -> ResolvedConfig:
    """The command's config (defaults -> preset -> flags) with its paths resolved once
    (preflight.resolve_places). A flag that names no field is an unknown option; one that names a
    field this command does not use has no effect, and is refused rather than ignored."""
    from model.train.preflight import resolve_places

    effective = set(EFFECTIVE[command])
    for name in overrides:
        if name in effective:
            continue
        if name in TRAIN_FIELDS or name in MODEL_FIELDS:
            why = NOT_FOR_TRAIN.get(name, '') if command == 'train' else ''
            raise UserError(f'--{name} has no effect on {command}' + (f' ({why})' if why else '') +
                            f'; leave it out (python train_low_mem.py {command} --help lists what it uses)')
        raise unknown_option(name, effective | set(extra) | set(CONFIG_FLAGS))
    use_large_config = coerce('use_large_config', use_large_config, bool)
    preset = None if preset in (None, '') else coerce('preset', preset, str)
    return resolve_places(resolve_config(preset=preset, use_large_config=use_large_config, overrides=overrides))


def process_count() -> int:
    """The processes the run will have: WORLD_SIZE under a launcher, else NUM_GPUS, else 1."""
    for name in ('WORLD_SIZE', 'NUM_GPUS'):
        value = os.environ.get(name, '').strip()
        if value:
            if not value.isdigit():
                raise UserError(f'{name}={value}: give a whole number of processes')
            return max(int(value), 1)
    return 1


def dry_run_report(cfg: ResolvedConfig, resume: bool, rows_per_s: float = 0.0, keep_flag: str = 'not_given') -> int:
    """The resolved config, the paths, and every problem the run would meet (exit 0 ready, 1 not)."""
    from model.train import preflight

    print(cfg.describe())
    t = cfg.train
    print('[paths]')
    for name in ('train_file', 'validation_file', 'tokenizer_dir', 'model_file', 'train_state_dir',
                 'output_dir', 'log_dir'):
        print(f'  path.{name}={getattr(t, name)}')
    print(f'  run.is_keep_training={keep_flag}  (--is_keep_training as given: given_true, given_false or not_given)')
    world = process_count()
    from model.faults import fault_point

    fault_point('dry-run')
    report = preflight.check_train(cfg, resume, world)
    if resume:  # the state the resume loads, as judged (checksums included)
        print(f'  path.resume_from={report.latest_state or "none"}')
    else:
        from model.state.states import latest_state

        newest = latest_state(t.train_state_dir, deep=False)
        print(f'  path.latest_state={newest or "none"}')  # the path alone: a path may hold anything but a newline
    # a fresh run that is ready: how many items of an earlier run it moves aside into previous_runs/, and the
    # archive into which an earlier such move, cut short (a kill, a full disk), already took that run's states:
    # it finishes that move there (start_pretrain_large.sh reads these lines; a resume or a run not ready judges
    # neither: no lines)
    if report.states_damaged:  # neither a resume nor a fresh run can start: the start script says it once
        print('  run.states_damaged=1  (every saved state is damaged)')
    if report.previous_items is not None:
        print(f'  run.previous_items={report.previous_items}  (an earlier run\'s states and models it moves aside)')
        print(f'  path.states_moved_to={report.states_moved_to or "none"}')
    if report.total_steps:
        from model.net.sizing import total_optimizer_steps

        per_step = t.batch_size_per_gpu * world * t.gradient_accumulation_steps
        unit = 'rows'
        if t.objective == 'span_corruption':
            unit = 'examples'
            print(f'[span corruption]\n  {report.train_examples:,} examples of {t.max_seq_len} input tokens an epoch, '
                  f'packed from the {report.train_rows:,} rows\' tokens ('
                  f'{"kept by the saved state: not counted again" if report.counts_kept else "counted by tokenizing them"}'
                  f'{"; --allow_data_change=True: the counts a saved state kept are not used" if resume and t.allow_data_change else ""})')
        per_epoch = total_optimizer_steps(report.train_examples if t.objective == 'span_corruption' else
                                          report.train_rows, t.batch_size_per_gpu, world, t.gradient_accumulation_steps, 1)
        span = f'over {t.epochs} epoch(s)'
        if t.max_steps == report.total_steps and per_epoch and report.total_steps < per_epoch * t.epochs:  # ends sooner
            span = (f'(--max_steps={t.max_steps}: {report.total_steps / per_epoch:.3g} epoch(s) of {per_epoch:,} '
                    f'steps, not the {t.epochs} of --epochs)')
        print(f'[schedule]\n  train rows {report.train_rows:,}; {world} process(es) x {t.batch_size_per_gpu} {unit} x '
              f'{t.gradient_accumulation_steps} accumulation = {per_step} {unit} per optimizer step; '
              f'{report.total_steps:,} optimizer steps {span}; {report.parameters / 1e6:.1f}M parameters')
    if report.total_steps:
        from model.train.resources import resource_lines

        print('\n'.join(resource_lines(cfg, report.train_examples or report.train_rows, report.vocab_size, world,
                                       report.train_files,
                                       rows_per_s)))
    for note in report.notes:
        print(f'note: {note}')
    if report.ready:
        print('ready: data, tokenizer and output places checked')
        return 0
    print('not ready:')
    for p in report.problems:
        print(f'  - {ownership.as_given(p.message)}' + (f'\n    {ownership.as_given(p.fix, name_links=False)}'
                                                       if p.fix else ''))
    return 1


class _NotGiven:
    """A flag's default that tells "not given" from any value Fire may parse (None included)."""

    def __repr__(self) -> str:
        return 'False'


NOT_GIVEN = _NotGiven()


def train(*, use_large_config=False, preset=None, is_keep_training=NOT_GIVEN, dry_run=False, rows_per_s=0.0,
          **overrides):
    """Train (or, with --dry_run=True, print the resolved config, check everything and estimate
    the resources)."""
    cfg = _resolve('train', preset, use_large_config, overrides, extra=('is_keep_training', 'dry_run', 'rows_per_s'))
    given = is_keep_training is not NOT_GIVEN
    resume = coerce('is_keep_training', is_keep_training, bool) if given else False
    if coerce('dry_run', dry_run, bool):
        rate = coerce('rows_per_s', rows_per_s, float)
        if not (rate == 0 or 0 < rate < float('inf')):
            raise UserError(f'--rows_per_s={rows_per_s}: give the rows/s bench/bench_gpu.py measured (> 0), '
                            'or leave it out for the FLOPs estimate')
        # for start_pretrain_large.sh: --is_keep_training as this parser read it (any spelling), or not given
        sys.exit(dry_run_report(cfg, resume, rate, ('given_true' if resume else 'given_false') if given else 'not_given'))
    from model.train.trainer import run_training

    sys.exit(run_training(cfg, resume=resume))


def train_tokenizer(*, use_large_config=False, preset=None, **overrides):
    """Train the sentencepiece tokenizer on the train file (defaults from the config)."""
    cfg = _resolve('train_tokenizer', preset, use_large_config, overrides)
    from model.data.tokenizer import SENTINELS, check_tokenizer_inputs
    from model.data.tokenizer import train_tokenizer as build

    t = cfg.train
    check_tokenizer_inputs(t.train_file, t.tokenizer_dir)  # before the imports of the real work
    stopping.watch_outputs(t.tokenizer_dir)
    tok = build(t.train_file, t.tokenizer_dir, vocab_size=t.vocab_size, max_rows=t.tokenizer_max_rows,
                character_coverage=t.character_coverage, seed=t.seed)
    print(f'tokenizer: {len(tok) - len(SENTINELS)} pieces + {len(SENTINELS)} T5 sentinels (pad {tok.pad_token_id}, '
          f'eos {tok.eos_token_id}, unk {tok.unk_token_id}) -> {t.tokenizer_dir}')


def parse_prompts(prompts) -> list[str]:
    """--prompts as typed (model.cli.keep_text): a JSON list (or a Python list of strings, as Fire read it
    before: ast.literal_eval, which runs no code), else one prompt, whatever it looks like (1e3 is "1e3");
    a mapping ({"a": 1}) is refused, as it was.
    A list or tuple from a caller in Python is taken as it is."""
    if isinstance(prompts, bool):  # --prompts without a value
        raise UserError('--prompts needs a value: --prompts=\'["你好","1+1="]\'')
    if prompts in (None, ''):
        from model.prep.demo_corpus import demo_prompts

        return demo_prompts()
    if isinstance(prompts, str) and prompts.lstrip()[:1] in ('[', '{'):  # a list; a mapping is refused below
        try:
            prompts = json.loads(prompts)
        except ValueError:
            import ast

            try:
                read = ast.literal_eval(prompts.strip())
            except (ValueError, SyntaxError, MemoryError, RecursionError):
                read = None
            prompts = read if isinstance(read, (list, dict)) else prompts
    if isinstance(prompts, (list, tuple)):
        if not prompts or any(isinstance(p, (list, tuple, dict)) for p in prompts):
            raise UserError('--prompts: give one prompt, or a list of prompts such as --prompts=\'["你好","1+1="]\'')
        return [str(p) for p in prompts]
    if isinstance(prompts, dict):
        raise UserError('--prompts: give one prompt, or a list of prompts such as --prompts=\'["你好","1+1="]\'')
    return [str(prompts)]


def _inference_setup(command: str, preset, use_large_config, flags: dict, extra=()):
    """(config, decode options, model source) of generate / chat / test: every flag checked,
    the model found and described, before torch is imported."""
    model_dir = flags.pop('model_dir', '')
    decode_values = {k: flags.pop(k) for k in list(flags) if k in DECODE_FIELDS}
    cfg = _resolve(command, preset, use_large_config, flags, extra=('model_dir', *DECODE_FIELDS, *extra))
    decode = DecodeConfig(**{k: coerce(k, v, DECODE_FIELDS[k]) for k, v in decode_values.items()})
    validate_decode(decode)
    from model.net.chat_model import find_model_source

    source = find_model_source(cfg, '' if model_dir in (None, '') else coerce('model_dir', model_dir, str))
    return cfg, decode, source


def _load(cfg, source):
    from model.net.chat_model import load_for_inference

    model, tok, max_seq_len = load_for_inference(cfg, source)
    print(f'model: {source.path}' + (f' (tokenizer {source.tokenizer_dir})' if source.kind == 'weights' else ''))
    return model, tok, max_seq_len


def generate(*, use_large_config=False, preset=None, prompts=None, **flags):
    """Answer prompts with a trained model (default: output_dir/best, else output_dir/final)."""
    prompts = parse_prompts(prompts)
    cfg, decode, source = _inference_setup('generate', preset, use_large_config, flags, extra=('prompts',))
    from model.net.chat_model import answer, objective_note, sentinel_note, unfilled_note

    model, tok, max_seq_len = _load(cfg, source)
    said = {}
    for p in prompts:
        if note := sentinel_note(tok, p, max_seq_len) or objective_note(source.objective, p):
            said[p] = note
            print(f'note: {p}: {note}', file=sys.stderr)
    fill = fill_mode(source)
    for p, a in zip(prompts, answer(model, tok, prompts, max_seq_len=max_seq_len, decode=decode, fill=fill)):
        if fill == 'always' and p not in said and (note := unfilled_note(a, p)):
            print(f'note: {p}: {note}', file=sys.stderr)
        print(f'  {p}  ->  {a}')


def fill_mode(source) -> bool | str:
    """How answers to prompts with sentinels are shown: a span-corruption model's always as the
    prompt filled; another model's (a pairs model asked about the string) so only where it wrote
    sentinels."""
    return 'always' if source.objective == 'span_corruption' else True


EXIT_WORDS = ('exit', 'quit', '/exit', '/quit', '退出', 'q')


def chat(*, use_large_config=False, preset=None, **flags):
    """Talk with a trained model: one prompt a line, the answer streamed as it is generated.
    Reads a pipe too (one answer a line); exit, quit, 退出 or Ctrl-D ends."""
    cfg, decode, source = _inference_setup('chat', preset, use_large_config, flags)
    from model.net.chat_model import answer, objective_note, sentinel_note, stream_answer, unfilled_note

    model, tok, max_seq_len = _load(cfg, source)
    if sys.stdin is None:  # stdin closed (<&-): nothing to answer
        return
    interactive = sys.stdin.isatty()
    fill, objective_said = fill_mode(source), None
    if interactive:
        print('输入问题后回车；exit / 退出 / Ctrl-D 结束。 (type a prompt and Enter; exit or Ctrl-D ends)')
    for line_no in itertools.count(1):
        try:
            # a terminal's line is bounded by the terminal (4 KiB); a pipe's only by this read
            line = input('你> ') if interactive else read_prompt_line(sys.stdin, line_no)
        except EOFError:  # Ctrl-D, or the end of a pipe: done
            if interactive:
                print()
            return
        except KeyboardInterrupt:  # Ctrl-C at the prompt, or SIGINT to a piped chat: ends it, exit 130
            if interactive:
                print()
            raise
        prompt = line.strip()
        if not prompt:
            continue
        if prompt.lower() in EXIT_WORDS:
            return
        note = sentinel_note(tok, prompt, max_seq_len)
        if not note and not objective_said:  # what the model is for: said once a session, not at every line
            note = objective_said = objective_note(source.objective, prompt)
        if note:
            print(f'note: {note}', file=sys.stderr, flush=True)
        shown = None
        if interactive:
            sys.stdout.write('模型> ')
            try:
                shown = stream_answer(model, tok, prompt, decode, max_seq_len, fill=fill)
            except KeyboardInterrupt:  # Ctrl-C during an answer stops that answer, not the chat
                stopping.STOP.clear()
                print('\n(回答已中断 answer stopped)')
        else:
            shown = answer(model, tok, [prompt], max_seq_len=max_seq_len, decode=decode, fill=fill)[0]
            print(shown, flush=True)
        if shown and fill == 'always' and not note and (left := unfilled_note(shown, prompt)):
            print(f'note: {left}', file=sys.stderr, flush=True)


def read_prompt_line(stream, line_no: int) -> str:
    """One line of a piped stdin, read in bounded memory (EOFError at its end)."""
    from model.data import read_guard

    line, whole = read_guard.read_bounded_line(getattr(stream, 'buffer', stream), read_guard.MAX_RECORD_BYTES)
    if not whole:
        raise read_guard.too_long('stdin', f'line {line_no}', 'MAX_RECORD_BYTES',
                                  'a prompt is cut to the model\'s max_seq_len tokens anyway: send a shorter one')
    if not line:
        raise EOFError
    # undecodable bytes become U+FFFD later (chat_model.valid_text), as input() would keep them
    if isinstance(line, bytes):
        line = line.decode(getattr(stream, 'encoding', None) or 'utf-8', 'surrogateescape')
    return line


def test(*, use_large_config=False, preset=None, out=None, **flags):
    """Score a trained model on test_file: loss, perplexity, BLEU-4 (sacrebleu, zh) and exact
    match, streamed; the predictions (prompt, reference, answer) go to a JSONL beside the model."""
    cfg, decode, source = _inference_setup('test', preset, use_large_config, flags, extra=('out',))
    from model.data.files import check_usable_rows, count_rows, files_kind, resolve_parquet_files
    from model.state.model_files import predictions_path
    from model.use.scoring import check_predictions_path, score_file

    t = cfg.train
    count_rows(t.test_file)
    if files_kind(resolve_parquet_files(t.test_file), 'test_file') != 'pairs':
        raise UserError(f'test_file: {t.test_file} holds raw text; test scores answers to prompts: give '
                        f'prompt/response pairs (a span-corruption model is scored by its validation loss in the '
                        f'training log)')
    check_usable_rows(t.test_file, 'test_file', shown=t.test_file)
    path = coerce('out', out, str) if out not in (None, '') else predictions_path(source.path, t.test_file)
    path = check_predictions_path(path, resolve_parquet_files(t.test_file),
                                  [t.train_file, t.validation_file, t.test_file])
    stopping.watch_outputs(path)
    from model.net.chat_model import objective_note

    if note := objective_note(source.objective, ''):  # its answers score near nothing: not a fault of the test
        print(f'note: test scores answers to prompts, and {note}', file=sys.stderr)
    model, tok, max_seq_len = _load(cfg, source)
    result = score_file(model, tok, t.test_file, path, max_seq_len, decode, t.max_test_rows, source.path)
    print(f'test_file: {t.test_file}')
    print(result.describe())


def plot(*, use_large_config=False, preset=None, log_file=None, out=None, **flags):
    """Draw training loss, learning rate and validation loss of a run from its log (PNG)."""
    cfg = _resolve('plot', preset, use_large_config, flags, extra=('log_file', 'out'))
    from model.use.plotting import newest_log, plot_log, run_logs

    # the run named (a preset, or its --output_dir): its newest log; none named: the newest of all; with the
    # earlier logs of the same run (its first start and resumes: one log each); --log_file: that log alone
    named = cfg.preset is not None or cfg.sources.get('output_dir') == 'flag'
    if log_file not in (None, ''):
        logs, note = [coerce('log_file', log_file, str)], ''
    else:
        log, note = newest_log(cfg.train.log_dir, cfg.train.output_dir if named else '')
        logs = run_logs(cfg.train.log_dir, log)
    log = logs[-1]
    if note:
        print(note, file=sys.stderr)
    path = coerce('out', out, str) if out not in (None, '') else os.path.splitext(log)[0] + '.png'
    stopping.watch_outputs(path)
    curves = plot_log(logs, path)
    starts = f' and {len(logs) - 1} earlier start(s) of its run: {", ".join(logs[:-1])}' if len(logs) > 1 else ''
    print(f'{len(curves.step)} training points, {len(curves.eval_step)} evaluations from {log}{starts}\nplot: {path}')


COMMANDS = {'train': train, 'train_tokenizer': train_tokenizer, 'generate': generate, 'chat': chat, 'test': test,
            'plot': plot}
PLOT_FLAGS = ['  --log_file=                                  one log, drawn alone (default: the newest in log_dir -- with --preset, --use_large_config or --output_dir, the newest of that run -- joined with its run\'s earlier starts: a first start and its resumes)',
              '  --out=                                       the PNG to write (default: beside the log)']


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
    elif name == 'plot':
        lines += ['plot:'] + PLOT_FLAGS + ['', 'config:'] + format_options(RunFlags, only=CONFIG_FLAGS)
        lines += format_options(TrainConfigPretrainLarge, only=('log_dir',))
    else:
        if name == 'generate':
            lines += ['  --prompts=                                   a prompt, or a list: --prompts=\'["你好","1+1="]\' '
                      '(default: the demo\'s prompts)']
        if name == 'test':
            lines += ['  --out=                                       the predictions JSONL (default: beside the model)']
            lines += format_options(TrainConfigPretrainLarge, only=('test_file', 'max_test_rows'))
        lines += format_options(ModelFlags)
        lines += ['', 'decoding (config.py DecodeConfig):'] + format_options(DecodeConfig)
        lines += ['', 'config:'] + format_options(RunFlags, only=CONFIG_FLAGS)
        lines += format_options(TrainConfigPretrainLarge, only=('output_dir', 'tokenizer_dir', 'max_seq_len'))
        lines += ['  (with a weights file (.bin) as --model_dir: the model shape flags of train --help too)']
    return '\n'.join(lines)


# flags whose values are text, given to the commands as typed (model.cli.keep_text); --prompts as typed too,
# a list in it read by parse_prompts
TEXT_FLAGS = text_fields(TrainConfigPretrainLarge, T5ModelConfig, RunFlags, ModelFlags) | {'out', 'log_file', 'prompts'}


def main(argv=None) -> None:
    stopping.install()
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
        import fire

        ownership.PLACES.clear()  # this command's places only (ownership.as_given)
        check_repeated_flags(args[1:], positional=False)
        fire.Fire(COMMANDS, command=[args[0], *keep_text(args[1:], TEXT_FLAGS)])
    except UserError as e:  # a place given through a link to nothing: said as given (ownership.as_given)
        sys.exit(_error(ownership.error_as_given(e)))
    except stopping.Stopped as e:  # training saved what it could; elsewhere nothing half-written stays
        sys.exit(stopping.report(e))
    except KeyboardInterrupt:  # raised by a library itself rather than by the stop's handler
        sys.exit(stopping.report(stopping.stop_error(signal.SIGINT)))
    except Exception as e:
        if not stopping.requested():
            raise
        # after a stop, a collective that another rank left on its way out fails: part of the stop
        sys.exit(stopping.report(stopping.STOP.stopped(f'nothing more was saved (then {stopping.describe(e)})')))


def _error(message: str) -> int:
    """One line on stderr (from the first process only, under a launcher); exit status 2."""
    if message and os.environ.get('RANK', '0') == '0':
        print(f"error: {' '.join(message.splitlines())}", file=sys.stderr)
    return 2


if __name__ == '__main__':
    quiet_on_broken_pipe(main)
