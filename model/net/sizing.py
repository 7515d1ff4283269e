"""Sizes from the config alone (no torch): parameters, state bytes, optimizer steps, shape."""

from __future__ import annotations

import dataclasses
import math

from config import T5ModelConfig


def t5_parameter_count(m: T5ModelConfig, vocab_size: int) -> int:
    """Parameters of transformers' T5ForConditionalGeneration of this shape (no biases;
    relative position bias in the first block of each stack; RMS norms)."""
    inner = m.num_heads * m.d_kv
    attention = 4 * m.d_model * inner  # q, k, v, o
    ff = (3 if m.feed_forward_proj.startswith('gated') else 2) * m.d_model * m.d_ff
    bias = m.relative_attention_num_buckets * m.num_heads
    encoder = m.num_layers * (attention + ff + 2 * m.d_model) + bias + m.d_model
    decoder = m.num_decoder_layers * (2 * attention + ff + 3 * m.d_model) + bias + m.d_model
    embeddings = vocab_size * m.d_model  # transformers 5 ties T5's lm_head to it always
    return embeddings + encoder + decoder


def aux_parameter_count(m: T5ModelConfig, vocab_size: int) -> int:
    """The weights outside the layers' matrices (embedding, layer norms, relative position biases):
    what --aux_learn_rate trains with Adam (model/net/chat_model.layer_matrices holds the rest)."""
    enc, dec = layer_parameters(m)
    return t5_parameter_count(m, vocab_size) - enc * m.num_layers - dec * m.num_decoder_layers


def state_bytes(parameters: int, optimizer: str, aux_parameters: int = 0) -> int:
    """About what one saved training state takes on disk (fp32 weights and optimizer state);
    aux_parameters: the weights an --aux_learn_rate run gives Adam's two moments."""
    # AdamW keeps two fp32 moments per weight; Adafactor a factored second moment (rows +
    # columns of each matrix), a few percent of the weights for T5's shapes
    optimizer_share = 2.0 if optimizer == 'adamw' else 0.05
    adam = 0 if optimizer == 'adamw' else 8 * aux_parameters
    return int(4 * parameters * (1 + optimizer_share)) + adam


# what must match for saved weights to be the same function: every field of the model's shape
# but dropout (which may change on resume), and the vocabulary's size -- the one list of it
SHAPE_FIELDS = tuple(f.name for f in dataclasses.fields(T5ModelConfig) if f.name != 'dropout_rate') + ('vocab_size',)


def model_shape(m: T5ModelConfig, vocab_size: int) -> dict:
    """The model's shape (SHAPE_FIELDS) as a run's fingerprint and a weights file record it."""
    shape = dataclasses.asdict(m)
    shape.pop('dropout_rate')
    shape['vocab_size'] = vocab_size
    return shape


def with_shape_defaults(shape: dict) -> dict:
    """A recorded shape with each model field it lacks at its default: a state saved before a field
    existed (tie_word_embeddings came later) was built as that default. The vocabulary has none."""
    defaults = {f.name: f.default for f in dataclasses.fields(T5ModelConfig) if f.name in SHAPE_FIELDS}
    return {**defaults, **{k: v for k, v in shape.items() if v is not None}}


def shape_differences(recorded: dict | None, current: dict) -> dict:
    """{field: (recorded, current)} for each shape field the two give otherwise: one rule for a warm
    start and a resume. A field the record lacks (written before the field existed) is at its
    default (with_shape_defaults); no record at all (None: a file that keeps none) knows no field."""
    if recorded is None:
        return {}
    was = with_shape_defaults(recorded)
    return {k: (was.get(k), v) for k, v in current.items() if k in SHAPE_FIELDS and was.get(k) != v}


def shape_of_t5_config(spec: dict) -> dict:
    """The shape (SHAPE_FIELDS) a model folder's config.json describes: the inverse of
    chat_model.build_t5_config. transformers 5 keeps T5's output scaling, which this toolkit's
    tie_word_embeddings sets, as scale_decoder_outputs (and writes tie_word_embeddings true
    whatever it was); a config.json from transformers 4 has only tie_word_embeddings."""
    shape = {k: spec.get(k) for k in SHAPE_FIELDS}
    scaled = spec.get('scale_decoder_outputs', spec.get('tie_word_embeddings', True))
    shape['tie_word_embeddings'] = scaled is not False
    return shape


def shape_fix_flags(differences: dict) -> str:
    """The flags that give a run the wanted shape, from {field: (wanted, current)}: '--d_model=64
    --d_ff=256'; the vocabulary is the tokenizer's, not a flag, and is said in words."""
    flags = ' '.join(f'--{k}={want}' for k, (want, _) in differences.items() if k != 'vocab_size' and want is not None)
    vocab = 'the tokenizer it was trained with (--tokenizer_dir)' if 'vocab_size' in differences else ''
    return ' and '.join(x for x in (flags, vocab) if x)


def total_optimizer_steps(rows: int, batch_size: int, processes: int, accumulation: int, epochs: int,
                          max_steps: int = 0) -> int:
    """rows / (batch x processes x accumulation) x epochs, or max_steps when that is sooner."""
    steps = rows // (batch_size * processes * accumulation) * epochs
    return min(steps, max_steps) if max_steps else steps


def warmup_steps_of(warmup_steps: int, warmup_ratio: float, total_steps: int) -> int:
    """Optimizer steps of linear warmup: warmup_ratio of the run's steps, rounded up (as transformers'
    TrainingArguments.warmup_ratio), when it is > 0; else warmup_steps."""
    return math.ceil(warmup_ratio * total_steps) if warmup_ratio > 0 else warmup_steps


