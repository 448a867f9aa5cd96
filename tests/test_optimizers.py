"""The stage optimizers: the explicit delayed-Nesterov update, NAdam's ramp, stage-adaptive settings, state transfer."""

import json
import subprocess
import sys

import pytest
import torch

from node0sim.app import compose_run_config
from node0sim.model import build_stages
from node0sim.protocol.codecs import DenseCodec
from node0sim.protocol.optimizers import NagDelay, build_optimizer, stage_lr_scale, stage_momentum
from node0sim.protocol.stage_compute import CostStageCompute, OptimConfig, TensorStageCompute
from tests.runs import MINIMAL
from tests.test_pipeline import CFG


def test_the_explicit_update_equals_the_written_formula():
    # w = (1, -2), w_prev = (0.5, -2), g = (0.4, 1), lr 0.1, gamma 0.9, wd 0.5:
    # w (1 - lr wd) = (0.95, -1.9); d = gamma (w - w_prev) = (0.45, 0); lr (1 - gamma) g = (0.004, 0.01); lr g = (0.04, 0.1)
    for discount, expected in ((True, [1.396, -1.91]), (False, [1.36, -2.0])):
        w = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
        opt = NagDelay([w], lr=0.1, gamma=0.9, weight_decay=0.5, discount=discount)
        opt.state[w]["previous"] = torch.tensor([0.5, -2.0], dtype=torch.float64)
        w.grad = torch.tensor([0.4, 1.0], dtype=torch.float64)
        opt.step()
        assert w.tolist() == pytest.approx(expected, abs=1e-12)
        assert opt.state[w]["previous"].tolist() == [1.0, -2.0]


def test_the_first_step_has_no_look_ahead():
    w = torch.nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
    opt = NagDelay([w], lr=0.1, gamma=0.9, weight_decay=0.0)
    w.grad = torch.tensor([1.0], dtype=torch.float64)
    opt.step()
    assert w.item() == pytest.approx(1.0 - 0.1 * 0.1)


def _delayed_quadratic(discount: bool, delay: int, steps: int) -> float:
    """|w| after ``steps`` NagDelay steps on f(w) = w^2 / 2 with the gradient taken ``delay`` updates ago."""
    w = torch.nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
    opt = NagDelay([w], lr=0.05, gamma=0.99, weight_decay=0.0, discount=discount)
    history = [w.detach().clone()] * (delay + 1)
    for _ in range(steps):
        w.grad = history[-1 - delay].clone()  # the gradient of w^2 / 2 at the stale point
        opt.step()
        history.append(w.detach().clone())
    return abs(w.item())


def test_dropping_the_discount_diverges_under_delay_while_the_discounted_update_converges():
    # measured (lr 0.05, gamma 0.99, delay 4): |w| 1.8e-2 after 1000 steps with the discount, 9.5e27 without
    assert _delayed_quadratic(True, 4, 2000) < _delayed_quadratic(True, 4, 1000) < 0.05
    assert _delayed_quadratic(False, 4, 1000) > 1e6
    assert _delayed_quadratic(False, 0, 1000) < 0.05  # without delay the undiscounted update converges too


def test_nadam_momentum_ramps_as_documented():
    psi = 0.5
    w = torch.nn.Parameter(torch.zeros(1))
    opt = build_optimizer([w], OptimConfig(name="nesterov_async", beta1=0.99, momentum_decay=psi), 0, 1)
    product = 1.0
    for t in range(1, 11):
        w.grad = torch.ones(1)
        opt.step()
        product *= 0.99 * (1 - 0.5 * 0.96 ** (t * psi))
    assert opt.state[w]["mu_product"].item() == pytest.approx(product, rel=1e-5)
    assert 0.99 * (1 - 0.5 * 0.96 ** (1000 * 0.004)) == pytest.approx(0.570, abs=1e-3)  # the reference's ramp table


def test_stage_adaptive_momentum_and_learning_rate_follow_the_expected_delay():
    cfg = OptimConfig(name="nesterov_async", stage_adaptive=True, total_steps=100)
    assert [round(stage_momentum(cfg, s, 8), 4) for s in (0, 7)] == [0.99, 0.9]
    assert stage_lr_scale(cfg, 0, 8, 0) == pytest.approx(1 / 7)
    assert stage_lr_scale(cfg, 7, 8, 0) == 1.0 and stage_lr_scale(cfg, 0, 8, 20) == 1.0
    nag = OptimConfig(name="nag_delay", gamma=0.95)
    assert stage_momentum(nag, 0, 8) == 0.95 and stage_lr_scale(nag, 0, 8, 0) == 1.0
    stage = build_stages(CFG, 2, seed=0)[0]
    compute = TensorStageCompute(stage, cfg, DenseCodec())
    assert compute.optimizer.param_groups[0]["betas"][0] == pytest.approx(0.99)


