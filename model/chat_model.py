"""Build chat_small_t5 (a transformers T5ForConditionalGeneration) and answer prompts."""

from __future__ import annotations

import dataclasses
import json
import logging
import os

import torch

from config import ResolvedConfig, T5ModelConfig, UserError
from model import ownership
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


@torch.no_grad()
def answer(model, tokenizer, prompts: list[str], max_new_tokens: int = 64,
           max_seq_len: int | None = None, batch_tokens: int = 1 << 16) -> list[str]:
    """Greedy answers, in the prompts' order. Prompts are cut to max_seq_len tokens (what the
    model was trained on) and batched so that a batch holds at most ~batch_tokens positions:
    memory stays bounded whatever the prompts' length or number."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    per_row = (max_seq_len or 512) + max_new_tokens
    batch_size = max(1, min(64, batch_tokens // per_row))
    out: list[str] = []
    for i in range(0, len(prompts), batch_size):
        enc = tokenizer(prompts[i:i + batch_size], padding=True, truncation=True,
                        max_length=max_seq_len or 512, return_tensors='pt')
        gen = model.generate(input_ids=enc['input_ids'].to(device),
                             attention_mask=enc['attention_mask'].to(device),
                             max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
        out.extend(tokenizer.batch_decode(gen, skip_special_tokens=True))
    model.train(was_training)
    return out


def load_trained(cfg: ResolvedConfig, model_dir: str | None = None):
    """(model, tokenizer, folder, max_seq_len) from model_dir, else output_dir/best, else
    output_dir/final. max_seq_len is what the model was trained on (from its marker)."""
    from transformers import T5ForConditionalGeneration

    candidates = [model_dir] if model_dir else [os.path.join(cfg.train.output_dir, 'best'),
                                                os.path.join(cfg.train.output_dir, 'final')]
    for d in candidates:
        if check_model_folder(d, explicit=bool(model_dir)):
            tok = load_tokenizer(d)
            info = ownership.read_marker(d) or {}
            return (T5ForConditionalGeneration.from_pretrained(d), tok, d,
                    int(info.get('max_seq_len') or cfg.train.max_seq_len))
    preset = f' --preset={cfg.preset}' if cfg.preset else ''
    raise UserError(f'no trained model in {" or ".join(candidates)}; '
                    f'train one with: python train_low_mem.py train{preset}')


def check_model_folder(folder: str, explicit: bool) -> bool:
    """True for a Hugging Face T5 folder with its tokenizer; False if absent (when the folder
    was not named by the user); a UserError that says what the folder is otherwise."""
    if not os.path.isdir(folder):
        if explicit:
            raise UserError(f'--model_dir={folder}: no such folder')
        return False
    kind = ownership.folder_kind(folder)
    parent_kind = ownership.folder_kind(os.path.dirname(os.path.abspath(folder).rstrip(os.sep)))
    where = 'output_dir/best or output_dir/final'
    if kind in (ownership.STATE_DIR, ownership.STATE) or parent_kind == ownership.STATE_DIR:
        raise UserError(f'{folder} is a training state (for --is_keep_training), not a model folder; '
                        f'give a model folder such as {where}')
    if kind == ownership.TOKENIZER:
        raise UserError(f'{folder} is a tokenizer folder, not a model; give a model folder such as {where}')
    config = os.path.join(folder, 'config.json')
    weights = [n for n in ('model.safetensors', 'pytorch_model.bin') if os.path.isfile(os.path.join(folder, n))]
    if not os.path.isfile(config) or not weights:
        raise UserError(f'{folder} is not a model folder (it needs config.json and model.safetensors, as '
                        f'train writes to {where})')
    try:
        with open(config, encoding='utf-8') as f:
            model_type = json.load(f).get('model_type')
    except (OSError, ValueError) as e:
        raise UserError(f'{config}: unreadable ({e})') from None
    if model_type != 't5':
        raise UserError(f'{folder} holds a {model_type!r} model; this toolkit answers with T5 models')
    if not os.path.isfile(os.path.join(folder, 'tokenizer.json')):
        raise UserError(f'{folder} has no tokenizer.json: models written by train carry their tokenizer')
    return True
