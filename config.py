"""Configuration: one schema for training, one for the model shape, presets as data.

Imports no torch and nothing from ``model/`` so the CLI can print, check and
explain a configuration in a fraction of a second.

Resolution order (each step validated once, see :func:`resolve_config`):
    defaults -> --preset (or --use_large_config) -> --field=value flags
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field, fields
from typing import Any

from model.cli import check_seeds, coerce, field_types, nearest_field, refuse_control_char, unknown_option
from model.errors import UserError
from model.state import model_files

PROJECT_ROOT: str = os.path.dirname(os.path.abspath(__file__))


@dataclass
class TrainConfigPretrainLarge:
    """Pretraining on ~10M prompt/response rows (the guide's defaults)."""

    # --- core (the guide's parameter table) ---
    epochs: int = 3  # passes over the training file
    batch_size_per_gpu: int = 32  # rows per process per micro-step
    gradient_accumulation_steps: int = 2  # micro-steps per optimizer step
    max_seq_len: int = 192  # tokens kept per prompt and per response (eos included; at most 4096); span corruption: tokens of a corrupted input
    learn_rate: float = 1e-4  # peak learning rate, reached after warmup
    warmup_steps: int = 1024  # optimizer steps of linear warmup
    warmup_ratio: float = 0.0  # warmup as a fraction of the run's optimizer steps, rounded up (0 = use warmup_steps; > 0 replaces it)
    save_steps: int = 5000  # optimizer steps between checkpoints
    logging_steps: int = 100  # optimizer steps between log lines

    # --- paths (the guide's table) ---
    tokenizer_dir: str = PROJECT_ROOT + '/model_save/my_tokenizer_sp/'  # HF tokenizer folder
    train_file: str = PROJECT_ROOT + '/data/pretrain_train_10m.parquet'  # file, folder or glob
    validation_file: str = PROJECT_ROOT + '/data/pretrain_valid_100k.parquet'  # file, folder or glob
    test_file: str = PROJECT_ROOT + '/data/pretrain_test.parquet'  # scored by `train_low_mem.py test` (not used in training)
    model_file: str = PROJECT_ROOT + '/model_save/pretrain_large/chat_small_t5.{}.bin'  # {} = step or 'best' (with --output_dir given: output_dir/chat_small_t5.{}.bin)
    train_state_dir: str = PROJECT_ROOT + '/model_save/pretrain_large/train_latest_state'  # resume state (with --output_dir given: output_dir/train_latest_state)
    output_dir: str = PROJECT_ROOT + '/model_save/pretrain_large/'  # HF-format best/ and final/ models
    log_dir: str = PROJECT_ROOT + '/logs/'  # chat_trainer_low_mem_<time>.log goes here

    # --- trainer ---
    mixed_precision: str = 'bf16'  # no | fp16 | bf16 (bf16 falls back to fp32 on CPUs without it)
    optimizer: str = 'adafactor'  # adafactor (T5 recipe, less memory) | adamw
    adafactor_scale_parameter: bool = False  # adafactor: scale each update by the parameter's RMS (learn_rate becomes relative to the weights' size)
    weight_decay: float = 0.0  # weight decay: decoupled for adamw, adafactor's own for adafactor
    aux_learn_rate: float = 0.0  # peak learning rate of the weights outside the layers' matrices (the embedding, the layer norms, the relative position biases), trained with Adam at it, not weight-decayed (0 = as the others: --optimizer at --learn_rate); a resume may change it but not switch it between 0 and not 0
    lr_schedule: str = 'cosine'  # decay after warmup: cosine | linear | constant
    max_grad_norm: float = 1.0  # clip the global gradient norm to this (0 = no clipping)
    seed: int = 23333  # seeds model init, dropout and the data order
    max_steps: int = 0  # stop after this many optimizer steps (0 = no limit)
    keep_latest_n_ckp: int = 3  # step model files kept (older are deleted; best is kept)
    gradient_checkpointing: bool = False  # recompute activations in the backward pass: much less activation memory, ~1/3 more compute
    allow_data_change: bool = False  # resume even if the data files changed since the save
    init_from: str = ''  # warm start: a model folder or weights file (.bin) whose weights start a new run (fresh optimizer, schedule and data position)
    log_with: str = 'none'  # also record curves with: none | tensorboard | wandb (accelerate's trackers)
    stop_grace_s: int = 120  # seconds your cluster allows between SIGTERM and SIGKILL: a stop saves within them (SLURM: match #SBATCH --signal=B:TERM@<this>); a save that takes longer is warned about

    # --- objective ---
    objective: str = 'pairs'  # what the model learns: pairs (the guide's prompt -> response) | span_corruption (T5's own pretraining on raw text: files with a text column)
    noise_density: float = 0.15  # span corruption: share of a text's tokens masked (T5: 0.15)
    mean_noise_span_length: float = 3.0  # span corruption: mean tokens per masked span, each replaced by one sentinel (T5: 3)

    # --- evaluation ---
    eval_steps: int = 0  # optimizer steps between evaluations (0 = only at each epoch end)
    max_eval_rows: int = 20000  # validation rows (span corruption: examples) used for the validation loss (0 = all)
    bleu_samples: int = 64  # validation rows answered greedily for BLEU-4 (0 = no BLEU)
    show_samples: int = 3  # prompts whose generated answer is logged at each evaluation
    eval_max_new_tokens: int = 192  # most tokens generated per answer for BLEU and the samples at an evaluation (at most max_seq_len)
    max_test_rows: int = 0  # rows of test_file that `test` scores (0 = all)

    # --- data pipeline ---
    num_workers: int = 0  # DataLoader worker processes per rank (0 = tokenize in the main process)
    shuffle_window_rows: int = 65536  # rows shuffled together (memory ~ this many rows of text)
    shuffle_row_groups: int = 16  # row groups a shuffle window draws its rows from: a file sorted by source or topic still trains mixed
    group_by_length: bool = True  # sort rows by length within a window to cut padding (faster steps; where lengths go with the task, as in the demo, it learns less per step: measured in the README)
    length_group_batches: int = 64  # local batches per length-sorting window
    packing: bool = True  # pairs: a batch's pairs laid end to end in fewer rows, each attending only to itself: the padded batch's loss and gradients (dropout draws aside) in fewer positions, attention weighed by d_model (measured in the README); the batch's pairs and order do not change

    # --- tokenizer training (train_low_mem.py train_tokenizer) ---
    vocab_size: int = 32000  # sentencepiece vocabulary (pieces, incl. 256 byte pieces); T5's 100 sentinels <extra_id_N> come on top
    tokenizer_max_rows: int = 2_000_000  # rows sampled from the train file to train it
    character_coverage: float = 0.9995  # share of characters kept as pieces (rest: bytes)


@dataclass
class T5ModelConfig:
    """The chat_small_t5 shape (an encoder-decoder T5; vocab comes from the tokenizer)."""

    d_model: int = 768  # hidden size
    num_heads: int = 12  # attention heads
    d_kv: int = 64  # size of one attention head (num_heads * d_kv must equal d_model)
    d_ff: int = 3072  # feed-forward inner size
    num_layers: int = 10  # encoder blocks
    num_decoder_layers: int = 10  # decoder blocks
    dropout_rate: float = 0.1  # dropout probability in every block
    feed_forward_proj: str = 'relu'  # relu | gated-gelu
    relative_attention_num_buckets: int = 32  # buckets of T5's relative position bias
    relative_attention_max_distance: int = 128  # tokens beyond which positions share a bucket
    tie_word_embeddings: bool = True  # True: scale decoder outputs by d_model**-0.5 as T5 did; False: as T5 v1.1 (transformers 5 shares the embedding and output weights either way)


# --- presets: data applied to the one schema (the guide's templates, plus a CPU demo) --

PRESETS: dict[str, dict[str, Any]] = {
    '1m': {'epochs': 5, 'save_steps': 2000},
    '5m': {'epochs': 4, 'save_steps': 3000},
    '10m': {},  # the defaults are the 10M-row template
    '50m': {'epochs': 2, 'save_steps': 10000},
    'demo': {
        # a model and data small enough to learn visibly on a 2-core CPU in minutes
        'epochs': 8,
        'batch_size_per_gpu': 64,
        'gradient_accumulation_steps': 1,
        'max_seq_len': 32,
        # the recipe that learned fastest per step in bench/bench_recipe.py (bench/RECIPE_NOTES.md): Adafactor
        # with parameter scaling at 3e-2, warmup a third of the run, no dropout (was 1e-2 and 5%, measured with
        # length-grouped batches by mistake; before that AdamW 2e-3, 200 warmup steps)
        'learn_rate': 3e-2,
        'warmup_ratio': 0.33,
        'save_steps': 200,
        'logging_steps': 20,
        'optimizer': 'adafactor',
        'adafactor_scale_parameter': True,
        # no --aux_learn_rate: at 1,000 steps it learned the demo corpus far faster (69% held-out exact match
        # against 50%), but over this preset's whole 4,496 steps it ended worse (test: 96.8% against 98.4%;
        # bench/RECIPE_NOTES.md section A)
        # its tasks differ in length: batches sorted by length hold one task each and learned far less per
        # step (bench/bench_train.py, numbers task: 50.8% exact match grouped, 98.4% not, medians of 2 seeds)
        'group_by_length': False,
        'tokenizer_dir': PROJECT_ROOT + '/model_save/demo/tokenizer/',
        'train_file': PROJECT_ROOT + '/data/demo/train.parquet',
        'validation_file': PROJECT_ROOT + '/data/demo/valid.parquet',
        'test_file': PROJECT_ROOT + '/data/demo/valid.parquet',  # held-out prompts
        'model_file': PROJECT_ROOT + '/model_save/demo/chat_small_t5.{}.bin',
        'train_state_dir': PROJECT_ROOT + '/model_save/demo/train_latest_state',
        'output_dir': PROJECT_ROOT + '/model_save/demo/',
        'max_eval_rows': 500,
        'bleu_samples': 48,
        'vocab_size': 1200,
        'd_model': 128,
        'num_heads': 4,
        'd_kv': 32,
        'd_ff': 512,
        'num_layers': 3,
        'num_decoder_layers': 3,
        'dropout_rate': 0.0,
    },
}

PATH_FIELDS = ('tokenizer_dir', 'train_file', 'validation_file', 'test_file', 'model_file', 'train_state_dir',
               'output_dir', 'log_dir')
MAX_BLEU_SAMPLES = 10_000
MAX_NEW_TOKENS = 2048  # most tokens of one generated answer (generate, chat, test, evaluation)
MAX_SEQ_LEN = 4096  # T5's relative positions work at any length, but attention memory grows with its square
MAX_TOKENIZER_ROWS = 20_000_000

PRECISIONS = ('no', 'fp16', 'bf16')
OPTIMIZERS = ('adafactor', 'adamw')
TRACKERS = ('none', 'tensorboard', 'wandb')
LR_SCHEDULES = ('cosine', 'linear', 'constant')
FEED_FORWARD = ('relu', 'gated-gelu')
OBJECTIVES = ('pairs', 'span_corruption')  # model/data/loader.py's

TRAIN_FIELDS = field_types(TrainConfigPretrainLarge)
MODEL_FIELDS = field_types(T5ModelConfig)
assert not set(TRAIN_FIELDS) & set(MODEL_FIELDS), 'a flag must map to exactly one field'


def check_model_file_pattern(pattern: str) -> None:
    """model_file holds exactly one '{}' (the step or 'best'), in its file name; other braces are
    doubled ('{{', '}}': literal, in the folder or the name)."""
    import string

    from model.state.model_files import STEP

    once = UserError(f"model_file must contain '{{}}' exactly once (replaced by the step or 'best'; braces meant "
                     f"literally are written doubled, '{{{{' and '}}}}'): {pattern}")
    try:
        fields = [(name, spec, conversion) for _, name, spec, conversion in string.Formatter().parse(pattern)
                  if name is not None]
        if len(fields) != 1:
            raise once
        name, spec, conversion = fields[0]
        if name not in ('', '0'):
            raise UserError(f"model_file {pattern!r} cannot be formatted (a field named {name!r}); use '{{}}' once "
                            f"and write other braces doubled, '{{{{' and '}}}}'")
        if spec or conversion:  # '{!r}', '{:>3}': the file's name would not be the step's
            raise UserError(f"model_file's '{{}}' takes no conversion or format ('!r', ':>3'): {pattern}")
        marked = pattern.format(STEP)
    except (KeyError, IndexError, ValueError) as e:
        raise UserError(f"model_file {pattern!r} cannot be formatted ({type(e).__name__}: {e}); "
                        f"use '{{}}' once and write other braces doubled, '{{{{' and '}}}}'") from None
    folder, name = os.path.split(marked)
    if STEP in folder:
        raise UserError(f"model_file needs its '{{}}' (the step) in the file name, e.g. .../chat_small_t5.{{}}.bin: "
                        f"{pattern}")
    if name == STEP:
        raise UserError(f"model_file's file name must hold more than the step (its 'best' would be output_dir/best's "
                        f"name), e.g. .../chat_small_t5.{{}}.bin: {pattern}")


def validate(train: TrainConfigPretrainLarge, model: T5ModelConfig) -> None:
    """All value checks in one place; raises UserError with a fixable message."""
    positive = ('epochs', 'batch_size_per_gpu', 'gradient_accumulation_steps', 'max_seq_len',
                'save_steps', 'logging_steps', 'shuffle_window_rows', 'shuffle_row_groups', 'length_group_batches',
                'vocab_size', 'tokenizer_max_rows')
    for name in positive:
        if getattr(train, name) <= 0:
            raise UserError(f'{name} must be a positive integer, got {getattr(train, name)}')
    non_negative = ('warmup_steps', 'max_steps', 'eval_steps', 'max_eval_rows', 'bleu_samples',
                    'show_samples', 'num_workers', 'keep_latest_n_ckp', 'max_test_rows')
    for name in non_negative:
        if getattr(train, name) < 0:
            raise UserError(f'{name} must be >= 0, got {getattr(train, name)}')
    for f in fields(train):
        if f.name in PATH_FIELDS and not str(getattr(train, f.name)).strip():
            raise UserError(f'{f.name} is empty; give a path, e.g. --{f.name}={f.default}')
    for name in (*PATH_FIELDS, 'init_from'):  # reports print one path a line, and the start script reads them
        refuse_control_char(str(getattr(train, name)), f'{name}=')
    cores = os.cpu_count() or 1
    if train.num_workers > cores:
        raise UserError(f'num_workers={train.num_workers} is more than the {cores} cores of this machine '
                        f'(each worker is a process holding its own window of rows); use at most {cores}')
    check_seeds(train)
    if not train.learn_rate > 0:
        raise UserError(f'learn_rate must be > 0, got {train.learn_rate}')
    if not 0 <= train.warmup_ratio < 1:
        raise UserError(f'warmup_ratio must be in [0, 1) (a fraction of the run\'s optimizer steps; 0 = use '
                        f'warmup_steps), got {train.warmup_ratio}')
    if train.max_grad_norm < 0 or train.weight_decay < 0:
        raise UserError('max_grad_norm and weight_decay must be >= 0')
    if not 0 <= train.aux_learn_rate < float('inf'):
        raise UserError(f'aux_learn_rate must be >= 0 (0 = the embedding, norms and position biases learn as the '
                        f'other weights do), got {train.aux_learn_rate}')
    if train.max_seq_len < 2:
        raise UserError(f'max_seq_len must be at least 2 (one token plus eos), got {train.max_seq_len}')
    if train.max_seq_len > MAX_SEQ_LEN:
        raise UserError(f'max_seq_len={train.max_seq_len} is more than {MAX_SEQ_LEN:,} (attention memory grows with '
                        f'the square of the length); use at most {MAX_SEQ_LEN}')
    if not 1 <= train.eval_max_new_tokens <= MAX_NEW_TOKENS:
        raise UserError(f'eval_max_new_tokens={train.eval_max_new_tokens}: give 1 to {MAX_NEW_TOKENS}')
    if not 1 <= train.stop_grace_s <= 24 * 3600:
        raise UserError(f'stop_grace_s={train.stop_grace_s}: give the seconds between SIGTERM and SIGKILL '
                        f'on your cluster, 1 to 86400')
    if train.objective == 'span_corruption':  # the span fields do nothing for pairs: not judged there
        check_span_lengths(train)
    if not 0 < train.character_coverage <= 1:
        raise UserError(f'character_coverage must be in (0, 1], got {train.character_coverage}')
    for name, allowed in (('mixed_precision', PRECISIONS), ('optimizer', OPTIMIZERS),
                          ('lr_schedule', LR_SCHEDULES), ('log_with', TRACKERS), ('objective', OBJECTIVES)):
        if getattr(train, name) not in allowed:
            raise UserError(f'{name} must be one of {", ".join(allowed)}; got {getattr(train, name)!r}')
    check_model_file_pattern(train.model_file)
    caps = {'bleu_samples': (MAX_BLEU_SAMPLES, 'each is answered at every evaluation'),
            'show_samples': (MAX_BLEU_SAMPLES, 'each is answered at every evaluation'),
            'tokenizer_max_rows': (MAX_TOKENIZER_ROWS, 'sentencepiece holds the sampled text in memory')}
    for name, (cap, why) in caps.items():
        if getattr(train, name) > cap:
            raise UserError(f'{name}={getattr(train, name)} is more than {cap:,} ({why}); use at most {cap}')
    if (train.group_by_length and train.objective == 'pairs'
            and train.length_group_batches * train.batch_size_per_gpu > train.shuffle_window_rows):
        raise UserError(f'length_group_batches x batch_size_per_gpu = '
                        f'{train.length_group_batches * train.batch_size_per_gpu} rows must fit in '
                        f'shuffle_window_rows={train.shuffle_window_rows} (the rows held in memory); '
                        f'lower --length_group_batches or raise --shuffle_window_rows')
    for name in ('d_model', 'num_heads', 'd_kv', 'd_ff', 'num_layers', 'num_decoder_layers',
                 'relative_attention_num_buckets', 'relative_attention_max_distance'):
        if getattr(model, name) <= 0:
            raise UserError(f'{name} must be a positive integer, got {getattr(model, name)}')
    if model.num_heads * model.d_kv != model.d_model:
        raise UserError(f'num_heads x d_kv must equal d_model: {model.num_heads} x {model.d_kv} = '
                        f'{model.num_heads * model.d_kv}, d_model = {model.d_model}; '
                        f'e.g. --d_kv={model.d_model // model.num_heads}'
                        if model.d_model % model.num_heads == 0 else
                        f'num_heads x d_kv must equal d_model, and d_model={model.d_model} is not '
                        f'divisible by num_heads={model.num_heads}')
    if not 0 <= model.dropout_rate < 1:
        raise UserError(f'dropout_rate must be in [0, 1), got {model.dropout_rate}')
    if model.feed_forward_proj not in FEED_FORWARD:
        raise UserError(f'feed_forward_proj must be one of {", ".join(FEED_FORWARD)}; '
                        f'got {model.feed_forward_proj!r}')


def check_span_lengths(train) -> None:
    """Span corruption fits max_seq_len: a run corrupts to at most max_seq_len tokens and needs no
    more than the tokenizer's 100 sentinels (one per noise span)."""
    from model.data.span_corruption import SENTINEL_COUNT, lengths_for, span_count

    if not 0 < train.noise_density <= 0.5:
        raise UserError(f'noise_density must be in (0, 0.5], got {train.noise_density} (T5: 0.15; above 0.5 a '
                        f'target is longer than its input)')
    if train.max_seq_len < 8:
        raise UserError(f'max_seq_len={train.max_seq_len} is too short for span corruption; use at least 8')
    if not 1 <= train.mean_noise_span_length <= train.max_seq_len:
        raise UserError(f'mean_noise_span_length must be 1 to max_seq_len={train.max_seq_len} tokens, got '
                        f'{train.mean_noise_span_length} (T5: 3)')
    d, m = train.noise_density, train.mean_noise_span_length
    try:
        raw, _ = lengths_for(train.max_seq_len, d, m)
    except ValueError:
        raise UserError(f'max_seq_len={train.max_seq_len} is too short for span corruption; use at least 8') from None
    if span_count(raw, d, m) > SENTINEL_COUNT:
        lo, hi = 8, train.max_seq_len  # the longest that fits: spans grow with the length
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if span_count(lengths_for(mid, d, m)[0], d, m) <= SENTINEL_COUNT else (lo, mid)
        longest = lo
        raise UserError(f'max_seq_len={train.max_seq_len} with noise_density={d} and mean_noise_span_length={m} makes '
                        f'{span_count(raw, d, m)} noise spans an example, more than the {SENTINEL_COUNT} sentinels; use '
                        f'--max_seq_len={longest} or less, or a longer --mean_noise_span_length')


# Fields that act only under some other setting: for each, why it has no effect with the train
# config's other settings (and whether the run resumes: None when not known), or None where it
# acts. A flag given for one of them where it has no effect is said in one note (the dry run's,
# and the training log's start): silently ignored, it reads as applied.
_SPAN = 'span corruption lays documents end to end into full rows (no padding to pack or group)'
_NO_ANSWERS = 'span corruption is evaluated by its denoising loss alone (no answers are generated)'
_ONLY_SPAN = 'it applies to --objective=span_corruption'


def _pairs_only(why: str):
    return lambda t, resume: why if t.objective != 'pairs' else None


UNUSED_WHEN: dict[str, Any] = {
    'packing': _pairs_only(_SPAN),
    'group_by_length': _pairs_only(_SPAN),
    'length_group_batches': lambda t, resume: _SPAN if t.objective != 'pairs' else (
        None if t.group_by_length else 'it sizes the windows of --group_by_length=True, and this run does not group'),
    'bleu_samples': _pairs_only(_NO_ANSWERS),
    'show_samples': _pairs_only(_NO_ANSWERS),
    'eval_max_new_tokens': lambda t, resume: _NO_ANSWERS if t.objective != 'pairs' else (
        None if t.bleu_samples or t.show_samples else 'it caps the answers generated for --bleu_samples and '
                                                      '--show_samples, both 0 here'),
    'noise_density': lambda t, resume: None if t.objective == 'span_corruption' else _ONLY_SPAN,
    'mean_noise_span_length': lambda t, resume: None if t.objective == 'span_corruption' else _ONLY_SPAN,
    'adafactor_scale_parameter': lambda t, resume: None if t.optimizer == 'adafactor' else
    'it applies to --optimizer=adafactor',
    'warmup_steps': lambda t, resume: 'a --warmup_ratio above 0 replaces it' if t.warmup_ratio > 0 else None,
    'allow_data_change': lambda t, resume: 'it lets a resume go on over changed data, and this run starts afresh'
    if resume is False else None,
}
# a value that asks for nothing where the field has no effect (a script turning BLEU off for every
# stage): not said
_OFF = {'packing': False, 'group_by_length': False, 'bleu_samples': 0, 'show_samples': 0,
        'adafactor_scale_parameter': False, 'warmup_steps': 0, 'allow_data_change': False}
# a field whose value the run caps by another's: the value it acts with, and why; said (as UNUSED_WHEN's
# are) where a flag gives more. The ones capped by the run's length (the --*_steps intervals, --max_steps)
# are said once that is known: model/train/preflight.py's run_length_notes
CAPPED_BY: dict[str, Any] = {
    'eval_max_new_tokens': lambda t: (t.max_seq_len, f'max_seq_len={t.max_seq_len} caps the answers generated at '
                                                     f'an evaluation (the longest response the run trains on; a '
                                                     f'longer --max_seq_len raises it)'),
}


@dataclass
class ResolvedConfig:
    train: TrainConfigPretrainLarge
    model: T5ModelConfig
    preset: str | None = None
    sources: dict[str, str] = field(default_factory=dict)  # field -> 'preset:<name>' | 'flag' | 'from --output_dir'

    def to_dict(self) -> dict[str, Any]:
        return {'train': dataclasses.asdict(self.train), 'model': dataclasses.asdict(self.model),
                'preset': self.preset}

    def flags_given(self) -> set[str]:
        """The fields given by a flag on the command line (not by a preset, a default or --output_dir)."""
        return {name for name, source in self.sources.items() if source == 'flag'}

    def unused_flags(self, resume: bool | None = None) -> list[str]:
        """A note for each flag given that has no effect with this config's other settings
        (UNUSED_WHEN; resume: whether the run resumes, None if not known), with why; a value that
        turns the field off is not said."""
        notes = []
        for name, unused in UNUSED_WHEN.items():
            value = getattr(self.train, name)
            if self.sources.get(name) != 'flag' or _OFF.get(name, object()) == value:
                continue
            if why := unused(self.train, resume):
                notes.append(f'--{name}={value} has no effect on this run: {why}; leave it out')
        return notes

    def capped_flags(self, resume: bool | None = None) -> list[str]:
        """A note for each flag given above the value the run acts with (CAPPED_BY), unless it
        has no effect at all (unused_flags says that)."""
        notes = []
        for name, capped_by in CAPPED_BY.items():
            value = getattr(self.train, name)
            if self.sources.get(name) != 'flag' or (name in UNUSED_WHEN and UNUSED_WHEN[name](self.train, resume)):
                continue
            cap, why = capped_by(self.train)
            if value > cap:
                notes.append(f'--{name}={value} acts as {cap} on this run: {why}; give --{name}={cap} or less')
        return notes

    def describe(self) -> str:
        """The resolved config as aligned lines, marking what a preset or a flag changed."""
        lines = [f'preset: {self.preset or "none (TrainConfigPretrainLarge defaults)"}']
        for title, obj in (('train', self.train), ('model', self.model)):
            lines.append(f'[{title}]')
            for f in fields(obj):
                src = self.sources.get(f.name)
                mark = f'   <- {src}' if src else ''
                lines.append(f'  {f.name:<32} {getattr(obj, f.name)!r}{mark}')
        return '\n'.join(lines)


def resolve_config(preset: str | None = None, use_large_config: bool = False,
                   overrides: dict[str, Any] | None = None) -> ResolvedConfig:
    """defaults -> preset -> flags, with types coerced and values validated."""
    overrides = dict(overrides or {})
    if use_large_config:
        if preset not in (None, '10m'):
            raise UserError(f'--use_large_config=True selects the 10m configuration; '
                            f'it conflicts with --preset={preset}: pass one of them')
        preset = '10m'
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    if preset is not None:
        preset = str(preset)
        if preset not in PRESETS:
            near = nearest_field(preset, PRESETS)
            hint = f'; did you mean {near}?' if near else ''
            raise UserError(f'unknown preset {preset!r}: choose one of {", ".join(PRESETS)}{hint}')
        for k, v in PRESETS[preset].items():
            values[k] = v
            sources[k] = f'preset:{preset}'
    all_fields = {**TRAIN_FIELDS, **MODEL_FIELDS}
    for k, v in overrides.items():
        if k not in all_fields:
            raise unknown_option(k, all_fields)
        values[k] = coerce(k, v, all_fields[k])
        sources[k] = 'flag'
    follow_output_dir(values, sources)
    if sources.get('warmup_steps') == 'flag' and sources.get('warmup_ratio') not in (None, 'flag'):
        values['warmup_ratio'] = 0.0  # the preset's warmup_ratio would replace the steps the user gave
        sources['warmup_ratio'] = 'set to 0 by --warmup_steps'
    train = TrainConfigPretrainLarge(**{k: v for k, v in values.items() if k in TRAIN_FIELDS})
    model = T5ModelConfig(**{k: v for k, v in values.items() if k in MODEL_FIELDS})
    validate(train, model)
    return ResolvedConfig(train=train, model=model, preset=preset, sources=sources)


# the run's outputs kept beside its models: where they go when --output_dir is given without them
OUTPUT_DIR_PLACES = {'train_state_dir': model_files.STATES_IN_OUTPUT_DIR,
                     'model_file': model_files.STEP_FILES_IN_OUTPUT_DIR}


def place_before_output_dir(preset: str | None, name: str) -> str:
    """Where ``name`` (train_state_dir or model_file) would be without follow_output_dir: the
    preset's or the default's place -- where a run started before that rule keeps its states."""
    return PRESETS.get(preset or '', {}).get(name) or getattr(TrainConfigPretrainLarge(), name)


def follow_output_dir(values: dict[str, Any], sources: dict[str, str]) -> None:
    """A run given its own --output_dir writes its states and step files there too, unless those
    are given as well: otherwise two runs that differ only in output_dir would share the default
    (or preset's) train_state_dir and model_file folder -- the second refused as "in use" for a
    path its user never named, or archiving the first one's step files as its own."""
    if sources.get('output_dir') != 'flag':
        return
    from model.state.model_files import join_model_file, split_model_file

    folder = str(values['output_dir'])
    for name, leaf in OUTPUT_DIR_PLACES.items():
        if sources.get(name) != 'flag':
            values[name] = (join_model_file(folder, *split_model_file(leaf)[1:]) if name == 'model_file'
                            else os.path.join(folder, leaf))
            sources[name] = 'from --output_dir'


def config_from_dict(d: dict[str, Any]) -> ResolvedConfig:
    """Rebuild a saved config (ignores fields a newer schema dropped)."""
    train = TrainConfigPretrainLarge(**{k: v for k, v in d['train'].items() if k in TRAIN_FIELDS})
    model = T5ModelConfig(**{k: v for k, v in d['model'].items() if k in MODEL_FIELDS})
    return ResolvedConfig(train=train, model=model, preset=d.get('preset'))


# --- run flags and help -----------------------------------------------------


@dataclass
class RunFlags:
    """Flags of `train` besides the config fields."""

    preset: str = ''  # a template over the defaults: 1m | 5m | 10m | 50m | demo
    use_large_config: bool = False  # the guide's flag: the 10m template (= the defaults)
    is_keep_training: bool = False  # continue the newest saved state in train_state_dir
    dry_run: bool = False  # print the resolved config and check everything the run needs, without training
    rows_per_s: float = 0.0  # dry run: training rows/s of one GPU measured by bench/bench_gpu.py, for the time per epoch (0 = from FLOPs)




@dataclass
class ModelFlags:
    """Which trained model `generate`, `chat` and `test` use."""

    model_dir: str = ''  # a model folder written by train, or a weights file (.bin) with --tokenizer_dir (default: output_dir/best, else output_dir/final)


@dataclass
class DecodeConfig:
    """How answers are generated (`generate`, `chat`, `test`)."""

    num_beams: int = 1  # beam search width (1 = greedy, or sampling with --do_sample=True)
    do_sample: bool = False  # sample each token instead of taking the most likely one
    temperature: float = 1.0  # sampling: below 1 sharper, above 1 more random
    top_p: float = 1.0  # sampling: keep the smallest set of tokens holding this probability
    top_k: int = 50  # sampling: keep the k most likely tokens (0 = all)
    repetition_penalty: float = 1.0  # above 1 makes tokens already in the answer less likely
    no_repeat_ngram_size: int = 3  # an answer never repeats an n-gram of this many tokens (0 = off): no loops
    max_new_tokens: int = 0  # most tokens per answer (0 = the max_seq_len the model was trained with; at most 2048)
    sample_seed: int = 0  # seeds sampling: the same command gives the same answers


MAX_BEAMS = 64  # memory grows with the beams: a bound, like MAX_NEW_TOKENS


def validate_decode(d: DecodeConfig) -> None:
    check_seeds(d)
    if not 1 <= d.num_beams <= MAX_BEAMS:
        raise UserError(f'--num_beams={d.num_beams}: give 1 to {MAX_BEAMS} (1 = greedy)')
    if not 0 <= d.max_new_tokens <= MAX_NEW_TOKENS:
        raise UserError(f'--max_new_tokens={d.max_new_tokens}: give 1 to {MAX_NEW_TOKENS} (0 = max_seq_len)')
    if not d.temperature > 0:
        raise UserError(f'temperature must be > 0, got {d.temperature}')
    if not 0 < d.top_p <= 1:
        raise UserError(f'top_p must be in (0, 1], got {d.top_p}')
    for name in ('top_k', 'no_repeat_ngram_size'):
        if getattr(d, name) < 0:
            raise UserError(f'--{name}={getattr(d, name)}: give a number >= 0 (0 = off)')
    default = DecodeConfig()
    given = [n for n in ('temperature', 'top_p', 'top_k') if getattr(d, n) != getattr(default, n)]
    if given and not d.do_sample:
        raise UserError(f'--{given[0]} applies to sampling only: add --do_sample=True (or leave --{given[0]} out)')
    if not d.repetition_penalty > 0:
        raise UserError(f'repetition_penalty must be > 0, got {d.repetition_penalty}')


DECODE_FIELDS = field_types(DecodeConfig)
