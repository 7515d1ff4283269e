"""Train a sentencepiece unigram model and serve it as a lossless HF fast tokenizer.

Why not the usual ``T5Tokenizer.from_pretrained(dir)`` conversion: with
sentencepiece's default NFKC rules ``，！（）`` become ``,!()``, and the
conversion drops byte fallback and turns newlines into spaces (measured: 11%
of real validation texts came back changed). Here the normalizer is identity,
``\\n`` is a piece of its own, rare characters fall back to UTF-8 bytes, and
the fast tokenizer is assembled directly from the trained pieces and scores.
"""

from __future__ import annotations

import io
import logging
import os
import re
import shutil
import tempfile

import numpy as np

from config import UserError
from model.files import TEXT_COLUMNS, inspect_parquet, iter_text_tables, resolve_parquet_files

logger = logging.getLogger(__name__)

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
SPM_FILE = 'sentencepiece.model'  # kept for reference; loading uses tokenizer.json


def iter_training_texts(files: list[str], max_rows: int, seed: int = 42):
    """Prompt and response strings streamed from Parquet, sampling at most ~max_rows rows."""
    total = sum(inspect_parquet(f).num_rows for f in files)
    keep = 1.0 if total <= max_rows else max_rows / total
    rng = np.random.default_rng(seed)
    for table in iter_text_tables(files):
        if keep < 1.0:
            table = table.filter(rng.random(table.num_rows) < keep)
        for pair in zip(*(table.column(c).to_pylist() for c in TEXT_COLUMNS)):
            for text in pair:
                if text and text.strip():
                    yield text


def train_tokenizer(train_file, tokenizer_dir: str, vocab_size: int = 32000,
                    max_rows: int = 2_000_000, character_coverage: float = 0.9995,
                    seed: int = 42, num_threads: int | None = None):
    """Train on the Parquet text and write a folder AutoTokenizer loads offline."""
    import sentencepiece as spm

    files = resolve_parquet_files(train_file)
    texts = iter_training_texts(files, max_rows=max_rows, seed=seed)
    model_buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=texts, model_writer=model_buf, vocab_size=vocab_size,
            model_type='unigram', character_coverage=character_coverage,
            byte_fallback=True, normalization_rule_name='identity',
            remove_extra_whitespaces=False, split_digits=True, user_defined_symbols=['\n'],
            pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=-1,
            pad_piece='<pad>', eos_piece='</s>', unk_piece='<unk>',
            input_sentence_size=2 * max_rows, shuffle_input_sentence=True,
            max_sentence_length=1 << 16, num_threads=num_threads or os.cpu_count() or 1,
            minloglevel=2, seed_sentencepiece_size=1_000_000, train_extremely_large_corpus=False)
    except RuntimeError as e:
        raise _explain_spm_error(e, vocab_size) from None
    if model_buf.tell() == 0:
        raise UserError(f'{train_file}: no non-empty prompt/response text to train a tokenizer on')
    save_tokenizer(model_buf.getvalue(), tokenizer_dir)
    tok = load_tokenizer(tokenizer_dir)
    logger.info('tokenizer with %d pieces written to %s', len(tok), tokenizer_dir)
    return tok


def _explain_spm_error(e: RuntimeError, vocab_size: int) -> Exception:
    msg = str(e)
    m = re.search(r'Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)', msg)
    if m:
        need = int(m.group(2)) + 1
        return UserError(f'vocab_size={vocab_size} is too small: the text keeps {m.group(2)} '
                         f'distinct characters (character_coverage); use --vocab_size={need} or more '
                         f'(or lower --character_coverage)')
    m = re.search(r'Vocabulary size too high \((\d+)\)', msg)
    if m:
        return UserError(f'vocab_size={vocab_size} is larger than this text supports; '
                         f'use a smaller --vocab_size (sentencepiece: {msg.splitlines()[-1].strip()})')
    return UserError(f'sentencepiece failed: {msg.strip().splitlines()[-1]}')


def build_fast_tokenizer(spm_model: bytes):
    """tokenizers.Tokenizer equal to the sentencepiece model, byte fallback included."""
    import sentencepiece as spm
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    sp = spm.SentencePieceProcessor(model_proto=spm_model)
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    assert vocab[PAD_ID][0] == '<pad>' and vocab[EOS_ID][0] == '</s>' and vocab[UNK_ID][0] == '<unk>'
    tk = Tokenizer(models.Unigram(vocab, unk_id=UNK_ID, byte_fallback=True))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement='▁', prepend_scheme='always', split=True)
    tk.decoder = decoders.Sequence([decoders.Replace('▁', ' '), decoders.ByteFallback(),
                                    decoders.Fuse(), decoders.Strip(' ', 1, 0)])
    tk.post_processor = processors.TemplateProcessing(
        single='$A </s>', pair='$A </s> $B </s>', special_tokens=[('</s>', EOS_ID)])
    return tk


def save_tokenizer(spm_model: bytes, tokenizer_dir: str) -> None:
    """Write the HF folder next to the raw model, atomically (tmp folder, then rename)."""
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=build_fast_tokenizer(spm_model),
                                 pad_token='<pad>', eos_token='</s>', unk_token='<unk>',
                                 model_max_length=1 << 30)
    target = os.path.abspath(tokenizer_dir)
    os.makedirs(os.path.dirname(target.rstrip(os.sep)) or '.', exist_ok=True)
    tmp = tempfile.mkdtemp(prefix='.tmp-tokenizer-', dir=os.path.dirname(target.rstrip(os.sep)))
    try:
        hf.save_pretrained(tmp)
        with open(os.path.join(tmp, SPM_FILE), 'wb') as f:
            f.write(spm_model)
        if os.path.isdir(target):
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_tokenizer(tokenizer_dir: str):
    """The fast tokenizer of a folder, checked (pad 0, eos 1, unk 2, real vocab)."""
    from transformers import AutoTokenizer

    if not os.path.isfile(os.path.join(tokenizer_dir, 'tokenizer.json')):
        raise UserError(f'{tokenizer_dir}: no tokenizer here; create it with: '
                        f'python train_low_mem.py train_tokenizer --tokenizer_dir={tokenizer_dir}')
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id)
    if ids != (PAD_ID, EOS_ID, UNK_ID) or len(tok) <= 259:
        raise UserError(f'{tokenizer_dir}: unexpected tokenizer (pad/eos/unk ids {ids}, '
                        f'{len(tok)} tokens); retrain it with train_low_mem.py train_tokenizer')
    return tok


def tokenizer_fingerprint(tokenizer_dir: str) -> str:
    import hashlib

    with open(os.path.join(tokenizer_dir, 'tokenizer.json'), 'rb') as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


