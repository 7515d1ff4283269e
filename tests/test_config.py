"""Config schema: the guide's defaults, presets, overrides, types and validation."""

import dataclasses
import os
import subprocess
import sys

import pytest

import config
from config import PRESETS, T5ModelConfig, TrainConfigPretrainLarge, resolve_config
from model.cli import coerce
from model.errors import UserError

GUIDE_DEFAULTS = {  # the guide's parameter table
    'epochs': 3, 'batch_size_per_gpu': 32, 'gradient_accumulation_steps': 2, 'max_seq_len': 192,
    'learn_rate': 1e-4, 'warmup_steps': 1024, 'save_steps': 5000, 'logging_steps': 100,
}
GUIDE_PATHS = {
    'tokenizer_dir': 'model_save/my_tokenizer_sp/',
    'train_file': 'data/pretrain_train_10m.parquet',
    'validation_file': 'data/pretrain_valid_100k.parquet',
    'test_file': 'data/pretrain_test.parquet',
    'model_file': 'model_save/pretrain_large/chat_small_t5.{}.bin',
    'train_state_dir': 'model_save/pretrain_large/train_latest_state',
}
GUIDE_TEMPLATES = {  # the guide's templates by data size: epochs, batch, accumulation, seq len, save_steps
    '1m': (5, 32, 2, 192, 2000), '5m': (4, 32, 2, 192, 3000),
    '10m': (3, 32, 2, 192, 5000), '50m': (2, 32, 2, 192, 10000),
}


def test_defaults_are_the_guides_table():
    t = TrainConfigPretrainLarge()
    for name, value in GUIDE_DEFAULTS.items():
        assert getattr(t, name) == value, name
    for name, rel in GUIDE_PATHS.items():
        assert getattr(t, name) == f'{config.PROJECT_ROOT}/{rel}', name
    assert t.mixed_precision == 'bf16'
    assert t.max_steps == 0
    assert t.warmup_ratio == 0.0 and t.adafactor_scale_parameter is False  # the guide's warmup_steps, T5's Adafactor


def test_recipe_flags_parse_and_are_marked():
    cfg = resolve_config(overrides={'warmup_ratio': '0.05', 'adafactor_scale_parameter': 'True'})
    assert cfg.train.warmup_ratio == 0.05 and cfg.train.adafactor_scale_parameter is True
    assert cfg.sources['warmup_ratio'] == cfg.sources['adafactor_scale_parameter'] == 'flag'


def test_model_shape_is_chat_small_t5():
    m = T5ModelConfig()
    assert (m.d_model, m.num_heads, m.d_kv, m.d_ff, m.num_layers, m.num_decoder_layers) == \
        (768, 12, 64, 3072, 10, 10)


@pytest.mark.parametrize('preset', sorted(GUIDE_TEMPLATES))
def test_size_presets_follow_the_templates(preset):
    t = resolve_config(preset=preset).train
    got = (t.epochs, t.batch_size_per_gpu, t.gradient_accumulation_steps, t.max_seq_len, t.save_steps)
    assert got == GUIDE_TEMPLATES[preset]


def test_10m_preset_and_use_large_config_equal_the_defaults():
    default = resolve_config()
    for cfg in (resolve_config(preset='10m'), resolve_config(use_large_config=True)):
        assert cfg.train == default.train and cfg.model == default.model


def test_presets_only_name_real_fields():
    known = {f.name for f in dataclasses.fields(TrainConfigPretrainLarge)} | \
        {f.name for f in dataclasses.fields(T5ModelConfig)}
    for name, values in PRESETS.items():
        assert set(values) <= known, name


def test_demo_preset_is_tiny_and_valid():
    cfg = resolve_config(preset='demo')
    assert cfg.model.d_model * cfg.model.num_layers < 768 * 10 / 10
    assert cfg.train.train_file.endswith('data/demo/train.parquet')
    assert cfg.sources['d_model'] == 'preset:demo'


def test_demo_preset_uses_the_measured_recipe():
    from model.train import preflight

    t = resolve_config(preset='demo').train
    assert (t.optimizer, t.adafactor_scale_parameter, t.learn_rate, t.warmup_ratio, t.aux_learn_rate) == (
        'adafactor', True, 3e-2, 0.33, 0.0)
    assert preflight.learn_rate_notes(t) == []  # in the range bench/bench_recipe.py measured good
    from model.net.sizing import warmup_steps_of

    assert warmup_steps_of(t.warmup_steps, t.warmup_ratio, 4496) == 1484  # the demo's 8 epochs: a third warms up
    assert preflight.warmup_notes(t, 4496) == []


