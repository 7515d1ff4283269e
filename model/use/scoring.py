"""`train_low_mem.py test`: a trained model scored on a prompt/response file, streamed.

Loss and perplexity are token-weighted, teacher-forced (the validation loss of training);
BLEU-4 is sacrebleu's corpus BLEU with the Chinese tokenizer, accumulated as n-gram
statistics batch by batch; exact match compares whitespace-stripped answers. Memory holds one
batch of rows: the predictions go to a JSONL file as they are made. Its first line is the
toolkit's marker with the figures, one line per row follows: prompt, reference, answer.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from config import DecodeConfig
from model.errors import UserError
from model.state import markers, ownership, writes
from model.net.chat_model import answer, perplexity, show_perplexity, token_loss_sum
from model.data.files import PAIR_COLUMNS, iter_text_tables, usable_mask
from model.data.batches import TokenEncoder, make_batches, to_torch
from model.state.markers import PREDICTIONS
from model.state.model_files import model_identity
from model.data.tokenizer import LABEL_PAD_ID

TEST_BATCH_ROWS = 32


@dataclass
class TestResult:
    rows: int
    skipped: int
    loss: float
    bleu: float
    exact_match: float
    predictions: str

    @property
    def perplexity(self) -> float:
        return perplexity(self.loss)

    def describe(self) -> str:
        return (f'rows {self.rows} (skipped {self.skipped} blank) | loss {self.loss:.4f} | perplexity '
                f'{show_perplexity(self.loss)} | BLEU-4 {self.bleu:.2f} | exact match {100 * self.exact_match:.1f}%\n'
                f'predictions: {self.predictions}')


def exact_match(answer: str, reference: str) -> bool:
    """The exact-match rule of `test` (and of the learning benchmarks): the same text once the
    whitespace around both is stripped."""
    return answer.strip() == reference.strip()


def check_predictions_path(path: str, test_files: list[str], input_specs: list[str]) -> str:
    """Where the predictions go, checked before the model loads, resolved through links: a
    path ending in .jsonl, new or predictions this toolkit wrote, never an input, never where a
    training run would read its data, never inside a tokenizer, model or state folder."""
    real = ownership.resolve_place(path, '--out', file=True)
    if not real.endswith('.jsonl') or os.path.basename(real) == '.jsonl':
        leads = f' (a link to {real})' if real != os.path.abspath(path) else ''
        raise UserError(f'--out={path}{leads}: the predictions are JSON lines; give a file path ending in .jsonl')
    ownership.check_not_an_input(real, test_files, '--out', input_specs)
    ownership.check_replaceable(real, PREDICTIONS, '--out', folder=False)
    ownership.check_writable(real, '--out')
    return real


@torch.no_grad()
def score_file(model, tokenizer, test_file: str, out_path: str, max_seq_len: int, decode: DecodeConfig,
               max_rows: int = 0, model_path: str = '', progress=None) -> TestResult:
    ownership.check_replaceable(out_path, PREDICTIONS, 'predictions', folder=False)
    model_id = model_identity(model_path) if model_path else None  # what is scored, by content (before it can change)
    with writes.folders_for(out_path):  # folders made for the file go again if it is not written
        return _score_into(model, tokenizer, test_file, out_path, max_seq_len, decode, max_rows, model_path, model_id,
                           progress)


def _score_into(model, tokenizer, test_file, out_path, max_seq_len, decode, max_rows, model_path, model_id, progress):
    from sacrebleu.metrics import BLEU

    # effective order only changes a sentence's own score (unused), not its counts
    bleu = BLEU(tokenize='zh', effective_order=True)
    encoder = TokenEncoder(tokenizer, max_seq_len)
    device = next(model.parameters()).device
    stats = np.zeros(10, dtype=np.int64)  # matches 1-4, totals 1-4, answer and reference lengths
    loss_sum, tokens, rows, skipped, exact = 0.0, 0, 0, 0, 0
    body_path = writes.temp_path(out_path)
    try:
        with writes.disk_errors('predictions', out_path), open(body_path, 'w', encoding='utf-8') as body:
            for table in iter_text_tables(test_file, batch_rows=TEST_BATCH_ROWS):
                if max_rows and rows >= max_rows:
                    break
                if max_rows:
                    table = table.slice(0, max_rows - rows)
                keep = usable_mask(table)
                skipped += int((~keep).sum())
                table = table.filter(pa.array(keep))
                if not table.num_rows:
                    continue
                prompts, refs = (table.column(c).to_pylist() for c in PAIR_COLUMNS)
                batch = to_torch(make_batches([(prompts, refs, None, 0)], encoder)[0])
                loss_sum += float(token_loss_sum(model, batch, device))
                tokens += int((batch['labels'] != LABEL_PAD_ID).sum())
                hyps = answer(model, tokenizer, prompts, max_seq_len=max_seq_len, decode=decode)
                for h, r in zip(hyps, refs):  # a sentence's n-gram counts; the corpus score sums them
                    s = bleu.sentence_score(h, [r])
                    stats += np.array([*s.counts, *s.totals, s.sys_len, s.ref_len])
                for p, r, h in zip(prompts, refs, hyps):
                    exact += exact_match(h, r)
                    body.write(json.dumps({'prompt': p, 'reference': r, 'answer': h}, ensure_ascii=False) + '\n')
                rows += len(prompts)
                if progress:
                    progress(rows)
        corpus = BLEU(tokenize='zh')  # corpus BLEU's own smoothing ('exp'), as sacrebleu.corpus_bleu
        score = BLEU.compute_bleu(correct=list(stats[:4]), total=list(stats[4:8]), sys_len=stats[8],
                                  ref_len=stats[9], smooth_method=corpus.smooth_method,
                                  smooth_value=corpus.smooth_value).score if rows else 0.0
        result = TestResult(rows, skipped, loss_sum / max(tokens, 1), score, exact / max(rows, 1), out_path)
        header = markers.file_marker_info(PREDICTIONS, model=model_path, model_id=model_id, test_file=test_file,
                                          rows=rows, skipped=skipped, loss=result.loss, perplexity=result.perplexity,
                                          bleu4=score, exact_match=result.exact_match, decode=decode.__dict__)
        with writes.atomic_file(out_path, PREDICTIONS, 'predictions') as tmp:
            with open(tmp, 'w', encoding='utf-8') as f, open(body_path, encoding='utf-8') as body:
                f.write(json.dumps(header, ensure_ascii=False) + '\n')
                shutil.copyfileobj(body, f)
    finally:
        if os.path.exists(body_path):
            os.remove(body_path)
    return result