def human_bytes(n: float) -> str:
    for unit in ('B', 'KB', 'MB', 'GB'):
        if abs(n) < 1000:
            return f'{n:.0f} {unit}' if unit == 'B' else f'{n:.1f} {unit}'
        n /= 1000
    return f'{n:.1f} TB'


# --------------------------------------------------------------------------- compute and memory


def layer_parameters(m: T5ModelConfig) -> tuple[int, int]:
    """(parameters of one encoder block, of one decoder block), matrices only."""
    inner = m.num_heads * m.d_kv
    ff = (3 if m.feed_forward_proj.startswith('gated') else 2) * m.d_model * m.d_ff
    return 4 * m.d_model * inner + ff, 8 * m.d_model * inner + ff


def flops_per_row(m: T5ModelConfig, vocab_size: int, prompt_tokens: float, response_tokens: float) -> float:
    """Training FLOPs of one row: 3 x the forward (forward + backward), counting every matmul:
    2 x parameters x tokens for the blocks and the output layer, plus the attention scores and
    their weighting (4 x d x tokens x attended tokens per layer: encoder self, decoder self and
    cross attention). Embedding lookups and norms are left out."""
    enc, dec = layer_parameters(m)
    te, td, inner = prompt_tokens, response_tokens, m.num_heads * m.d_kv
    forward = (2 * enc * m.num_layers * te + 2 * dec * m.num_decoder_layers * td + 2 * vocab_size * m.d_model * td
               + 4 * inner * te * te * m.num_layers
               + 4 * inner * (td * td + td * te) * m.num_decoder_layers)
    return 3 * forward


def optimizer_bytes(m: T5ModelConfig, vocab_size: int, optimizer: str, aux: bool = False) -> int:
    """fp32 optimizer state: AdamW two moments per weight; Adafactor a factored second moment
    (rows + columns of each matrix) for matrices; aux (--aux_learn_rate): Adam's two moments for
    the embedding, norms and position biases instead."""
    params = t5_parameter_count(m, vocab_size)
    if optimizer == 'adamw':
        return 8 * params
    inner = m.num_heads * m.d_kv
    per_enc = 4 * (m.d_model + inner) + 2 * (m.d_model + m.d_ff)
    per_dec = 8 * (m.d_model + inner) + 2 * (m.d_model + m.d_ff)
    if aux:
        rest = 2 * aux_parameter_count(m, vocab_size)
    else:  # the embedding and both position biases factored; the norms' scales whole
        norms = m.d_model * (2 * m.num_layers + 3 * m.num_decoder_layers + 2)
        rest = vocab_size + m.d_model + 2 * (m.relative_attention_num_buckets + m.num_heads) + norms
    return 4 * (per_enc * m.num_layers + per_dec * m.num_decoder_layers + rest)


def activation_bytes(m: T5ModelConfig, vocab_size: int, batch: int, prompt_len: int, response_len: int,
                     checkpointing: bool, bytes_per_value: int = 2) -> int:
    """Activations kept for the backward pass of one micro-batch (16-bit values, as under bf16
    autocast), after Korthikanti et al.'s count for a transformer layer: s b d (34 + 5 a s / d)
    bytes, with cross attention for the decoder, plus the fp32 logits and their gradient. With
    gradient checkpointing each block keeps only its input and one block's activations are
    rebuilt at a time."""
    d, a = m.d_model, m.num_heads
    scale = bytes_per_value / 2

    def enc_layer():
        return prompt_len * batch * d * (34 + 5 * a * prompt_len / d) * scale

    def dec_layer():
        return response_len * batch * d * (34 + 16 + 5 * a * (response_len + prompt_len) / d) * scale

    logits = batch * response_len * vocab_size * (bytes_per_value + 4 + 4)  # 16-bit logits, fp32 copy and grad
    if checkpointing:
        kept = (m.num_layers * prompt_len + m.num_decoder_layers * response_len) * batch * d * bytes_per_value
        return int(kept + max(enc_layer(), dec_layer()) + logits)
    return int(m.num_layers * enc_layer() + m.num_decoder_layers * dec_layer() + logits)


def gpu_memory_bytes(m: T5ModelConfig, vocab_size: int, optimizer: str, batch: int, prompt_len: int,
                     response_len: int, checkpointing: bool, aux: bool = False) -> dict[str, int]:
    """Peak GPU memory of one DDP process, by part: fp32 weights, fp32 gradients, optimizer
    state, activations of one micro-batch, and ~1 GB for the CUDA context and allocator slack."""
    params = t5_parameter_count(m, vocab_size)
    parts = {'weights': 4 * params, 'gradients': 4 * params,
             'optimizer': optimizer_bytes(m, vocab_size, optimizer, aux),
             'activations': activation_bytes(m, vocab_size, batch, prompt_len, response_len, checkpointing),
             'cuda context': 1 << 30}
    parts['total'] = sum(parts.values())
    return parts


GPU_BF16_TFLOPS = {'H200': 989, 'H100': 989, 'A100': 312, 'L40S': 362, 'RTX 4090': 165}  # dense bf16 peak


def human_seconds(s: float) -> str:
    if s < 0.1:
        return '< 0.1 s'
    if s < 10:
        return f'{s:.1f} s'
    if s < 120:
        return f'{s:.0f} s'
    if s < 2 * 3600:
        return f'{s / 60:.0f} min'
    return f'{s / 3600:.1f} h'