def test_flags_override_preset_and_are_marked():
    cfg = resolve_config(preset='demo', overrides={'max_seq_len': 128, 'batch_size_per_gpu': 24,
                                                   'd_model': 64, 'num_heads': 2})
    assert cfg.train.max_seq_len == 128 and cfg.train.batch_size_per_gpu == 24
    assert cfg.model.d_model == 64 and cfg.model.d_kv == 32
    assert cfg.sources['max_seq_len'] == 'flag'
    text = cfg.describe()
    assert 'max_seq_len' in text and '<- flag' in text and '<- preset:demo' in text


@pytest.mark.parametrize('value,typ,expected', [
    (1, int, 1), ('0012', int, 12), (3.0e4, int, 30000), ('128', int, 128),
    (1e-4, float, 1e-4), (1, float, 1.0), ('5e-5', float, 5e-5),
    (True, bool, True), ('false', bool, False), ('True', bool, True), (0, bool, False),
    (123, str, '123'), ('a/b.parquet', str, 'a/b.parquet'),
])
def test_coerce_accepts_what_fire_produces(value, typ, expected):
    assert coerce('x', value, typ) == expected
    assert type(coerce('x', value, typ)) is typ


@pytest.mark.parametrize('name,value,word', [
    ('batch_size_per_gpu', 'abc', 'integer'), ('epochs', 1.5, 'integer'),
    ('learn_rate', 'fast', 'number'), ('group_by_length', 'maybe', 'true or false'),
    ('epochs', True, 'integer'),
])
def test_wrong_types_name_field_and_type(name, value, word):
    with pytest.raises(UserError) as e:
        resolve_config(overrides={name: value})
    assert name in str(e.value) and word in str(e.value)


def test_unknown_field_suggests_nearest():
    with pytest.raises(UserError, match=r'unknown option --max_seq_lenn; did you mean --max_seq_len\?'):
        resolve_config(overrides={'max_seq_lenn': 128})
    with pytest.raises(UserError, match='did you mean --learn_rate'):
        resolve_config(overrides={'learning_rat': 1e-3})


@pytest.mark.parametrize('overrides,needle', [
    ({'batch_size_per_gpu': 0}, 'batch_size_per_gpu must be a positive'),
    ({'mixed_precision': 'fp8'}, 'mixed_precision must be one of'),
    ({'optimizer': 'sgd'}, 'optimizer must be one of'),
    ({'d_model': 512}, 'num_heads x d_kv must equal d_model'),
    ({'d_model': 100}, 'not divisible'),
    ({'dropout_rate': 1.5}, 'dropout_rate'),
    ({'learn_rate': -1}, 'learn_rate must be > 0'),
    ({'warmup_ratio': -0.1}, r'warmup_ratio must be in \[0, 1\)'),
    ({'warmup_ratio': 1.0}, r'warmup_ratio must be in \[0, 1\)'),
    ({'model_file': 'model.bin'}, "must contain '{}'"),
    ({'max_seq_len': 1}, 'at least 2'),
    ({'seed': -1}, r'--seed=-1: give a seed from 0 to 4,294,967,295'),
    ({'seed': 2**32}, r'--seed=4294967296: give a seed from 0'),
    ({'objective': 'mlm'}, 'objective must be one of pairs, span_corruption'),
    ({'objective': 'span_corruption', 'noise_density': 0.9}, r'noise_density must be in \(0, 0.5\]'),
    ({'objective': 'span_corruption', 'noise_density': 0}, r'noise_density must be in \(0, 0.5\]'),
    ({'objective': 'span_corruption', 'mean_noise_span_length': 0.5}, 'mean_noise_span_length must be 1 to max_seq_len'),
    ({'objective': 'span_corruption', 'max_seq_len': 4}, 'too short for span corruption; use at least 8'),
    # what it says first at a length too short for both its mean span and the objective: the length
    ({'objective': 'span_corruption', 'max_seq_len': 2}, 'too short for span corruption; use at least 8'),
    # 227 noise spans at 4096: the largest length that needs at most 100 sentinels is named
    ({'objective': 'span_corruption', 'max_seq_len': 4096}, r'227 noise spans .* use --max_seq_len=1809 or less'),
    # a line break in a path would let it print lines of its own into the reports the start script reads
    ({'output_dir': '/tmp/run\nnot ready: x'}, r"='/tmp/run\\nnot ready: x.*' holds a control character \('\\n'"),
    ({'train_file': 'a\rb.parquet'}, r'train_file=.* holds a control character'),
    ({'init_from': 'm\x7f'}, r'init_from=.* holds a control character'),
])
def test_validation_messages(overrides, needle):
    with pytest.raises(UserError, match=needle):
        resolve_config(overrides=overrides)