@pytest.mark.parametrize("name,momentum_key", [("nesterov_async", "betas"), ("nag_delay", "gamma")])
def test_stage_adaptive_settings_follow_the_measured_delay_passed_to_the_step(name, momentum_key):
    """Eq. 13 from the delay the server measured: a head stage (expected delay 1 of 2 stages) that measured
    delay 0.5 steps with momentum 0.9 + 0.09 * 0.5 / 1 and lr / max(1, 0.5) = lr; delay 3 clamps momentum at 0.99."""
    cfg = OptimConfig(name=name, stage_adaptive=True, warmup_steps=0, total_steps=100)
    assert stage_momentum(cfg, 0, 8, delay=3.5) == pytest.approx(0.9 + 0.09 * 3.5 / 7)
    assert stage_lr_scale(cfg, 0, 8, 0, delay=3.5) == pytest.approx(1 / 3.5)
    assert stage_lr_scale(cfg, 0, 8, 0, delay=0.2) == 1.0
    compute = TensorStageCompute(build_stages(CFG, 2, seed=0)[0], cfg, DenseCodec())
    group = compute.optimizer.param_groups[0]
    gradients = torch.randn(compute.num_trainable)
    compute.step_with(gradients, delay=0.5)
    momentum = group["betas"][0] if momentum_key == "betas" else group["gamma"]
    assert momentum == pytest.approx(0.9 + 0.09 * 0.5) and group["lr"] == pytest.approx(cfg.lr)
    compute.step_with(gradients, delay=3.0)
    momentum = group["betas"][0] if momentum_key == "betas" else group["gamma"]
    assert momentum == pytest.approx(0.99)


def _trained(name: str) -> tuple[TensorStageCompute, TensorStageCompute, torch.Tensor]:
    donor, joiner = (
        TensorStageCompute(build_stages(CFG, 2, seed=0)[1], OptimConfig(name=name, lr=1e-2, warmup_steps=0, momentum_decay=0.5),
                           DenseCodec())
        for _ in "ab"
    )
    hidden = torch.randn(2, 8, CFG.dim)
    for _ in range(3):
        donor.tail(hidden, None, torch.randint(0, CFG.vocab_size, (2, 8)))
        donor.apply_update(2)
    return donor, joiner, hidden


@pytest.mark.parametrize("name", ["adamw", "nesterov_async", "nag_delay"])
def test_a_joiner_that_imports_the_state_continues_exactly_as_the_donor(name):
    donor, joiner, hidden = _trained(name)
    joiner.import_state(donor.export_state())
    assert joiner.updates == donor.updates == 3
    targets = torch.randint(0, CFG.vocab_size, (2, 8))
    for compute in (donor, joiner):
        compute.tail(hidden, None, targets)
        compute.apply_update(2)
    torch.testing.assert_close(joiner.parameter_values(None), donor.parameter_values(None), atol=0, rtol=0)
    for p_donor, p_joiner in zip(donor.parameters, joiner.parameters):
        for key, value in donor.optimizer.state[p_donor].items():
            torch.testing.assert_close(joiner.optimizer.state[p_joiner][key], value, atol=0, rtol=0)


def test_the_nadam_state_carries_its_ramp():
    donor, _, _ = _trained("nesterov_async")
    state = donor.export_state()
    assert set(state.parts) == {"parameters", "exp_avg", "exp_avg_sq", "mu_product", "updates"}
    assert state.parts["mu_product"].shape == (len(donor.parameters),) and (state.parts["mu_product"] < 1).all()


def test_state_sizes_per_optimizer_match_in_both_modes():
    for name, vectors in (("adamw", 3), ("nesterov_async", 3), ("nag_delay", 2)):
        stage = build_stages(CFG, 2, seed=0)[1]
        cost = CostStageCompute(CFG, 1, 2, stage.layer_range, DenseCodec(), torch.float32, name).export_state()
        tensor = TensorStageCompute(stage, OptimConfig(name=name), DenseCodec()).export_state()
        params = cost.parts["parameters"].nbytes
        scalars = 4 * len(tensor.parts["mu_product"]) if name == "nesterov_async" else 0
        assert cost.nbytes == vectors * params + scalars
        assert tensor.nbytes == cost.nbytes + 8  # plus the update count


