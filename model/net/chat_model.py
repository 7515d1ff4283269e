"""Build chat_small_t5 (a transformers T5ForConditionalGeneration), load a trained one, answer.

Answers are generated with transformers' ``generate``: greedy, beam search or sampling
(config.DecodeConfig). Prompts are cut to the max_seq_len the model was trained with, and
prompts are batched so a batch holds a bounded number of positions: memory stays bounded
whatever the prompts' length or number.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import sys
from typing import Callable

import torch

from config import DecodeConfig, ResolvedConfig, T5ModelConfig
from model.errors import UserError
from model.net.model_source import ModelSource, describe_model_source, weights_path
from model.net.sizing import model_shape
from model.data.tokenizer import EOS_ID, LABEL_PAD_ID, PAD_ID, cut_texts, load_tokenizer, text_cut_chars

logger = logging.getLogger(__name__)

BATCH_POSITIONS = 1 << 16  # prompt + answer positions per generation batch


def build_t5_config(model_cfg: T5ModelConfig, vocab_size: int):
    from transformers import T5Config

    return T5Config(vocab_size=vocab_size, pad_token_id=PAD_ID, eos_token_id=EOS_ID,
                    decoder_start_token_id=PAD_ID, is_encoder_decoder=True,
                    **dataclasses.asdict(model_cfg))


def new_t5(config, initialize: bool = True):
    """A T5ForConditionalGeneration of this config. initialize=False leaves the weights as
    allocated, not drawn, for a model whose every weight is loaded next (a resume, inference):
    drawing the guide's shape costs ~7 s of a CPU's time that the load throws away."""
    from transformers import T5ForConditionalGeneration

    if initialize:
        return accept_packed_batches(T5ForConditionalGeneration(config))
    from transformers.initialization import no_init_weights

    with no_init_weights():
        model = T5ForConditionalGeneration(config)
    model.tie_weights()  # skipped with the initialization: one embedding for encoder, decoder and output
    return accept_packed_batches(model)


# --------------------------------------------------------------------------- packed batches


def segment_mask(query: torch.Tensor, key: torch.Tensor, causal: bool, stack) -> torch.Tensor:
    """The attention mask [b, 1, q, k] of packed rows (model/data/packing.py) for one T5 stack:
    a token sees the tokens of its own pair (segment), the decoder only earlier ones. Padding
    (segment 0) queries see everything -- their outputs are never used, and no row of the mask
    is empty (an empty row is NaN in SDPA). In the stack's convention: a boolean mask for SDPA,
    an additive one (0 / the dtype's minimum) for eager attention."""
    allowed = (query[:, :, None] == key[:, None, :]) | (query[:, :, None] == 0)
    if causal:
        allowed &= torch.ones(query.shape[1], key.shape[1], dtype=torch.bool, device=query.device).tril()
    allowed = allowed[:, None]
    implementation = stack.config._attn_implementation
    if implementation == 'sdpa':
        return allowed
    if implementation == 'eager':
        dtype = stack.embed_tokens.weight.dtype
        return torch.zeros(allowed.shape, dtype=dtype, device=query.device).masked_fill(~allowed,
                                                                                         torch.finfo(dtype).min)
    raise UserError(f'--packing needs eager or SDPA attention, this model uses {implementation!r}; '
                    f'train with --packing=False')


def accept_packed_batches(model):
    """Let ``model(..., encoder_segments=, decoder_segments=)`` run a packed batch: T5 takes one
    encoder mask for the encoder and for the decoder's cross-attention, so a hook on each stack
    turns the segments into that stack's masks (encoder: pair to pair; decoder: pair to pair,
    causal; cross: a response to its own prompt). Hooks are not saved with the model: what is
    saved is the plain T5 that transformers loads. Called on every model this toolkit builds."""
    if getattr(model, '_accepts_packed_batches', False):
        return model

    def encoder_hook(stack, args, kwargs):
        kwargs.pop('decoder_segments', None)
        enc = kwargs.pop('encoder_segments', None)
        if enc is not None:
            kwargs['attention_mask'] = segment_mask(enc, enc, False, stack)
        return args, kwargs

    def decoder_hook(stack, args, kwargs):
        enc, dec = kwargs.pop('encoder_segments', None), kwargs.pop('decoder_segments', None)
        if dec is not None:
            kwargs['attention_mask'] = segment_mask(dec, dec, True, stack)
            kwargs['encoder_attention_mask'] = segment_mask(dec, enc, False, stack)
        return args, kwargs

    model.encoder.register_forward_pre_hook(encoder_hook, with_kwargs=True)
    model.decoder.register_forward_pre_hook(decoder_hook, with_kwargs=True)
    model._accepts_packed_batches = True
    return model


def build_model(model_cfg: T5ModelConfig, vocab_size: int, initialize: bool = True):
    model = new_t5(build_t5_config(model_cfg, vocab_size), initialize)
    n = sum(p.numel() for p in model.parameters())
    logger.info('chat_small_t5: %.2fM parameters (vocab %d, d_model %d, %d+%d layers)', n / 1e6,
                vocab_size, model_cfg.d_model, model_cfg.num_layers, model_cfg.num_decoder_layers)
    return model


# --------------------------------------------------------------------------- loading


def layer_matrices(model) -> list:
    """The weights of the layers' linear maps (attention's q, k, v, o; the feed-forward's wi, wo):
    not the embedding (the output layer shares it), the layer norms or the relative position
    biases, which --aux_learn_rate trains on their own (model/train/factory.param_groups)."""
    head = getattr(model, 'lm_head', None)
    return [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head]


def default_model_paths(cfg: ResolvedConfig) -> list[str]:
    from model.state.model_files import model_folders

    return model_folders(cfg.train.output_dir)


def find_model_source(cfg: ResolvedConfig, model_dir: str = '') -> ModelSource:
    """The model a command uses: model_dir, else output_dir/best, else output_dir/final."""
    import os

    if model_dir:
        return describe_model_source(model_dir, cfg.train.tokenizer_dir)
    for path in default_model_paths(cfg):
        if os.path.isdir(path):
            return describe_model_source(path, cfg.train.tokenizer_dir)
    preset = f' --preset={cfg.preset}' if cfg.preset else ''
    raise UserError(f'no trained model in {" or ".join(default_model_paths(cfg))}; train one with: '
                    f'python train_low_mem.py train{preset}, or give --model_dir')


def perplexity(loss: float) -> float:
    """exp of a token-weighted mean loss (:func:`token_loss_sum`); inf past what a float holds."""
    return math.exp(loss) if loss < 709 else math.inf


def show_perplexity(loss: float) -> str:
    """The perplexity as the log and `test` print it: 2 decimals, or 3 digits with an exponent once
    it is large (an untrained model's loss of 61.43 is a perplexity of 4.77e+26, not a capped figure)."""
    value = perplexity(loss)
    return f'{value:.2f}' if value < 1e6 else f'{value:.3g}'


def token_loss_sum(model, batch: dict, device, decoder_inputs=None) -> torch.Tensor:
    """The loss rule of training, validation and `test`, in one place: the sum of the label tokens'
    cross-entropies, computed in float32 (padding, -100, ignored). Callers divide the sums they
    gather (over micro-batches, batches, ranks) by the number of label tokens: a token-weighted
    mean, whatever the batch shapes. A packed batch (model/data/packing.py) brings its decoder
    inputs and segments: the same sums in fewer positions. decoder_inputs: the unwrapped model's
    prepare_decoder_input_ids_from_labels when `model` is a wrapper (DDP)."""
    import torch.nn.functional as F

    def to_device(key):
        return batch[key].to(device, non_blocking=True)

    labels = to_device('labels')
    if 'decoder_segments' in batch:  # packed (model/data/packing.py): the masks come from the segments
        inner = model
        while hasattr(inner, 'module'):  # DDP, FSDP, DeepSpeed: the model they wrap
            inner = inner.module
        if not getattr(inner, '_accepts_packed_batches', False):  # transformers ignores unknown arguments:
            raise RuntimeError('a packed batch for a model without accept_packed_batches: '  # pairs would mix
                               'its loss would be wrong')
        inputs = {key: to_device(key) for key in ('encoder_segments', 'decoder_segments', 'decoder_input_ids')}
    else:
        make_decoder_inputs = decoder_inputs or model.prepare_decoder_input_ids_from_labels
        inputs = {'attention_mask': to_device('attention_mask'), 'decoder_input_ids': make_decoder_inputs(labels=labels)}
    logits = model(input_ids=to_device('input_ids'), **inputs).logits
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=LABEL_PAD_ID, reduction='sum')


