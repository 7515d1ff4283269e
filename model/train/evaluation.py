"""Evaluation during training: validation loss over all ranks, BLEU-4 and sample answers.

The validation loss is token-weighted like the training loss: the sum of token losses over
up to ``max_eval_rows`` rows (every rank its slice) divided by their label tokens. BLEU-4
(sacrebleu, Chinese tokenizer) scores greedy answers to the first ``bleu_samples`` usable
validation rows, on the main process only: generation runs on the unwrapped model, with no
collective inside, and at most ``eval_max_new_tokens`` tokens an answer.

A stop (model/stopping.py) cuts an evaluation within one validation batch -- every rank votes
before each, so the ranks leave at the same batch (a sharded engine's forward is itself a
collective) -- or within one generated token on the main process. A cut evaluation is dropped
(None): nothing of it is logged or exported as if complete.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch

from model.net.chat_model import answer, perplexity, show_perplexity, token_loss_sum
from model.faults import fault_point
from model.data.files import iter_usable_rows
from model.data.batches import placeholder_batch, to_torch
from model.stopping import STOP
from model.data.tokenizer import LABEL_PAD_ID

logger = logging.getLogger('chat_trainer')


def is_sharded(accelerator) -> bool:
    """FSDP, or DeepSpeed ZeRO stage 3: parameters are spread over the ranks."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        return True
    plugin = getattr(accelerator.state, 'deepspeed_plugin', None)
    return accelerator.distributed_type == DistributedType.DEEPSPEED and plugin is not None and \
        plugin.zero_stage == 3


@dataclass
class EvalResult:
    loss: float
    bleu: float | None = None  # main process only
    bleu_rows: int = 0
    samples: tuple = ()  # (prompt, target, answer) of the first show_samples rows
    seconds: float = 0.0  # what the evaluation took (loss, answers and BLEU)

    @property
    def perplexity(self) -> float:
        return perplexity(self.loss)

    def describe(self, step: int) -> str:
        text = f'eval at step {step} ({self.seconds:.1f} s): validation loss {self.loss:.4f} (ppl {show_perplexity(self.loss)})'
        if self.bleu is not None:
            text += f' | BLEU-4 {self.bleu:.2f} on {self.bleu_rows} rows'
        for p, r, h in self.samples:
            text += f'\n    prompt: {p[:80]}\n    target: {r[:80]}\n    answer: {h[:80]}'
        return text


@dataclass(frozen=True)
class EvalSettings:
    """The evaluator's view of the config, built once (:meth:`of`)."""

    batch_size: int  # rows per rank per validation batch
    max_rows: int  # validation rows scored (0: all)
    bleu_samples: int
    show_samples: int
    max_seq_len: int
    max_new_tokens: int  # a generated answer's cap, at most max_seq_len
    objective: str = 'pairs'  # span_corruption: the denoising loss only (no answers to score)

    @classmethod
    def of(cls, t) -> 'EvalSettings':
        return cls(batch_size=t.batch_size_per_gpu, max_rows=t.max_eval_rows, bleu_samples=t.bleu_samples,
                   show_samples=t.show_samples, max_seq_len=t.max_seq_len,
                   max_new_tokens=min(t.eval_max_new_tokens, t.max_seq_len), objective=t.objective)


