"""The guide's resource tables, computed for the resolved config (printed by the dry run).

Token lengths come from a sample of the user's own rows; FLOPs, memory and time from
model/net/sizing.py. The time per epoch uses a measured rate when given (``--rows_per_s``, from
bench/bench_gpu.py on the user's GPU), else the FLOPs at an assumed 40% of a GPU's peak.
No torch: the tokenizer is the Rust one, read from tokenizer.json.
"""

from __future__ import annotations

import os

import numpy as np

from model.data.files import PAIR_COLUMNS, iter_usable_rows
from model.net.sizing import GPU_BF16_TFLOPS, flops_per_row, gpu_memory_bytes, human_bytes, human_seconds

ASSUMED_MFU = 0.40
SAMPLE_ROWS = 2000


def sample_token_lengths(files, tokenizer_dir: str, max_seq_len: int, rows: int = SAMPLE_ROWS) -> tuple[float, float]:
    """Mean (prompt, response) tokens of the first usable rows, eos included, cut at max_seq_len."""
    from tokenizers import Tokenizer

    from model.data.tokenizer import cut_texts, text_cut_chars

    tok = Tokenizer.from_file(os.path.join(tokenizer_dir, 'tokenizer.json'))
    tok.no_padding()
    tok.enable_truncation(max_seq_len)
    cut = text_cut_chars(tok, max_seq_len)
    pairs = list(iter_usable_rows(files, rows))
    lengths = [[len(e.ids) for e in tok.encode_batch_fast(cut_texts([p[i] for p in pairs], cut))]
               for i in range(len(PAIR_COLUMNS))]
    return float(np.mean(lengths[0])), float(np.mean(lengths[1]))


def resource_lines(cfg, rows: int, vocab_size: int, world: int, files, rows_per_s: float = 0.0) -> list[str]:
    t, m = cfg.train, cfg.model
    if t.objective == 'span_corruption':  # rows are examples: a full input and its target
        from model.data.span_corruption import lengths_for

        prompt, response = t.max_seq_len, lengths_for(t.max_seq_len, t.noise_density, t.mean_noise_span_length)[1]
    else:
        prompt, response = sample_token_lengths(files, t.tokenizer_dir, t.max_seq_len)
    flops = flops_per_row(m, vocab_size, prompt, response)
    where = (f'mean {prompt:.0f} prompt + {response:.0f} response tokens over the first {SAMPLE_ROWS} rows'
             if t.objective == 'pairs' else f'a span-corruption example: {prompt} input + {response} target tokens')
    lines = ['[resources] estimates for this config (measure on your GPU: python bench/bench_gpu.py)',
             f'  training FLOPs per {"row" if t.objective == "pairs" else "example"}: {flops / 1e9:.1f} G ({where}; '
             f'3 x the forward matmuls, sizing.flops_per_row)']
    for checkpointing in (False, True):
        parts = gpu_memory_bytes(m, vocab_size, t.optimizer, t.batch_size_per_gpu, t.max_seq_len, t.max_seq_len,
                                 checkpointing, aux=bool(t.aux_learn_rate))
        shown = ', '.join(f'{k} {human_bytes(v)}' for k, v in parts.items() if k != 'total')
        tag = 'with --gradient_checkpointing=True' if checkpointing else 'GPU memory per process'
        lines.append(f'  {tag}: {human_bytes(parts["total"])} at batch {t.batch_size_per_gpu} x {t.max_seq_len} '
                     f'tokens ({shown})')
    epoch_rows = rows - rows % (t.batch_size_per_gpu * world * t.gradient_accumulation_steps)
    if rows_per_s:
        seconds = epoch_rows / (rows_per_s * world)
        lines.append(f'  time per epoch: {human_seconds(seconds)} on {world} GPU(s) at the measured '
                     f'{rows_per_s:,.0f} rows/s each')
    else:
        times = ', '.join(f'{gpu} {human_seconds(epoch_rows * flops / (world * tflops * 1e12 * ASSUMED_MFU))}'
                          for gpu, tflops in GPU_BF16_TFLOPS.items())
        unit = 'rows' if t.objective == 'pairs' else 'examples'
        lines.append(f'  time per epoch of {epoch_rows:,} {unit} on {world} GPU(s) at {ASSUMED_MFU:.0%} of the bf16 '
                     f'peak: {times} (give --rows_per_s=<bench_gpu.py rows/s> for a measured figure)')
    return lines