def load_for_inference(cfg: ResolvedConfig, source: ModelSource):
    """(model in eval mode, tokenizer, max_seq_len) of a folder or of a weights file; a weights
    file without a recorded shape takes the shape of the config (preset and flags)."""
    import transformers

    transformers.utils.logging.disable_progress_bar()  # no 'Loading weights' bar before the answers
    tokenizer = load_tokenizer(source.tokenizer_dir)
    max_seq_len = int(source.max_seq_len or cfg.train.max_seq_len)
    if source.kind == 'folder':  # config.json, then the weights through the one loader that never unpickles
        from transformers import T5Config

        model = new_t5(T5Config.from_pretrained(source.path), initialize=False)
        load_weights_into(model, weights_path(source.path))  # every tensor, or one line
    else:
        shape = source.shape or model_shape(cfg.model, len(tokenizer))
        if shape.get('vocab_size') != len(tokenizer):
            raise UserError(f'{source.path} was trained with a vocabulary of {shape.get("vocab_size")}, the '
                            f'tokenizer in {source.tokenizer_dir} has {len(tokenizer)}; give its own --tokenizer_dir')
        fields = {f.name for f in dataclasses.fields(T5ModelConfig)}
        model_cfg = dataclasses.replace(cfg.model, **{k: v for k, v in shape.items() if k in fields})
        model = build_model(model_cfg, len(tokenizer), initialize=False)
        load_weights_into(model, source.path)
    model.eval()
    return model, tokenizer, max_seq_len