def test_a_data_file_named_with_a_line_break_in_a_folder_or_pattern_is_refused(tmp_path):
    """The config's own paths are checked above; a file a folder or a pattern expands to printed
    lines of its own (`  path.output_dir=...`) into the dry run's report too."""
    from model.data.files import resolve_parquet_files

    for name in ('a\n  path.output_dir=EVIL\nx.parquet', 'b\u2028c.parquet', 'd\x85e.parquet'):
        folder = tmp_path / f'f{ord(name[1])}'
        folder.mkdir()
        (folder / 'fine.parquet').write_bytes(b'')
        (folder / name).write_bytes(b'')
        for spec in (str(folder), f'{folder}/*.parquet'):
            with pytest.raises(UserError, match=r"\.parquet' holds a control character"):
                resolve_parquet_files(spec)


def test_the_span_fields_are_not_judged_for_pairs_they_do_nothing_there():
    for changed in ({'max_seq_len': 2}, {'noise_density': 0.9}, {'mean_noise_span_length': 0.5}):
        assert resolve_config(overrides=changed).train.objective == 'pairs'  # no refusal of a flag not given


def test_preset_errors():
    with pytest.raises(UserError, match='did you mean demo'):
        resolve_config(preset='dmeo')
    with pytest.raises(UserError, match='conflicts with --preset=demo'):
        resolve_config(preset='demo', use_large_config=True)


def test_train_and_model_fields_do_not_collide():
    assert not set(config.TRAIN_FIELDS) & set(config.MODEL_FIELDS)


def test_saved_dict_round_trip():
    cfg = resolve_config(preset='demo', overrides={'epochs': 7})
    back = config.config_from_dict(cfg.to_dict())
    assert back.train == cfg.train and back.model == cfg.model and back.preset == 'demo'


def test_config_imports_no_torch():
    code = 'import sys, config, train_low_mem; assert "torch" not in sys.modules, "torch imported"'
    subprocess.run([sys.executable, '-c', code], cwd=config.PROJECT_ROOT, check=True)


def test_every_seed_of_every_command_is_one_the_libraries_take():
    from config import DecodeConfig, validate_decode
    from model.cli import MAX_SEED, parse_options
    from model.prep.options import DemoOptions, SplitOptions

    with pytest.raises(UserError, match='--sample_seed=-2: give a seed'):
        validate_decode(DecodeConfig(sample_seed=-2))
    validate_decode(DecodeConfig(sample_seed=MAX_SEED))
    for cls, args, positional in ((SplitOptions, ('in.parquet',), ('input',)), (DemoOptions, (), ())):
        with pytest.raises(UserError, match=f'--seed={MAX_SEED + 1}: give a seed'):
            parse_options(cls, 'x', args, {'seed': MAX_SEED + 1}, positional)
        assert parse_options(cls, 'x', args, {'seed': 0}, positional).seed == 0


def test_span_corruption_is_free_of_the_pairs_only_length_group_rule():
    small = {'shuffle_window_rows': 50, 'batch_size_per_gpu': 64}
    with pytest.raises(UserError, match='must fit in shuffle_window_rows'):
        resolve_config(overrides=small)
    assert resolve_config(overrides={**small, 'objective': 'span_corruption'}).train.objective == 'span_corruption'