class Evaluator:
    def __init__(self, settings: EvalSettings, collectives, tokenizer, valid_loader, valid_files, decoder_inputs):
        self.settings, self.collectives, self.accelerator = settings, collectives, collectives.accelerator
        accelerator = self.accelerator
        self.tokenizer, self.valid_loader, self.valid_files = tokenizer, valid_loader, valid_files
        self.decoder_inputs = decoder_inputs
        self._sample_rows = None  # read at the first evaluation, then kept
        # under FSDP or ZeRO-3 no process holds the whole model: answers would need every rank
        self.whole_model = not is_sharded(accelerator)
        self.answers = self.whole_model and settings.objective == 'pairs'
        if settings.objective != 'pairs':
            logger.info('evaluation: the denoising loss on the validation text (span corruption has no answers '
                        'for BLEU or samples)')
        elif not self.answers and (settings.bleu_samples or settings.show_samples):
            logger.info('BLEU and sample answers are off under a sharded engine; score the exported '
                        'model with: python train_low_mem.py test')

    def evaluate_all_ranks(self, model, step: int) -> EvalResult | None:
        """The evaluation at this optimizer step, or None when a stop cut it (on every rank)."""
        start = time.perf_counter()
        loss = self.validation_loss_all_ranks(model, step)
        if loss is None:
            return None
        result = EvalResult(loss=loss)
        complete = True
        if self.collectives.is_main and self.answers:
            complete = self._bleu_and_samples(self.accelerator.unwrap_model(model), result, step)
        if not self.collectives.ok_all_ranks(complete):  # the others waited here for main's answers
            return None
        result.seconds = time.perf_counter() - start
        return result

    @torch.no_grad()
    def validation_loss_all_ranks(self, model, step: int) -> float | None:
        """Every rank runs the same number of forwards (a sharded engine's forward is a
        collective): a rank whose slice of the last global batch is empty runs a placeholder
        batch that adds no tokens. None when a stop came (voted before every batch)."""
        t, dev = self.settings, self.accelerator.device
        if self.whole_model:  # DDP or one process: the plain module, no collective per forward
            model = self.accelerator.unwrap_model(model)
        loss_sum, tokens = torch.zeros((), device=dev, dtype=torch.float64), 0
        global_batch = t.batch_size * self.collectives.world
        rows = min(t.max_rows or self.valid_loader.num_positions, self.valid_loader.num_positions)  # rows or examples
        self.valid_loader.load_state_dict({'epoch': 0, 'rows_consumed': 0})  # rewind
        batches = iter(self.valid_loader)
        model.eval()
        try:
            for _ in range(math.ceil(rows / global_batch)):
                fault_point('eval-loss', step)
                signum = self.collectives.stop_signal_all_ranks(STOP.signum)
                if signum:
                    STOP.follow(signum)  # a rank not signalled itself: it stops as the others, saying whose it was
                    return None
                batch = next(batches, None) or to_torch(placeholder_batch(self.tokenizer.eos_token_id))
                with self.accelerator.autocast():
                    loss_sum += token_loss_sum(model, batch, dev, self.decoder_inputs)
                tokens += int((batch['labels'] != LABEL_PAD_ID).sum())
        finally:
            model.train()
        total, count = self.collectives.sum_all_ranks([float(loss_sum), tokens])
        return total / max(count, 1)

    def _bleu_and_samples(self, model, result: EvalResult, step: int) -> bool:
        """BLEU-4 and the sample answers into result; False when a stop cut the answers."""
        t = self.settings
        n = max(t.bleu_samples, t.show_samples)
        if not n:
            return True
        import sacrebleu

        if self._sample_rows is None:
            self._sample_rows = list(iter_usable_rows(self.valid_files, n))
        rows = self._sample_rows

        def should_stop() -> bool:  # asked after every generated token
            fault_point('eval-generate', step)
            return bool(STOP.signum)

        with self.accelerator.autocast():
            hyps = answer(model, self.tokenizer, [p for p, _ in rows], max_seq_len=t.max_seq_len,
                          max_new_tokens=t.max_new_tokens, should_stop=should_stop)
        if STOP.signum:
            return False
        if t.bleu_samples:
            k = min(t.bleu_samples, len(rows))
            result.bleu = sacrebleu.corpus_bleu(hyps[:k], [[r for _, r in rows[:k]]], tokenize='zh').score
            result.bleu_rows = k
        result.samples = tuple((p, r, h) for (p, r), h in list(zip(rows, hyps))[:t.show_samples])
        return True
