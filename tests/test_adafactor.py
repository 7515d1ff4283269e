"""The toolkit's Adafactor (model/train/adafactor.py) against transformers' Adafactor, the reference
it must equal: the same weights step for step (bit-equal where the arithmetic is the same, within
float rounding where only its order differs), the same state under the same names in both
directions, whatever the buckets."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers.optimization import Adafactor as Reference

from config import T5ModelConfig
from model.net.chat_model import build_model
from model.train.adafactor import Adafactor
from model.train.factory import build_optimizer

TINY = T5ModelConfig(d_model=32, num_heads=2, d_kv=16, d_ff=64, num_layers=2, num_decoder_layers=2, dropout_rate=0.0)
VOCAB = 60


class Shapes(torch.nn.Module):
    """Weights of every kind the factoring rule tells apart: 1D, 2D, 3D, several of one shape."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.vec = torch.nn.Parameter(torch.randn(7, generator=g))
        self.mats = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(5, 6, generator=g)) for _ in range(3)])
        self.cube = torch.nn.Parameter(torch.randn(2, 3, 4, generator=g))
        self.unused = torch.nn.Parameter(torch.randn(5, 6, generator=g))  # a gradient only on some steps
        self.tiny = torch.nn.Parameter(torch.randn(4, 3, generator=g) * 1e-6)  # RMS under eps[1]: the floor counts

    def loss(self, x: torch.Tensor, step: int) -> torch.Tensor:
        out = (x @ self.mats[0] @ self.mats[1].T @ self.mats[2]).tanh().sum() + (self.vec ** 3).sum() \
            + (self.cube.sin() * x.mean()).sum() + (self.tiny.T * (x[:, :3].T @ x[:, :4])).sum()
        return out + (self.unused.cos().sum() if step % 3 == 0 else 0)


def t5():
    torch.manual_seed(0)
    return build_model(TINY, VOCAB)


def t5_loss(model, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + step)
    x, y = torch.randint(2, VOCAB, (4, 9), generator=g), torch.randint(2, VOCAB, (4, 6), generator=g)
    return model(input_ids=x, labels=y).loss


def shapes_loss(model, step: int) -> torch.Tensor:
    return model.loss(torch.randn(4, 5, generator=torch.Generator().manual_seed(step)), step)


def bf16_loss(model, step: int) -> torch.Tensor:
    return model.loss(torch.randn(4, 5, generator=torch.Generator().manual_seed(step)).bfloat16(), step)


def reference(model, **kw):
    return Reference(model.parameters(), relative_step=False, warmup_init=False, **kw)


def train(model, opt, loss_of, steps: range) -> None:
    for step in steps:
        opt.zero_grad(set_to_none=True)
        loss_of(model, step).backward()
        opt.step()


def max_rel_diff(a, b) -> float:
    return max(float(((p - q).abs().max() / q.abs().max().clamp(min=1e-12)).detach())
               for p, q in zip(a.parameters(), b.parameters()))


EXACT = [dict(lr=1e-2, scale_parameter=True), dict(lr=3e-3, scale_parameter=False),
         dict(lr=1e-2, scale_parameter=True, clip_threshold=0.5, decay_rate=-0.6, eps=(1e-28, 1e-2))]
ROUNDED = [dict(lr=1e-2, scale_parameter=True, beta1=0.9), dict(lr=1e-2, scale_parameter=True, weight_decay=0.1),
           dict(lr=1e-3, scale_parameter=False, beta1=0.8, weight_decay=0.01)]


@pytest.mark.parametrize('make, loss_of', [(t5, t5_loss), (Shapes, shapes_loss)], ids=['t5', 'shapes'])
@pytest.mark.parametrize('kw', EXACT, ids=['scaled', 'unscaled', 'options'])
def test_bit_equal_to_transformers(make, loss_of, kw):
    ours, ref = make(), make()
    train(ours, Adafactor(ours.parameters(), **kw), loss_of, range(8))
    train(ref, reference(ref, **kw), loss_of, range(8))
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        assert torch.equal(p, q), name
    assert max_rel_diff(ours, make()) > 1e-3  # it trained


@pytest.mark.parametrize('kw', ROUNDED, ids=['beta1', 'weight_decay', 'both'])
def test_first_moment_and_weight_decay_within_rounding(kw):
    """Weight decay is a separate multiply and subtract here (transformers: one add_ with alpha): a
    step differs by float rounding only, and four steps stay within it (the first moment, bit-equal
    alone, carried from step to step)."""
    ours, ref = t5(), t5()
    train(ours, Adafactor(ours.parameters(), **kw), t5_loss, range(4))
    train(ref, reference(ref, **kw), t5_loss, range(4))
    assert max_rel_diff(ours, ref) < 1e-5
    assert max_rel_diff(ours, t5()) > 1e-3