def load_weights_into(model, path: str) -> None:
    """Weights of a file into a built model: every tensor must be there with its shape (the tied
    embedding copies excepted); else one line naming the first that is not."""
    from model.state.model_files import load_weights_file

    state = load_weights_file(path)
    tied = ('shared.weight', 'encoder.embed_tokens.weight', 'decoder.embed_tokens.weight', 'lm_head.weight')
    kept = next((name for name in tied if name in state), None)
    if kept is not None:  # safetensors keeps one name of the tied embedding; T5 loads it as shared
        state['shared.weight'] = state.pop(kept)
        for name in tied[1:]:
            state.pop(name, None)
    own = model.state_dict()
    for name, tensor in state.items():
        if name in own and tuple(own[name].shape) != tuple(tensor.shape):
            raise UserError(f'{path}: {name} has shape {tuple(tensor.shape)}, this model needs '
                            f'{tuple(own[name].shape)}; use the same model shape (--d_model, --num_layers, ...) '
                            f'and tokenizer as the weights were trained with')
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if m not in tied]
    if missing or unexpected:
        which = f'missing {missing[0]}' if missing else f'unexpected {unexpected[0]}'
        raise UserError(f'{path}: not weights of this model ({which}, {len(missing)} missing and '
                        f'{len(unexpected)} unexpected tensors)')
    model.tie_weights()


# --------------------------------------------------------------------------- answering


