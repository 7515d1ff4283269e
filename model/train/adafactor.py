"""Adafactor (Shazeer & Stern 2018) as transformers' ``Adafactor(relative_step=False,
warmup_init=False)`` computes it, with the weights of one shape updated together.

transformers' version walks the weights one by one: about twenty small tensor operations each,
and with ``scale_parameter`` a ``max(float, tensor)`` that waits for the device once per weight.
Here the weights are put in buckets of one shape (a T5 has few: its q/k/v/o, wi, wo, norms,
embedding), each bucket's gradients stacked, and every operation runs once per bucket on the
stack; nothing waits for the device. The arithmetic is transformers' (same defaults, same order
of operations; tests/test_adafactor.py holds it to the reference: bit-equal, but for weight
decay, which is applied as a separate multiply, within float rounding), and the
state of a weight is kept under transformers' names (``step``, ``exp_avg_sq_row`` /
``exp_avg_sq_col`` or ``exp_avg_sq``, ``RMS``, ``exp_avg`` with ``beta1``), so a training state
saved by either loads into the other.

A param group marked ``adam=True`` is updated with Adam instead (torch's AdamW arithmetic, its
state under torch's names, ``step``, ``exp_avg``, ``exp_avg_sq``): the run's ``--aux_learn_rate``
puts the embedding, the layer norms and the relative position biases there (model/train/factory.py),
so one optimizer, one state, holds both.

A bucket is split where it would pass ``bucket_elements`` numbers, so only small weights are
stacked: for them the copies cost less than the operations they save, and for a large weight
(a 768 x 768 matrix already) a stack would only add memory traffic. A bucket of one weight works
on views of it and its state, in place, copying nothing (tests/test_adafactor.py, buckets).
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch

BUCKET_ELEMENTS = 1 << 20  # at most 1M numbers a stack (4 MB in fp32); a larger weight is updated alone, in place


class Adafactor(torch.optim.Optimizer):
    """transformers' Adafactor with an external learning rate (``relative_step=False``), batched
    over weights of one shape. ``scale_parameter``: the step is ``lr`` times the weight's RMS
    (at least ``eps[1]``); ``beta1``: a first moment (None: none, T5's choice)."""

    def __init__(self, params, lr: float, eps=(1e-30, 1e-3), clip_threshold: float = 1.0,
                 decay_rate: float = -0.8, beta1: float | None = None, weight_decay: float = 0.0,
                 scale_parameter: bool = True, bucket_elements: int = BUCKET_ELEMENTS):
        if lr is None or lr <= 0:
            raise ValueError(f'Adafactor here needs a learning rate above 0, got {lr}')
        defaults = dict(lr=lr, eps=tuple(eps), clip_threshold=clip_threshold, decay_rate=decay_rate, beta1=beta1,
                        weight_decay=weight_decay, scale_parameter=scale_parameter, relative_step=False,
                        warmup_init=False)
        super().__init__(params, defaults)
        self.bucket_elements = bucket_elements

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group.get('relative_step') or group.get('warmup_init'):
                raise ValueError('this Adafactor takes its learning rate from the schedule: relative_step and '
                                 'warmup_init are not supported')
            if group.get('adam'):
                adam_update(self.state, group)
                continue
            for bucket in self._buckets(group):
                self._update(group, bucket)
        return loss

    def _buckets(self, group) -> list[list]:
        """The group's weights with a gradient, by (shape, dtype, device, step count), split so a
        stack holds at most bucket_elements numbers."""
        by_kind = defaultdict(list)
        for p in group['params']:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError('Adafactor does not support sparse gradients.')
            state = self.state[p]
            by_kind[(tuple(p.shape), p.dtype, p.device, int(state.get('step', 0)))].append(p)
        buckets = []
        for params in by_kind.values():
            per = max(1, self.bucket_elements // max(params[0].numel(), 1))
            buckets.extend(params[i:i + per] for i in range(0, len(params), per))
        return buckets

    def _update(self, group, params: list) -> None:
        shape = params[0].shape
        factored = len(shape) >= 2
        first_moment = group['beta1'] is not None
        n = len(params)
        grads = _in_fp32_or_wider(_stack([p.grad for p in params]))  # (n, *shape)
        states = [self.state[p] for p in params]
        if not states[0]:
            for state in states:
                state['step'] = 0
                if first_moment:
                    state['exp_avg'] = torch.zeros_like(grads[0])
                if factored:
                    state['exp_avg_sq_row'] = grads.new_zeros(shape[:-1])
                    state['exp_avg_sq_col'] = grads.new_zeros(shape[:-2] + shape[-1:])
                else:
                    state['exp_avg_sq'] = torch.zeros_like(grads[0])
        step = int(states[0]['step']) + 1
        for state in states:
            state['step'] = step
        per_weight = (n,) + (1,) * len(shape)  # a value per weight, broadcast over its numbers
        root_numel = math.sqrt(params[0].numel())

        # the weights' RMS (kept as transformers keeps it) and each weight's step size
        weights = _in_fp32_or_wider(_stack(params))
        rms = torch.linalg.vector_norm(weights.reshape(n, -1), dim=1) / root_numel
        for state, value in zip(states, rms.unbind(0)):
            state['RMS'] = value
        floor = group['eps'][1]  # a weight's RMS counts from this up (transformers: max(floor, RMS) * lr)
        lr = (rms * group['lr']).where(rms > floor, rms.new_tensor(floor * group['lr'])) if group['scale_parameter'] \
            else torch.full_like(rms, group['lr'])

        beta2t = 1.0 - math.pow(step, group['decay_rate'])
        update = grads.square().add_(group['eps'][0])
        if factored:
            row = self._stacked(states, 'exp_avg_sq_row', grads)
            col = self._stacked(states, 'exp_avg_sq_col', grads)
            row.mul_(beta2t).add_(update.mean(dim=-1), alpha=1.0 - beta2t)
            col.mul_(beta2t).add_(update.mean(dim=-2), alpha=1.0 - beta2t)
            self._unstack(states, 'exp_avg_sq_row', row)
            self._unstack(states, 'exp_avg_sq_col', col)
            r_factor = (row / row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)
            c_factor = col.unsqueeze(-2).rsqrt()
            update = torch.mul(r_factor, c_factor).mul_(grads)
        else:
            sq = self._stacked(states, 'exp_avg_sq', grads)
            sq.mul_(beta2t).add_(update, alpha=1.0 - beta2t)
            self._unstack(states, 'exp_avg_sq', sq)
            update = sq.rsqrt().mul_(grads)
        del grads
        update_rms = torch.linalg.vector_norm(update.reshape(n, -1), dim=1) / root_numel
        update.div_((update_rms / group['clip_threshold']).clamp_(min=1.0).view(per_weight))
        update.mul_(lr.view(per_weight))
        if first_moment:
            avg = self._stacked(states, 'exp_avg', update)
            avg.mul_(group['beta1']).add_(update, alpha=1 - group['beta1'])
            self._unstack(states, 'exp_avg', avg)
            update = avg
        if group['weight_decay'] != 0:
            weights.sub_(weights * (lr * group['weight_decay']).view(per_weight))
        weights.sub_(update)
        _write_back(params, weights)

    @staticmethod
    def _stacked(states, key: str, like: torch.Tensor) -> torch.Tensor:
        for s in states:  # a loaded state may sit elsewhere (transformers moves it the same way)
            s[key] = s[key].to(like)
        return _stack([s[key] for s in states])

    @staticmethod
    def _unstack(states, key: str, stacked: torch.Tensor) -> None:
        _write_back([s[key] for s in states], stacked)


def _in_fp32_or_wider(t: torch.Tensor) -> torch.Tensor:
    """Half precision computed in fp32, as transformers does; fp32 and fp64 as they are."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _stack(tensors: list) -> torch.Tensor:
    """(n, *shape): one tensor's view (in-place work lands in it), or several stacked (a copy)."""
    return tensors[0].unsqueeze(0) if len(tensors) == 1 else torch.stack(tensors)


def _write_back(targets: list, stacked: torch.Tensor) -> None:
    """The stack's rows into the tensors it was made of, unless it is a view of the one tensor."""
    if stacked.data_ptr() != targets[0].data_ptr():  # a stack or a cast is a new tensor
        torch._foreach_copy_(targets, list(stacked.unbind(0)))


ADAM_DEFAULTS = dict(betas=(0.9, 0.999), eps=1e-8)  # torch.optim.AdamW's


def adam_group(params, lr: float, weight_decay: float = 0.0, **more) -> dict:
    """A param group this Adafactor updates with Adam (its own betas and eps: the optimizer's
    defaults are Adafactor's)."""
    return dict(params=list(params), lr=lr, weight_decay=weight_decay, adam=True, **ADAM_DEFAULTS, **more)


@torch.no_grad()
def adam_update(states, group) -> None:
    """One AdamW step over a param group's weights, as torch.optim.AdamW(foreach=False) computes it
    (decoupled weight decay, bias-corrected moments; tests/test_adafactor.py holds it to torch's)."""
    (beta1, beta2), eps, lr, decay = group['betas'], group['eps'], group['lr'], group['weight_decay']
    for p in group['params']:
        if p.grad is None:
            continue
        if p.grad.is_sparse:
            raise RuntimeError('Adam here does not support sparse gradients.')
        state = states[p]
        if not state:
            state['step'] = torch.tensor(0.0)
            state['exp_avg'] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state['exp_avg_sq'] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state['exp_avg'] = state['exp_avg'].to(p)  # a loaded state may sit elsewhere
        state['exp_avg_sq'] = state['exp_avg_sq'].to(p)
        state['step'] += 1
        step = state['step'].item()
        grad = p.grad
        p.mul_(1 - lr * decay)
        state['exp_avg'].lerp_(grad, 1 - beta1)
        state['exp_avg_sq'].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias_correction2_sqrt = math.sqrt(1 - beta2 ** step)
        denom = (state['exp_avg_sq'].sqrt() / bias_correction2_sqrt).add_(eps)
        p.addcdiv_(state['exp_avg'], denom, value=-lr / (1 - beta1 ** step))