@pytest.mark.parametrize('bucket_elements', [1, 1 << 20], ids=['alone', 'stacked'])
def test_bf16_weights_and_a_loaded_state_as_the_reference(bucket_elements):
    """bf16 weights: updated in fp32 and rounded once; a state loaded into bf16 weights (torch casts
    it to the weights' dtype) is computed in fp32 again, as the reference does."""
    ours, ref = Shapes().bfloat16(), Shapes().bfloat16()
    opts = [Adafactor(ours.parameters(), lr=1e-2, bucket_elements=bucket_elements), reference(ref, lr=1e-2)]
    for model, opt in zip((ours, ref), opts):
        train(model, opt, bf16_loss, range(3))
    saved = [copy.deepcopy(o.state_dict()) for o in opts]
    opts = [Adafactor(ours.parameters(), lr=1e-2, bucket_elements=bucket_elements), reference(ref, lr=1e-2)]
    for opt, state in zip(opts, saved):
        opt.load_state_dict(state)
    assert opts[0].state[ours.mats[0]]['exp_avg_sq_row'].dtype == torch.bfloat16  # as torch loads it
    for model, opt in zip((ours, ref), opts):
        train(model, opt, bf16_loss, range(3, 6))
    for p, q in zip(ours.parameters(), ref.parameters()):
        assert p.dtype == torch.bfloat16 and torch.equal(p, q)


@pytest.mark.parametrize('bucket_elements', [1, 30, 1 << 20])
def test_buckets_do_not_change_the_result(bucket_elements):
    """A bucket split to one weight, a few, or one per shape: the same numbers; the weight that has a
    gradient only every third step keeps its own step count (its own bucket) like the reference."""
    ours, ref = Shapes(), Shapes()
    opt = Adafactor(ours.parameters(), lr=1e-2, bucket_elements=bucket_elements)
    train(ours, opt, shapes_loss, range(7))
    train(ref, reference(ref, lr=1e-2), shapes_loss, range(7))
    for p, q in zip(ours.parameters(), ref.parameters()):
        assert torch.equal(p, q)
    assert opt.state[ours.unused]['step'] == 3 and opt.state[ours.vec]['step'] == 7


def test_state_has_the_references_names_and_loads_both_ways():
    """A state saved by either continues in the other exactly as the reference continues."""
    base, kw = t5(), dict(lr=1e-2, scale_parameter=True)
    first_ref = reference(base, **kw)
    train(base, first_ref, t5_loss, range(3))
    saved_ref, weights = copy.deepcopy(first_ref.state_dict()), copy.deepcopy(base.state_dict())

    ours_then = t5()
    ours_then.load_state_dict(weights)
    opt = Adafactor(ours_then.parameters(), **kw)
    opt.load_state_dict(saved_ref)  # transformers' state -> ours
    train(ours_then, opt, t5_loss, range(3, 6))
    train(base, first_ref, t5_loss, range(3, 6))
    for p, q in zip(ours_then.parameters(), base.parameters()):
        assert torch.equal(p, q)

    saved_ours = opt.state_dict()
    for key, ref_state in first_ref.state_dict()['state'].items():
        assert sorted(saved_ours['state'][key]) == sorted(ref_state)  # the same names
        for name, value in ref_state.items():
            assert torch.equal(torch.as_tensor(saved_ours['state'][key][name]), torch.as_tensor(value)), name
    ref_then = t5()
    ref_then.load_state_dict(ours_then.state_dict())
    back = reference(ref_then, **kw)
    back.load_state_dict(copy.deepcopy(saved_ours))  # ours -> transformers'
    train(ref_then, back, t5_loss, range(6, 8))
    train(ours_then, opt, t5_loss, range(6, 8))
    for p, q in zip(ours_then.parameters(), ref_then.parameters()):
        assert torch.equal(p, q)


def test_saved_state_survives_torch_save(tmp_path):
    """The per-weight RMS values are views of one stacked tensor: saved and loaded they are still
    one value per weight."""
    model = t5()
    opt = Adafactor(model.parameters(), lr=1e-2)
    train(model, opt, t5_loss, range(2))
    torch.save(opt.state_dict(), tmp_path / 'opt.bin')
    loaded = torch.load(tmp_path / 'opt.bin', weights_only=True)
    for key, state in opt.state_dict()['state'].items():
        assert loaded['state'][key]['RMS'].shape == () and torch.equal(loaded['state'][key]['RMS'], state['RMS'])


