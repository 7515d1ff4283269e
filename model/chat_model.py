"""Build chat_small_t5 (a transformers T5ForConditionalGeneration) and answer prompts."""

from __future__ import annotations

import dataclasses
import logging
import os

import torch

from config import ResolvedConfig, T5ModelConfig, UserError
from model.tokenizer import EOS_ID, PAD_ID, load_tokenizer

logger = logging.getLogger(__name__)


def build_t5_config(model_cfg: T5ModelConfig, vocab_size: int):
    from transformers import T5Config

    return T5Config(vocab_size=vocab_size, pad_token_id=PAD_ID, eos_token_id=EOS_ID,
                    decoder_start_token_id=PAD_ID, is_encoder_decoder=True,
                    **dataclasses.asdict(model_cfg))


def build_model(model_cfg: T5ModelConfig, vocab_size: int):
    from transformers import T5ForConditionalGeneration

    model = T5ForConditionalGeneration(build_t5_config(model_cfg, vocab_size))
    n = sum(p.numel() for p in model.parameters())
    logger.info('chat_small_t5: %.2fM parameters (vocab %d, d_model %d, %d+%d layers)', n / 1e6,
                vocab_size, model_cfg.d_model, model_cfg.num_layers, model_cfg.num_decoder_layers)
    return model


def model_shape(model_cfg: T5ModelConfig, vocab_size: int) -> dict:
    """What must match for saved weights to load (dropout may change on resume)."""
    shape = dataclasses.asdict(model_cfg)
    shape.pop('dropout_rate')
    shape['vocab_size'] = vocab_size
    return shape


@torch.no_grad()
def answer(model, tokenizer, prompts: list[str], max_new_tokens: int = 64,
           max_seq_len: int | None = None, batch_size: int = 32) -> list[str]:
    """Greedy answers, in the prompts' order."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out: list[str] = []
    for i in range(0, len(prompts), batch_size):
        enc = tokenizer(prompts[i:i + batch_size], padding=True, truncation=max_seq_len is not None,
                        max_length=max_seq_len, return_tensors='pt')
        gen = model.generate(input_ids=enc['input_ids'].to(device),
                             attention_mask=enc['attention_mask'].to(device),
                             max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
        out.extend(tokenizer.batch_decode(gen, skip_special_tokens=True))
    model.train(was_training)
    return out


def load_trained(cfg: ResolvedConfig, model_dir: str | None = None):
    """(model, tokenizer, folder) from output_dir/best, else output_dir/final."""
    from transformers import T5ForConditionalGeneration

    candidates = [model_dir] if model_dir else [os.path.join(cfg.train.output_dir, 'best'),
                                                os.path.join(cfg.train.output_dir, 'final')]
    for d in candidates:
        if d and os.path.isfile(os.path.join(d, 'config.json')):
            tok = load_tokenizer(d)
            return T5ForConditionalGeneration.from_pretrained(d), tok, d
    preset = f' --preset={cfg.preset}' if cfg.preset else ''
    raise UserError(f'no trained model in {" or ".join(candidates)}; '
                    f'train one with: python train_low_mem.py train{preset}')