def test_presets_compose_and_differ_from_the_schema_only_where_the_paper_does():
    nesterov = compose_run_config("optim=nesterov_async").optim
    assert (nesterov.name, nesterov.beta1, nesterov.beta2, nesterov.weight_decay, nesterov.momentum_decay) == (
        "nesterov_async", 0.99, 0.999, 0.01, 0.004)
    nag = compose_run_config("optim=nag_delay", "optim.nag_discount=false").optim
    assert (nag.name, nag.lr, nag.gamma, nag.nag_discount) == ("nag_delay", 0.3, 0.99, False)


@pytest.mark.parametrize("preset", ["nesterov_async", "nag_delay"])
def test_the_cli_runs_a_few_steps_with_each_optimizer(tmp_path, preset):
    args = [MINIMAL, f"optim={preset}", "train.steps=3", "train.batch_size=8", "train.micro_batch_size=4", "train.seq_len=32",
            "train.eval_batches=1", f"hydra.run.dir={tmp_path}"]
    result = subprocess.run([sys.executable, "-m", "node0sim", *args], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 3


def test_a_malformed_optimizer_state_is_refused_naming_the_part():
    donor, joiner, _ = _trained("nesterov_async")
    state = donor.export_state()
    state.parts["mu_product"] = state.parts["mu_product"][:1]
    with pytest.raises(ValueError, match="mu_product"):
        joiner.import_state(state)
    with pytest.raises(ValueError, match="expected parts"):
        TensorStageCompute(build_stages(CFG, 2, seed=0)[1], OptimConfig(name="nag_delay"), DenseCodec()).import_state(
            donor.export_state())


def test_the_schedule_decays_linearly_to_the_floor_and_stays_there():
    # Node0's get_linear_schedule_with_warmup (models/lr_schedule.py): max(min_lr_ratio, (total - t) / (total - warmup))
    node0 = OptimConfig(warmup_steps=4, total_steps=14, min_lr_ratio=0.1)
    assert [node0.lr_factor(t) for t in (4, 9, 13, 14, 100)] == pytest.approx([1.0, 0.5, 0.1, 0.1, 0.1])
    to_zero = OptimConfig(warmup_steps=4, total_steps=14)
    assert [to_zero.lr_factor(t) for t in (9, 14, 100)] == pytest.approx([0.5, 0.0, 0.0])
    with pytest.raises(ValueError, match="optim.min_lr_ratio"):
        OptimConfig(min_lr_ratio=1.5)


def test_the_betas_reach_the_optimizer():
    for beta2 in (0.95, 0.999):
        compute = TensorStageCompute(build_stages(CFG, 2, seed=0)[1], OptimConfig(beta2=beta2), DenseCodec())
        assert [group["betas"] for group in compute.optimizer.param_groups] == [(0.9, beta2)]


@pytest.mark.parametrize("stage,max_norm", [(0, 0.1767767), (1, 0.1767767), (2, 0.8838835)])
def test_each_stage_clips_to_its_own_norm(stage, max_norm):
    # nag_delay's first step with no weight decay moves the weights by lr (1 - gamma) g_clipped (see above)
    optim = OptimConfig(name="nag_delay", lr=0.5, gamma=0.9, weight_decay=0.0, warmup_steps=0,
                        clip_grad_norm=0.1767767, tail_clip_grad_norm=0.8838835)
    compute = TensorStageCompute(build_stages(CFG, 3, seed=0)[stage], optim, DenseCodec())
    before = compute.parameter_values(None).clone()
    gradient = torch.randn(compute.num_trainable, generator=torch.Generator().manual_seed(0))
    compute.step_with(10 * gradient / gradient.norm())  # norm 10, over either limit
    moved = (compute.parameter_values(None) - before).norm().item()
    assert moved == pytest.approx(0.5 * (1 - 0.9) * max_norm, rel=1e-4)
    assert optim.clip_norm(is_tail=stage == 2) == max_norm
    assert OptimConfig(clip_grad_norm=0.5).clip_norm(is_tail=True) == 0.5  # no tail norm: the one norm everywhere