def test_a_given_output_dir_takes_the_states_and_step_files_along():
    # two runs that differ only in --output_dir share no place (the default or preset's would be shared)
    for preset in (None, 'demo'):
        cfg = resolve_config(preset=preset, overrides={'output_dir': '/runs/a'})
        assert (cfg.train.model_file, cfg.train.train_state_dir) == ('/runs/a/chat_small_t5.{}.bin',
                                                                      '/runs/a/train_latest_state')
        assert cfg.sources['model_file'] == cfg.sources['train_state_dir'] == 'from --output_dir'
        assert '<- from --output_dir' in cfg.describe()
    # what is given stays as given; without --output_dir the defaults and presets are unchanged
    cfg = resolve_config(overrides={'output_dir': '/runs/a', 'model_file': '/w/m.{}.bin'})
    assert (cfg.train.model_file, cfg.train.train_state_dir) == ('/w/m.{}.bin', '/runs/a/train_latest_state')
    cfg = resolve_config(overrides={'output_dir': '/runs/a', 'train_state_dir': '/s'})
    assert (cfg.train.model_file, cfg.train.train_state_dir) == ('/runs/a/chat_small_t5.{}.bin', '/s')
    assert resolve_config(preset='demo').train.model_file == PRESETS['demo']['model_file']
    assert resolve_config(overrides={'train_state_dir': '/s'}).train.model_file == TrainConfigPretrainLarge().model_file
    # braces in the folder are the folder's: the step files land in it, literally
    t = resolve_config(overrides={'output_dir': '/runs/v{2}'}).train
    assert t.model_file.format(3) == '/runs/v{2}/chat_small_t5.3.bin' and t.train_state_dir == '/runs/v{2}/train_latest_state'


@pytest.mark.parametrize('pattern,needle', [
    ('/a/{}/m.bin', r"needs its '\{\}' \(the step\) in the file name"),
    ('/a/m{{}}.bin', 'exactly once'), ('/a/{{x}}.bin', 'exactly once'), ('/a/m.{}.{}', 'exactly once'), ('/a/m.{x}', 'cannot be formatted'),
    ('/a/m.{', 'cannot be formatted'), ('/a/m.{!r}.bin', 'takes no conversion or format'),
    ('/a/m.{:>3}.bin', 'takes no conversion or format'), ('/a/m.{0!s}.bin', 'takes no conversion or format'),
    ('/a/{}', r"must hold more than the step \(its 'best' would be output_dir/best's name\)"),
])
def test_a_model_file_without_its_step_in_the_file_name_is_refused(pattern, needle):
    with pytest.raises(UserError, match=needle):
        resolve_config(overrides={'model_file': pattern})


@pytest.mark.parametrize('pattern', ['/a/q{{}}/m.{}.bin', '/a/q/m{{}}.{}.bin', '/a/q/m.{}.{{}}', '/a/{{x}}/m{{y}}.{}'])
def test_literal_braces_beside_the_step_are_accepted(pattern):
    assert resolve_config(overrides={'model_file': pattern}).train.model_file == pattern
    t = resolve_config(overrides={'output_dir': '/tmp/x/{}'}).train  # a folder named '{}'
    assert t.model_file.format(7) == '/tmp/x/{}/chat_small_t5.7.bin'


def test_a_model_file_pattern_is_taken_apart_with_its_literal_braces():
    from model.state.model_files import join_model_file, model_file_pattern, model_folder, split_model_file

    for pattern, parts in [('/r/v{{2}}/m{{a}}.{}.bin', ('/r/v{2}', 'm{a}.', '.bin')),
                           ('m.{}', ('.', 'm.', '')), ('/r/{}.bin', ('/r', '', '.bin'))]:
        assert split_model_file(pattern) == parts and model_folder(pattern) == parts[0]
        assert split_model_file(join_model_file(*parts)) == parts
        assert model_file_pattern(pattern).match(parts[1] + '12' + parts[2]).group(1) == '12'
    assert not model_file_pattern('/r/m{{a}}.{}.bin').match('m{{a}}.12.bin')  # the literal name only


def test_warmup_steps_given_beat_a_presets_warmup_ratio():
    # the demo preset warms up by a ratio, which would replace the steps: the flag given wins, said so
    cfg = resolve_config(preset='demo', overrides={'warmup_steps': 3})
    assert (cfg.train.warmup_steps, cfg.train.warmup_ratio) == (3, 0.0)
    assert cfg.sources['warmup_ratio'] == 'set to 0 by --warmup_steps'
    cfg = resolve_config(preset='demo', overrides={'warmup_steps': 3, 'warmup_ratio': 0.1})  # both given: the ratio's rule
    assert (cfg.train.warmup_steps, cfg.train.warmup_ratio) == (3, 0.1)
    assert resolve_config(preset='demo').train.warmup_ratio == 0.33