def test_refuses_what_it_does_not_compute():
    model = t5()
    with pytest.raises(ValueError, match='learning rate'):
        Adafactor(model.parameters(), lr=0.0)
    opt = Adafactor(model.parameters(), lr=1e-2)
    opt.param_groups[0]['relative_step'] = True  # as a state saved with transformers' relative step would set it
    t5_loss(model, 0).backward()
    with pytest.raises(ValueError, match='relative_step'):
        opt.step()


def test_the_trainer_builds_it():
    from config import TrainConfigPretrainLarge as TrainConfig

    opt = build_optimizer(TrainConfig(optimizer='adafactor', learn_rate=2e-3, adafactor_scale_parameter=True,
                                      weight_decay=0.01), t5())
    assert isinstance(opt, Adafactor)
    group = opt.param_groups[0]
    assert (group['lr'], group['scale_parameter'], group['weight_decay'], group['beta1']) == (2e-3, True, 0.01, None)


def test_fp64_weights_are_computed_in_fp64_as_the_reference():
    def f64_loss(model, step):
        return model.loss(torch.randn(4, 5, generator=torch.Generator().manual_seed(step)).double(), step)
    ours, ref = Shapes().double(), Shapes().double()
    opt = Adafactor(ours.parameters(), lr=1e-2)
    train(ours, opt, f64_loss, range(4))
    train(ref, reference(ref, lr=1e-2), f64_loss, range(4))
    for p, q in zip(ours.parameters(), ref.parameters()):
        assert p.dtype == torch.float64 and torch.equal(p, q)
    assert opt.state[ours.mats[0]]['exp_avg_sq_row'].dtype == torch.float64


# --aux_learn_rate: the embedding, the layer norms and the relative position biases in a group of their
# own, updated with Adam at their own rate (model/train/factory.param_groups, adafactor.adam_update)

def _named(model, params) -> set[str]:
    ids = {id(p) for p in params}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def test_aux_group_holds_the_embedding_norms_and_position_biases():
    from config import TrainConfigPretrainLarge as TrainConfig

    model = t5()
    opt = build_optimizer(TrainConfig(optimizer='adafactor', learn_rate=1e-2, aux_learn_rate=0.05), model)
    layers, aux = opt.param_groups
    assert (layers['lr'], aux['lr'], aux['adam'], layers.get('adam')) == (1e-2, 0.05, True, None)
    aux_names, layer_names = _named(model, aux['params']), _named(model, layers['params'])
    assert 'shared.weight' in aux_names and not aux_names & layer_names
    assert aux_names | layer_names == {n for n, _ in model.named_parameters()}
    assert all(n.endswith('layer_norm.weight') or 'relative_attention_bias' in n or n == 'shared.weight'
               for n in aux_names)
    assert any('relative_attention_bias' in n for n in aux_names) and any('layer_norm' in n for n in aux_names)
    assert all(n.endswith(('.q.weight', '.k.weight', '.v.weight', '.o.weight', '.wi.weight', '.wo.weight'))
               for n in layer_names)
    # AdamW: two groups of the same algorithm, each at its rate; 0 keeps the one group of states saved before
    opt = build_optimizer(TrainConfig(optimizer='adamw', learn_rate=1e-3, aux_learn_rate=0.02), model)
    assert [g['lr'] for g in opt.param_groups] == [1e-3, 0.02]
    assert len(build_optimizer(TrainConfig(optimizer='adafactor', learn_rate=1e-2), model).param_groups) == 1


