"""Train a sentencepiece unigram model and serve it as a lossless HF fast tokenizer.

Why not the usual ``T5Tokenizer.from_pretrained(dir)`` conversion: with
sentencepiece's default NFKC rules ``，！（）`` become ``,!()``, and the
conversion drops byte fallback and turns newlines into spaces (measured: 11%
of real validation texts came back changed). Here the normalizer is identity,
``\\n`` is a piece of its own, rare characters fall back to UTF-8 bytes, and
the fast tokenizer is assembled directly from the trained pieces and scores.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re

import numpy as np
import pyarrow as pa

from model.errors import UserError
from model.state import ownership, writes
from model.data.files import check_usable_rows, count_rows, iter_text_tables, resolve_parquet_files, usable_mask
from model.state.markers import TOKENIZER
from model.data.span_corruption import SENTINEL_COUNT, sentinel_token

logger = logging.getLogger(__name__)

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
LABEL_PAD_ID = -100  # label positions the loss ignores (padding)
SPM_FILE = 'sentencepiece.model'  # the trained model; the data loader's fast path encodes with it
SENTINELS = [sentinel_token(i) for i in range(SENTINEL_COUNT)]  # <extra_id_0> ... <extra_id_99>


def text_cut_chars(tokenizer, max_tokens: int) -> int:
    """Characters of a text that give the same first ``max_tokens`` tokens as the whole text.

    A token covers at most its piece's length in characters (identity normalizer, one '▁' per
    space, byte pieces less than one character), so a text cut at twice the longest piece per
    kept token still has at least 2 x max_tokens tokens, and the segmentation of the kept
    ones, settled within a few pieces, never sees the cut (tests/test_tokenizer.py checks it
    on the real validation texts). Why cut: the Rust tokenizer holds every offset of the whole text
    (a 100 MB prompt: gigabytes) before truncating."""
    rust = getattr(tokenizer, 'backend_tokenizer', tokenizer)
    longest = max((len(piece) for piece in rust.get_vocab()), default=1)
    return max_tokens * max(longest, 1) * 2


def cut_texts(texts: list, chars: int) -> list:
    """Each text at most ``chars`` characters (see :func:`text_cut_chars`); None stays."""
    return [t[:chars] if t is not None and len(t) > chars else t for t in texts]


def iter_training_texts(files: list[str], max_rows: int, seed: int = 42):
    """Prompt and response strings (or raw texts) streamed from Parquet, sampling at most ~max_rows rows."""
    total = count_rows(files)
    keep = 1.0 if total <= max_rows else max_rows / total
    rng = np.random.default_rng(seed)
    for table in iter_text_tables(files):
        chosen = usable_mask(table)
        if keep < 1.0:
            chosen &= rng.random(table.num_rows) < keep
        table = table.filter(pa.array(chosen))
        for row in zip(*(table.column(c).to_pylist() for c in table.column_names)):
            yield from row


def train_tokenizer(train_file, tokenizer_dir: str, vocab_size: int = 32000,
                    max_rows: int = 2_000_000, character_coverage: float = 0.9995,
                    seed: int = 42, num_threads: int | None = None):
    """Train on the Parquet text and write a folder AutoTokenizer loads offline."""
    import sentencepiece as spm

    files = check_tokenizer_inputs(train_file, tokenizer_dir)
    texts = _KeepError(iter_training_texts(files, max_rows=max_rows, seed=seed))
    model_buf = io.BytesIO()
    try:
        in_a_thread(lambda: spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts), model_writer=model_buf, vocab_size=vocab_size,
            model_type='unigram', character_coverage=character_coverage,
            byte_fallback=True, normalization_rule_name='identity',
            remove_extra_whitespaces=False, split_digits=True, user_defined_symbols=['\n'],
            pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=-1,
            pad_piece='<pad>', eos_piece='</s>', unk_piece='<unk>',
            input_sentence_size=max(2 * max_rows, 1000),  # sentencepiece takes no cap of 100 or less
            shuffle_input_sentence=True,
            max_sentence_length=1 << 16, num_threads=num_threads or os.cpu_count() or 1,
            minloglevel=2, seed_sentencepiece_size=1_000_000, train_extremely_large_corpus=False))
    except RuntimeError as e:
        texts.reraise()
        raise _explain_spm_error(e, vocab_size) from None
    texts.reraise()
    if model_buf.tell() == 0:
        raise UserError(f'{train_file}: no non-empty text to train a tokenizer on')
    save_tokenizer(model_buf.getvalue(), tokenizer_dir)
    tok = load_tokenizer(tokenizer_dir)
    logger.info('tokenizer with %d pieces written to %s', len(tok), tokenizer_dir)
    return tok


class _KeepError:
    """An iterator that keeps what it raised: sentencepiece turns an exception of its
    sentence iterator (a damaged file's one line, a stop signal) into a RuntimeError holding a
    traceback; the original is raised again after training returns."""

    def __init__(self, items):
        self.items, self.error = items, None

    def __iter__(self):
        try:
            yield from self.items
        except BaseException as e:  # noqa: BLE001 - kept and raised again by reraise()
            self.error = e
            raise

    def reraise(self) -> None:
        if self.error is not None:
            raise self.error.with_traceback(None) from None


def in_a_thread(fn):
    """fn() in a daemon thread while this one waits: sentencepiece trains for minutes in C++ with
    the GIL released, so SIGTERM / Ctrl-C still stop the process at once (nothing is written
    before the training ends) instead of after the training (model/stopping.py)."""
    import threading

    outcome = {}

    def run():
        try:
            outcome['value'] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            outcome['error'] = e

    worker = threading.Thread(target=run, name='sentencepiece', daemon=True)
    worker.start()
    worker.join()
    if 'error' in outcome:
        raise outcome['error']
    return outcome.get('value')


def check_tokenizer_inputs(train_file, tokenizer_dir: str) -> list[str]:
    """Everything train_tokenizer needs, checked before the work: usable text to read, and an
    output folder that is new, empty or a tokenizer this toolkit wrote (never an input)."""
    files = resolve_parquet_files(train_file)
    tokenizer_dir = ownership.resolve_place(tokenizer_dir, 'tokenizer_dir')  # a link: written where it points
    ownership.check_replaceable(tokenizer_dir, TOKENIZER, 'tokenizer_dir', folder=True)
    ownership.check_not_an_input(tokenizer_dir, files, 'tokenizer_dir', [train_file])
    ownership.check_writable(tokenizer_dir, 'tokenizer_dir')
    check_usable_rows(files, 'train_file', shown=train_file)
    return files


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
        limit = re.search(r'<= (\d+)', msg)
        if limit:  # sentencepiece's bound for this request (T5's sentinels come on top of vocab_size)
            most = int(limit.group(1))
            return UserError(f'vocab_size={vocab_size} is more than this text supports (sentencepiece allows at most '
                             f'{most} when asked for {vocab_size}); use --vocab_size={most}, or train on more text')
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
    """Write the HF folder with the raw model and the marker; it replaces an earlier tokenizer
    of this toolkit in one step (never a moment without a complete folder), nothing else."""
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=build_fast_tokenizer(spm_model),
                                 pad_token='<pad>', eos_token='</s>', unk_token='<unk>',
                                 # T5's sentinels, after the pieces: span corruption's masks
                                 additional_special_tokens=SENTINELS, model_max_length=1 << 30)
    with writes.building_folder(tokenizer_dir, TOKENIZER, 'tokenizer_dir') as tmp:
        hf.save_pretrained(tmp)
        with open(os.path.join(tmp, SPM_FILE), 'wb') as f:
            f.write(spm_model)
        ownership.write_marker(tmp, TOKENIZER, vocab_size=len(hf))


def save_tokenizer_copy(tokenizer, folder: str) -> None:
    """The tokenizer in use, written to a new folder (e.g. inside a training state)."""
    tokenizer.save_pretrained(folder)
    src = os.path.join(getattr(tokenizer, 'name_or_path', '') or '', SPM_FILE)
    if os.path.isfile(src):
        with open(src, 'rb') as f, open(os.path.join(folder, SPM_FILE), 'wb') as g:
            g.write(f.read())
    ownership.write_marker(folder, TOKENIZER, vocab_size=len(tokenizer))


def load_tokenizer(tokenizer_dir: str):
    """The fast tokenizer of a folder, checked (pad 0, eos 1, unk 2, real vocab)."""
    from transformers import AutoTokenizer

    check_tokenizer_folder(tokenizer_dir)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id)
    if ids != (PAD_ID, EOS_ID, UNK_ID) or len(tok) <= 259:
        raise UserError(f'{tokenizer_dir}: unexpected tokenizer (pad/eos/unk ids {ids}, '
                        f'{len(tok)} tokens); retrain it with train_low_mem.py train_tokenizer')
    return tok


def check_tokenizer_folder(tokenizer_dir: str) -> int:
    """UserError unless the folder holds a loadable tokenizer.json with pad 0, eos 1, unk 2 and
    more than the byte pieces; returns its vocabulary size. Fast: no transformers import."""
    from tokenizers import Tokenizer

    path = os.path.join(tokenizer_dir, 'tokenizer.json')
    if not os.path.isfile(path):
        kind = ownership.folder_kind(tokenizer_dir)
        if kind and kind != TOKENIZER:
            raise UserError(f'{tokenizer_dir}: a {kind} folder, not a tokenizer; '
                            f'point --tokenizer_dir at a tokenizer folder')
        if os.path.isdir(tokenizer_dir) and os.listdir(tokenizer_dir):
            raise UserError(f'{tokenizer_dir}: holds no tokenizer.json; point --tokenizer_dir at a '
                            f'tokenizer folder, or train one into a new folder with: '
                            f'python train_low_mem.py train_tokenizer --tokenizer_dir=NEW_FOLDER')
        raise UserError(f'{tokenizer_dir}: no tokenizer here', fix='create it with: '
                        f'python train_low_mem.py train_tokenizer --tokenizer_dir={tokenizer_dir}')
    try:
        rust = Tokenizer.from_file(path)
    except Exception as e:  # noqa: BLE001 - any parse failure of a user-given file
        raise UserError(f'{path}: not a valid tokenizer ({str(e).splitlines()[0] if str(e) else "empty"}); '
                        f'retrain it with: python train_low_mem.py train_tokenizer') from None
    ids = tuple(rust.token_to_id(t) for t in ('<pad>', '</s>', '<unk>'))
    size = rust.get_vocab_size()
    if ids != (PAD_ID, EOS_ID, UNK_ID) or size <= 259:
        raise UserError(f'{tokenizer_dir}: unexpected tokenizer (pad/eos/unk ids {ids}, {size} tokens); '
                        f'retrain it with: python train_low_mem.py train_tokenizer')
    return size


def sentinel_ids(tokenizer) -> np.ndarray | None:
    """The ids of <extra_id_0> ... <extra_id_99> in order, or None when the tokenizer lacks one."""
    rust = getattr(tokenizer, 'backend_tokenizer', tokenizer)
    ids = [rust.token_to_id(t) for t in SENTINELS]
    return None if None in ids else np.array(ids, dtype=np.int64)


def check_sentinels(tokenizer_dir: str, make_one: str = '') -> int:
    """UserError (one line, with the command that makes one: ``make_one``, the caller's, which
    knows the run's data; else a generic one) unless the tokenizer carries T5's sentinels, which
    span corruption writes into its inputs and targets."""
    from tokenizers import Tokenizer

    check_tokenizer_folder(tokenizer_dir)
    rust = Tokenizer.from_file(os.path.join(tokenizer_dir, 'tokenizer.json'))
    if sentinel_ids(rust) is None:
        make_one = make_one or (f'python train_low_mem.py train_tokenizer --train_file=YOUR_TEXT '
                                f'--vocab_size={rust.get_vocab_size()} --tokenizer_dir=NEW_FOLDER')
        raise UserError(f'{tokenizer_dir}: this tokenizer has no T5 sentinel tokens (<extra_id_0> ... '
                        f'<extra_id_{SENTINEL_COUNT - 1}>), which --objective=span_corruption needs; train one '
                        f'with: {make_one}')
    return SENTINEL_COUNT


def tokenizer_fingerprint(tokenizer_dir: str) -> str:
    """A hash of what maps text to ids (pieces, scores, normaliser, pre- and post-processing):
    equal for a copy or a retraining that gives the same tokenizer."""
    with open(os.path.join(tokenizer_dir, 'tokenizer.json'), encoding='utf-8') as f:
        spec = json.load(f)
    parts = {k: spec.get(k) for k in ('normalizer', 'pre_tokenizer', 'model', 'post_processor')}
    sentinels = {t['content']: t['id'] for t in spec.get('added_tokens') or () if t.get('content') in SENTINELS}
    if sentinels:  # added after the pieces (a tokenizer without them keeps its earlier fingerprint)
        parts['sentinels'] = sentinels
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]