@pytest.mark.parametrize('test_file', ['/d/valid.parquet', '/d/验证 集*.parquet', '/d/a.b-c.parquet', '/d/***', '/d/x/'])
def test_the_predictions_of_any_test_file_are_found_by_their_models_name(test_file):
    # one naming rule: where `test` writes them, and what a fresh run moves with the earlier run's models
    import re

    from model.state.model_files import PREDICTIONS_TAIL, model_file_pattern, predictions_path

    for model in ('/r/m{{x}}.12.bin', '/r/m{{x}}.best.bin'):
        name = os.path.basename(predictions_path(model.replace('{{', '{').replace('}}', '}'), test_file))
        assert model_file_pattern('/r/m{{x}}.{}.bin', r'\d+|best', PREDICTIONS_TAIL).match(name), name
    assert re.match(r'^(best|final)' + PREDICTIONS_TAIL + '$', os.path.basename(predictions_path('/o/best', test_file)))


def test_a_flag_that_has_no_effect_with_the_other_settings_is_said():
    # given for the other objective, the other optimizer, or beside what replaces it: one note each, with why
    span = {'objective': 'span_corruption'}
    notes = resolve_config(overrides={**span, 'packing': True, 'bleu_samples': 8, 'eval_max_new_tokens': 20,
                                      'length_group_batches': 8}).unused_flags()
    assert [n.split(' has no effect')[0] for n in notes] == [
        '--packing=True', '--length_group_batches=8', '--bleu_samples=8', '--eval_max_new_tokens=20']
    assert 'lays documents end to end' in notes[0] and 'denoising loss' in notes[2] and notes[0].endswith('leave it out')
    pairs = resolve_config(overrides={'noise_density': 0.3, 'mean_noise_span_length': 5}).unused_flags()
    assert len(pairs) == 2 and all('--objective=span_corruption' in n for n in pairs)
    assert resolve_config(overrides={'optimizer': 'adamw', 'adafactor_scale_parameter': True}).unused_flags()
    assert resolve_config(overrides={'warmup_steps': 100, 'warmup_ratio': 0.1}).unused_flags()[0].startswith(
        '--warmup_steps=100 has no effect on this run: a --warmup_ratio above 0 replaces it')
    assert resolve_config(overrides={'group_by_length': False, 'length_group_batches': 8}).unused_flags()
    assert resolve_config(overrides={'bleu_samples': 0, 'show_samples': 0, 'eval_max_new_tokens': 9}).unused_flags()
    # under span corruption the reason is span corruption's, whatever the pairs settings beside them
    notes = resolve_config(overrides={**span, 'group_by_length': True, 'length_group_batches': 8, 'bleu_samples': 4,
                                      'eval_max_new_tokens': 10}).unused_flags()
    assert len(notes) == 4 and not [n for n in notes if 'sizes the windows' in n or 'caps the answers' in n], notes
    # --allow_data_change acts on a resume only
    given = resolve_config(overrides={'allow_data_change': True})
    assert given.unused_flags(resume=False)[0].startswith('--allow_data_change=True has no effect on this run')
    assert given.unused_flags(resume=True) == given.unused_flags() == []
    # where they act, from a preset, or turning off what the run does not do anyway: nothing said
    for overrides in ({'packing': True, 'bleu_samples': 8, 'length_group_batches': 8},
                      {**span, 'noise_density': 0.3, 'mean_noise_span_length': 5},
                      {**span, 'packing': False, 'group_by_length': False, 'bleu_samples': 0, 'show_samples': 0},
                      {'optimizer': 'adamw', 'adafactor_scale_parameter': False},
                      {'warmup_steps': 100}, {'warmup_steps': 100, 'warmup_ratio': 0.0}):
        assert resolve_config(overrides=overrides).unused_flags() == [], overrides
    assert resolve_config(preset='demo', overrides=span).unused_flags() == []  # the preset's pairs settings
    # --warmup_steps over a preset's warmup_ratio sets that to 0: the steps given are used
    assert resolve_config(preset='demo', overrides={'warmup_steps': 50}).unused_flags() == []