def generation_kwargs(decode: DecodeConfig, max_seq_len: int) -> dict:
    kwargs = {'max_new_tokens': decode.max_new_tokens or max_seq_len, 'num_beams': decode.num_beams,
              'do_sample': decode.do_sample, 'repetition_penalty': decode.repetition_penalty,
              'no_repeat_ngram_size': decode.no_repeat_ngram_size}
    if decode.do_sample:
        kwargs.update(temperature=decode.temperature, top_p=decode.top_p, top_k=decode.top_k)
    return kwargs


def valid_text(text: str) -> str:
    """A prompt as valid UTF-8: bytes that were not (a terminal or pipe in another encoding,
    kept by Python as lone surrogates) become U+FFFD instead of failing in the tokenizer."""
    try:
        return text.encode('utf-8', 'surrogateescape').decode('utf-8', 'replace')
    except UnicodeEncodeError:
        return text.encode('utf-8', 'replace').decode('utf-8')


def stop_criteria(should_stop: Callable[[], bool]):
    """transformers' stopping criteria asking should_stop() after every generated token."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StopWhenAsked(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), bool(should_stop()), dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([StopWhenAsked()])


@torch.no_grad()
def answer(model, tokenizer, prompts: list[str], max_new_tokens: int = 64, max_seq_len: int | None = None,
           decode: DecodeConfig | None = None, should_stop: Callable[[], bool] | None = None,
           fill: bool | str = False) -> list[str]:
    """Answers in the prompts' order: greedy by default, else as ``decode`` says (sampling is
    seeded with decode.sample_seed once, so the same call gives the same answers).

    should_stop is asked after every token: once it says True the answers end there (cut, and
    fewer than the prompts) -- a training run's evaluation leaves within one token of a stop.
    fill (generate, chat): an answer that holds T5 sentinels is shown as its prompt with each
    sentinel filled (:func:`fill_sentinels`); ``'always'`` (a model pretrained with span
    corruption): every answer to a prompt with sentinels, a sentinel it wrote nothing for left as
    it is (:func:`unfilled_note` says so); test and evaluation score the answers as written."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    limit = max_seq_len or 512
    if decode is None:
        kwargs = {'max_new_tokens': max_new_tokens, 'do_sample': False, 'num_beams': 1}
    else:
        kwargs = generation_kwargs(decode, limit)
        torch.manual_seed(decode.sample_seed)
    per_row = (limit + kwargs['max_new_tokens']) * kwargs.get('num_beams', 1)
    batch_size = max(1, min(64, BATCH_POSITIONS // per_row))
    if should_stop is not None:
        kwargs['stopping_criteria'] = stop_criteria(should_stop)
    cut = text_cut_chars(tokenizer, limit)
    out: list[str] = []
    sentinels = sentinel_set(tokenizer) if fill else set()
    for i in range(0, len(prompts), batch_size):
        if should_stop is not None and should_stop():
            break
        enc = tokenizer([valid_text(p) for p in cut_texts(prompts[i:i + batch_size], cut)], padding=True,
                        truncation=True, max_length=limit, return_tensors='pt')
        gen = model.generate(input_ids=enc['input_ids'].to(device), attention_mask=enc['attention_mask'].to(device),
                             **kwargs)
        texts = tokenizer.batch_decode(gen, skip_special_tokens=True)
        for row in range(len(texts)):  # a span-corruption answer: the prompt with its spans filled in
            written, given = gen[row].tolist(), enc['input_ids'][row].tolist()
            asked = sentinels & set(given)  # filled where the model wrote one of the prompt's own sentinels (a
            if asked and (fill == 'always' or asked & set(written)):  # pairs model's stray ones: its answer as is)
                texts[row] = fill_sentinels(tokenizer, given, written)
        out.extend(texts)
    model.train(was_training)
    return out


def sentinel_set(tokenizer) -> set[int]:
    """The ids of the tokenizer's T5 sentinels (none for a tokenizer without them)."""
    from model.data.tokenizer import sentinel_ids

    ids = sentinel_ids(tokenizer)
    return set() if ids is None else set(ids.tolist())


SENTINEL_TEXT = re.compile(r'<extra_id_(0|[1-9][0-9]*)>')  # as the tokenizer reads it: ASCII digits, no leading 0
# a near miss (:func:`near_sentinels`): matched on the prompt folded one character for one -- full-width
# ASCII (＜＞＿０-９ｅ（）...) to ASCII, the ideographic space to a space, the minus sign to '-', the brackets
# a Chinese input method types for < > [ ] (《》〈〉【】〔〕) to those -- so each match's span is the user's
# own text. A '-' right after 'id' joins ('<extra-id-0>'); after a space or '_' it is a sign ('<extra_id_-1>',
# '<extra_id -1>': no sentinel)
_FOLD = {**{0xFF01 + i: 0x21 + i for i in range(94)}, 0x3000: ' ', 0x2212: '-', **{ord(a): b for a, b in zip(
    '《》〈〉【】〔〕', '<><>[][]')}}
# spaces bounded (at most 3 in a row): a near miss has a few, and an unbounded run read quadratically (a
# prompt of 100,000 spaces after 'extra_id-' took 78 s)
_NEAR_SENTINEL = re.compile(r'(?:(?P<open>[<\[({])[ \t]{0,3})?(?<![A-Za-z0-9_])extra[ \t]{0,3}[_-]?[ \t]{0,3}id'
                            r'(?:-(?=[ \t]{0,3}[-+]*[ \t]{0,3}[0-9])|[ \t]{0,3}_?[ \t]{0,3})(?:(?P<sign>[-+]*)[ \t]{0,3}(?P<n>[0-9]+)(?P<junk>(?:[ \t]?[A-Za-z0-9_.,+\-]){1,16}(?=[ \t]{0,3}[>\])}]))?)?'
                            r'(?:[ \t]{0,3}(?P<close>[>\])}]))?', re.IGNORECASE)


def objective_note(objective: str | None, prompt: str) -> str | None:
    """What a user should know before a model pretrained with span corruption answers a prompt
    without sentinels: it learned to fill <extra_id_N> spans, nothing else (it answered nothing)."""
    if objective != 'span_corruption' or SENTINEL_TEXT.search(prompt):
        return None
    return ('this model was pretrained with --objective=span_corruption: it fills T5 sentinels (e.g. '
            '北京是<extra_id_0>的首都) and answers nothing else; to answer questions, train it on prompt/response '
            'pairs with --init_from=<this model> (README, section 8)')


def near_sentinels(prompt: str, count: int = 100) -> list[tuple[str, str | None]]:
    """The prompt's text probably meant as a T5 sentinel but not written ``<extra_id_N>`` (which
    the tokenizer reads as plain text), each as (what was written, the sentinel to write, or None
    where none is meant to be had: a number past the ``count`` sentinels <extra_id_0> ..
    <extra_id_{count - 1}>, a negative one, or none): 'extra' and 'id' in any case, joined by
    '_', '-', a space or nothing, ASCII or full-width digits, within optional half- or full-width
    angle, square, round or curly brackets (``＜extra_id_0＞``, ``<extra id 0>``,
    ``[extra_id_0]``, ``<extra_id_1``, ``<extra id 100>``, ``<extra_id_-1>``, ``<extra_id_1.5>`` -- anything after the
    number up to a closing bracket --, ``<extra_id>``);
    without brackets only an unspaced name (``extra_id_5``), not words in a sentence; without a
    number only between angle or square brackets. ``<extra_id_N>`` itself is not one (:func:`sentinel_note` says
    where N is past the sentinels)."""
    found = []
    for m in _NEAR_SENTINEL.finditer(prompt.translate(_FOLD)):
        # text after the number counts only inside brackets: '(use extra_id_1.)' ends a sentence, no '<extra_id_1.>'
        junk = m['junk'] if m['open'] else None
        end = m.start('junk') if m['junk'] and not junk else m.end()
        written, digits = prompt[m.start():end], (m['n'] or '').lstrip('0') or '0'
        if m['n'] is None and not (m['open'] in ('<', '[') and m['close'] in ('>', ']')):
            continue  # no number: only in angle or square brackets ('{extra_id}' in code, '(extra ID)' in text)
        if SENTINEL_TEXT.fullmatch(written) or not (m['open'] or m['close'] or re.fullmatch(r'\S+', written)):
            continue  # the exact form (said where it is past the sentinels), or words in a sentence
        meant = (m['n'] is not None and '-' not in m['sign'] and not junk and len(digits) <= len(str(count))
                 and int(digits) < count)
        found.append((written, f'<extra_id_{digits}>' if meant else None))
    return found


def near_sentinel_note(near: list[tuple[str, str | None]], count: int = 100) -> str:
    (written, sentinel), more = near[0], len(near) - 1
    if sentinel:
        said = f'write it {sentinel} (ASCII angle brackets, no spaces)'
    else:
        said = f'this tokenizer\'s sentinels are <extra_id_0> to <extra_id_{count - 1}>, nothing else'
    return f'{written!r} is read as plain text, not a sentinel; {said}{f" -- and {more} more written so" if more else ""}'


def sentinel_note(tokenizer, prompt: str, max_seq_len: int | None = None) -> str | None:
    """What a user should know before a prompt with T5 sentinels is answered, or None: a sentinel
    the tokenizer lacks is read as plain text, one past the max_seq_len tokens a prompt is cut to
    is never seen (nor filled), and span corruption's inputs number their sentinels from
    <extra_id_0> up in order -- a model fills others less well; text meant as a sentinel but
    written otherwise (``＜extra_id_0＞``, :func:`near_sentinels`) is plain text too, whatever
    the model's objective (it is said before the order, which it may explain)."""
    from model.data.span_corruption import SENTINEL_COUNT

    found = SENTINEL_TEXT.findall(prompt)  # past any tokenizer's sentinels, not int()'s 4300-digit limit:
    written = [int(n) if len(n) < 7 else 10 ** 7 for n in found]
    near = near_sentinels(prompt, SENTINEL_COUNT)
    if not written and not near:
        return None
    sentinels = sentinel_set(tokenizer)
    if sentinels and max_seq_len:  # cut as answer() cuts it
        text = valid_text(cut_texts([prompt], text_cut_chars(tokenizer, max_seq_len))[0])
        kept = set(tokenizer(text, truncation=True, max_length=max_seq_len)['input_ids'])
        lost = [t for t in tokenizer(text)['input_ids'] if t in sentinels and t not in kept]
        if lost:
            return (f'the prompt is cut to {max_seq_len} tokens (the model\'s max_seq_len): '
                    f'{tokenizer.convert_ids_to_tokens(lost[0])}{" and later sentinels" if len(lost) > 1 else ""} '
                    f'fall{"" if len(lost) > 1 else "s"} outside it and {"are" if len(lost) > 1 else "is"} not filled; '
                    f'shorten the text before it')
    if not sentinels:
        return (f'this model\'s tokenizer has no T5 sentinels: '
                f'{f"<extra_id_{found[0]}>" if found else repr(near[0][0])} is read as plain text (a '
                f'model pretrained with --objective=span_corruption fills them)')
    if near:
        return near_sentinel_note(near, SENTINEL_COUNT)
    unknown = sorted((n, s) for n, s in zip(written, found) if n >= SENTINEL_COUNT)
    if unknown:
        return (f'<extra_id_{unknown[0][1]}> is not a sentinel of this tokenizer (<extra_id_0> to '
                f'<extra_id_{SENTINEL_COUNT - 1}>): it is read as plain text')
    if written != list(range(len(written))):
        shown = ', '.join(f'<extra_id_{n}>' for n in written[:6]) + (', ...' if len(written) > 6 else '')
        return (f'sentinels {shown}: span corruption numbers them from <extra_id_0> up, in order, each once '
                f'(as span-corruption training writes them); a model may fill these poorly')
    return None


def unfilled_note(filled: str, prompt: str = '') -> str | None:
    """What a user should know of a span model's filled prompt that still shows sentinels, or an
    empty span 【】: the model wrote nothing for them (not a fault of the prompt)."""
    left = [f'<extra_id_{n}>' for n in SENTINEL_TEXT.findall(filled)]
    empty = filled.count('【】') - prompt.count('【】')
    if not left and empty <= 0:
        return None
    names = ', '.join(left[:3]) + (', ...' if len(left) > 3 else '')
    said = ' and '.join(x for x in (f'{names} (left as written)' if left else '',
                                     f'{empty} span(s) (shown empty: 【】)' if empty > 0 else '') if x)
    return (f'the model wrote nothing for {said}: a model with little span-corruption training fills few sentinels, '
            f'and an answer cut by --max_new_tokens ends before the later ones (raise it to see)')


def fill_sentinels(tokenizer, input_ids: list[int], output_ids: list[int], marks: tuple[str, str] = ('【', '】')) -> str:
    """The input with each sentinel replaced by the span the model wrote after that sentinel in
    its output (T5's span-corruption targets: ``<extra_id_0> span <extra_id_1> span ... </s>``),
    each filled span between ``marks``; a sentinel the output left out stays as it is."""
    sentinels = sentinel_set(tokenizer)
    special = {tokenizer.pad_token_id, tokenizer.eos_token_id}
    spans, current = {}, None
    for t in output_ids:
        if t == tokenizer.eos_token_id and current is not None:
            break
        if t in sentinels:
            current = spans.setdefault(t, [])
        elif current is not None and t not in special:
            current.append(t)
    text, plain = [], []

    def flush():
        if plain:
            text.append(tokenizer.decode(plain, skip_special_tokens=True))
            plain.clear()
    for t in input_ids:
        if t in sentinels:
            flush()
            text.append(marks[0] + tokenizer.decode(spans[t], skip_special_tokens=True) + marks[1] if t in spans
                        else tokenizer.convert_ids_to_tokens(t))
        elif t not in special:
            plain.append(t)
    flush()
    return ''.join(text)


@torch.no_grad()
def stream_answer(model, tokenizer, prompt: str, decode: DecodeConfig, max_seq_len: int, out=None,
                  fill: bool | str = True) -> str:
    """One answer, printed token by token to ``out`` as it is generated; returns it. Decoded as
    :func:`answer` decodes (sampling seeded with decode.sample_seed: the same seed, the same
    answer); a prompt with T5 sentinels is answered whole and shown filled, as answer(fill=True)
    shows it -- its spans streamed alone read as noise."""
    from transformers import TextStreamer

    out = out or sys.stdout
    sentinels = sentinel_set(tokenizer)
    if sentinels and sentinels & set(tokenizer(valid_text(prompt))['input_ids']):
        text = answer(model, tokenizer, [prompt], max_seq_len=max_seq_len, decode=decode, fill=fill)[0]
        out.write(text + '\n')
        out.flush()
        return text

    class _Streamer(TextStreamer):
        def on_finalized_text(self, text, stream_end=False):
            out.write(text + ('\n' if stream_end else ''))
            out.flush()

    streamer = _Streamer(tokenizer, skip_prompt=False, skip_special_tokens=True)
    prompt = cut_texts([prompt], text_cut_chars(tokenizer, max_seq_len))[0]
    enc = tokenizer([valid_text(prompt)], truncation=True, max_length=max_seq_len, return_tensors='pt')
    device = next(model.parameters()).device
    kwargs = generation_kwargs(decode, max_seq_len)
    torch.manual_seed(decode.sample_seed)  # as answer() seeds it
    gen = model.generate(input_ids=enc['input_ids'].to(device), attention_mask=enc['attention_mask'].to(device),
                         streamer=streamer, **kwargs)
    return tokenizer.decode(gen[0], skip_special_tokens=True)