@pytest.mark.parametrize('decay', [0.0, 0.1])
def test_aux_group_steps_as_torchs_adamw(decay):
    from config import TrainConfigPretrainLarge as TrainConfig

    ours, ref = t5(), t5()
    opt = build_optimizer(TrainConfig(optimizer='adafactor', learn_rate=1e-2, adafactor_scale_parameter=True,
                                      aux_learn_rate=0.05, weight_decay=decay), ours)
    aux_names = _named(ours, opt.param_groups[1]['params'])
    ref_named = dict(ref.named_parameters())
    # the aux group is never weight-decayed (it would pull the norms' scales toward 0); the layers are
    assert (opt.param_groups[0]['weight_decay'], opt.param_groups[1]['weight_decay']) == (decay, 0.0)
    ref_opt = torch.optim.AdamW([ref_named[n] for n in sorted(aux_names)], lr=0.05, weight_decay=0.0, foreach=False)
    layer_ref = Adafactor([p for n, p in ref.named_parameters() if n not in aux_names], lr=1e-2,
                          scale_parameter=True, weight_decay=decay)
    for step in range(5):
        for o in (opt, ref_opt, layer_ref):
            o.zero_grad(set_to_none=True)
        t5_loss(ours, step).backward()
        t5_loss(ref, step).backward()
        opt.step()
        ref_opt.step()
        layer_ref.step()
    for (n, p), q in zip(ours.named_parameters(), ref.parameters()):
        assert torch.equal(p, q), n
    state = opt.state[dict(ours.named_parameters())['shared.weight']]
    assert set(state) == {'step', 'exp_avg', 'exp_avg_sq'} and float(state['step']) == 5


def test_aux_state_round_trips_through_a_saved_state(tmp_path):
    """A state saved mid-run and loaded into a fresh optimizer goes on exactly as the unbroken run."""
    from config import TrainConfigPretrainLarge as TrainConfig

    cfg = TrainConfig(optimizer='adafactor', learn_rate=1e-2, adafactor_scale_parameter=True, aux_learn_rate=0.05)
    whole, resumed = t5(), t5()
    opt = build_optimizer(cfg, whole)
    train(whole, opt, t5_loss, range(3))
    torch.save({'model': whole.state_dict(), 'opt': opt.state_dict()}, tmp_path / 's.pt')
    train(whole, opt, t5_loss, range(3, 6))
    saved = torch.load(tmp_path / 's.pt', weights_only=True)
    resumed.load_state_dict(saved['model'])
    opt2 = build_optimizer(cfg, resumed)
    opt2.load_state_dict(saved['opt'])
    train(resumed, opt2, t5_loss, range(3, 6))
    for p, q in zip(whole.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize('aux', [0.0, 0.05], ids=['one group', 'aux'])
def test_sizing_counts_what_the_optimizer_holds(aux):
    """sizing's count of the aux weights and its optimizer memory (the disk check and the GPU estimate
    use them) against the optimizer built and stepped."""
    from config import TrainConfigPretrainLarge as TrainConfig
    from model.net.sizing import aux_parameter_count, optimizer_bytes

    model = t5()
    opt = build_optimizer(TrainConfig(optimizer='adafactor', learn_rate=1e-2, aux_learn_rate=aux), model)
    train(model, opt, t5_loss, range(1))
    if aux:
        assert aux_parameter_count(TINY, VOCAB) == sum(p.numel() for p in opt.param_groups[1]['params'])
    held = sum(v.numel() * v.element_size() for state in opt.state.values() for k, v in state.items()
               if torch.is_tensor(v) and v.dim() > 0)
    assert held == optimizer_bytes(TINY, VOCAB, 'adafactor', aux=bool(aux))


def test_a_resume_applies_each_groups_rate_and_keeps_the_aux_group_undecayed():
    """checkpoint.apply_changed_hyperparameters: the loaded groups take this run's rates, each from the
    field its group names, on the schedule's current factor; weight decay only where the group decays."""
    from config import resolve_config
    from model.state.checkpoint import apply_changed_hyperparameters
    from model.train.factory import build_scheduler

    saved = resolve_config(overrides={'learn_rate': 1e-2, 'aux_learn_rate': 0.05, 'weight_decay': 0.01,
                                      'warmup_steps': 0, 'lr_schedule': 'linear'})
    model = t5()
    opt = build_optimizer(saved.train, model)
    sched = build_scheduler(saved.train, opt, 10)
    for _ in range(5):
        opt.step()
        sched.step()
    now = resolve_config(overrides={'learn_rate': 2e-2, 'aux_learn_rate': 0.1, 'weight_decay': 0.1,
                                    'warmup_steps': 0, 'lr_schedule': 'linear'})
    apply_changed_hyperparameters(now, opt, sched)
    layers, aux = opt.param_groups
    assert (layers['initial_lr'], aux['initial_lr']) == (2e-2, 0.1)
    assert layers['lr'] == pytest.approx(2e-2 * 0.5) and aux['lr'] == pytest.approx(0.1 * 0.5)
    assert (layers['weight_decay'], aux['weight_decay']) == (0.1, 0.0)
    assert sched.get_last_lr() == [layers['lr'], aux['lr']]
