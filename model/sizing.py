"""Sizes from the config alone (no torch): parameters, state bytes, optimizer steps, shape."""

from __future__ import annotations

import dataclasses

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


def state_bytes(parameters: int, optimizer: str) -> int:
    """About what one saved training state takes on disk (fp32 weights and optimizer state)."""
    # AdamW keeps two fp32 moments per weight; Adafactor a factored second moment (rows +
    # columns of each matrix), a few percent of the weights for T5's shapes
    optimizer_share = 2.0 if optimizer == 'adamw' else 0.05
    return int(4 * parameters * (1 + optimizer_share))


def model_shape(m: T5ModelConfig, vocab_size: int) -> dict:
    """What must match for saved weights to load (dropout may change on resume)."""
    shape = dataclasses.asdict(m)
    shape.pop('dropout_rate')
    shape['vocab_size'] = vocab_size
    return shape


def total_optimizer_steps(rows: int, batch_size: int, processes: int, accumulation: int, epochs: int,
                          max_steps: int = 0) -> int:
    """rows / (batch x processes x accumulation) x epochs, or max_steps when that is sooner."""
    steps = rows // (batch_size * processes * accumulation) * epochs
    return min(steps, max_steps) if max_steps else steps


def human_bytes(n: float) -> str:
    for unit in ('B', 'KB', 'MB', 'GB'):
        if abs(n) < 1000:
            return f'{n:.0f} {unit}' if unit == 'B' else f'{n:.1f} {unit}'
        n /= 1000
    return f'{n:.1f} TB'
