"""Value bounds at the trust boundary (issue 14): servers refuse non-finite or huge activations and gradients and keep
stepping; the trainer refuses invalid replies, bans the peer that sent them and retries elsewhere, never the honest
peer a bad payload would have reached; honest runs refuse nothing."""

import math

import pytest
import torch

from node0sim.config import ConfigError, TrainConfig
from node0sim.metrics import RunRecorder
from node0sim.model import build_stages
from node0sim.protocol.averaging import AveragingConfig
from node0sim.protocol.bounds import largest_magnitude, loss_problem, value_problem
from node0sim.protocol.codecs import DenseCodec, QuantizeCodec, TopKCodec
from node0sim.protocol.messages import (
    BACKWARD,
    TAIL,
    BackwardRequest,
    BackwardResponse,
    ForwardResponse,
    Packed,
    TailRequest,
    TailResponse,
)
from node0sim.protocol.stage_compute import OptimConfig, TensorStageCompute
from node0sim.protocol.stage_server import StageServer
from node0sim.protocol.tensors import TensorSpec, all_finite
from node0sim.protocol.trainer import Trainer, TrainerConfig
from node0sim.runtime import RemoteError
from node0sim.sim.runner import SimulatedRun
from tests.backends import run_scenario
from tests.runs import run_config
from tests.simutil import add, make_sim
from tests.test_pipeline import CFG

BOUND = TrainConfig().max_abs_value
MAX_LOSS = TrainConfig().max_loss_ratio * math.log(CFG.vocab_size)
BAN_S = 0.5
LIAR_THROUGHPUT = 1e12
MICRO = 2  # sequences per micro-batch
SEQ = 8


class _RandomBatches:
    """Micro-batches of random tokens, [MICRO, SEQ] inputs and targets, forever."""

    def __init__(self, seed: int):
        self.generator = torch.Generator().manual_seed(seed)

    def next_micro_batch(self):
        window = torch.randint(0, CFG.vocab_size, (MICRO, SEQ + 1), generator=self.generator)
        return window[:, :-1], window[:, 1:]


# ---- the check itself ---------------------------------------------------------------------------

def test_the_largest_magnitude_is_the_largest_absolute_floating_value_nan_first():
    x = torch.tensor([[1.0, -7.5], [3.0, 2.0]])
    assert largest_magnitude(x) == 7.5
    assert largest_magnitude(Packed({"values": x, "indices": torch.tensor([[40000]], dtype=torch.int32)}, (1, 1, 2))) == 7.5
    assert largest_magnitude(torch.tensor([[1, 10**6]])) == 0.0  # integer tensors (token ids, indices) carry no values
    assert largest_magnitude(TensorSpec((2, 3), torch.float32)) == 0.0
    assert math.isnan(largest_magnitude(torch.tensor([1e38, math.nan, -math.inf])))
    assert largest_magnitude(torch.tensor([1.0, -math.inf])) == math.inf
    assert largest_magnitude(torch.tensor([2.0, -3.0], dtype=torch.bfloat16)) == 3.0


def test_values_and_losses_out_of_bounds_are_named():
    assert value_problem(torch.full((2, 2), BOUND), BOUND) is None
    assert value_problem(torch.full((2, 2), 1e38), BOUND) == "largest |value| 1e+38 is above train.max_abs_value (1e+08)"
    assert value_problem(torch.tensor([math.nan]), BOUND) == "values are not finite (NaN or inf)"
    assert loss_problem(None, MAX_LOSS) is None and loss_problem(0.0, MAX_LOSS) is None and loss_problem(MAX_LOSS, MAX_LOSS) is None
    for bad in (-0.001, MAX_LOSS * 1.01, math.nan, math.inf, "3.0", True):
        assert "train.max_loss_ratio x ln(vocab size)" in loss_problem(bad, MAX_LOSS), bad


@pytest.mark.parametrize("override,message", [
    ("train.max_abs_value=0", r"train\.max_abs_value: must be > 0, got 0"),
    ("train.max_loss_ratio=-1", r"train\.max_loss_ratio: must be > 0, got -1"),
])
def test_bad_bounds_fail_fast_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        run_config(override)


# ---- the server's boundary ----------------------------------------------------------------------

def _computes(num_stages: int, codec=DenseCodec()) -> list[TensorStageCompute]:
    return [TensorStageCompute(s, OptimConfig(), codec) for s in build_stages(CFG, num_stages, seed=0)]


def _serve(runtime, compute, throughput=1.0, cls=StageServer, **kwargs) -> StageServer:
    server = cls(runtime, "run", compute, AveragingConfig(2 * MICRO, progress_period_s=0.5), throughput=throughput,
                 bandwidth_mbps=100, max_abs_value=BOUND, **kwargs)
    runtime.spawn(server.start())
    return server


def _trainer(runtime, num_stages, micro_batches, layouts, records=None) -> Trainer:
    cfg = TrainerConfig(micro_batches=micro_batches, micro_batches_per_step=2, schedule="async", max_inflight=1, ban_s=BAN_S,
                        max_ban_s=8 * BAN_S, discovery_period_s=0.5, max_abs_value=BOUND, max_loss=MAX_LOSS)
    return Trainer(runtime, "run", num_stages, _RandomBatches(1), cfg, (records if records is not None else []).append, layouts)


def test_huge_gradients_and_activations_are_refused_at_the_boundary_and_the_stage_keeps_stepping():
    # before: one 1e38 backward every 5 s overflowed the head's accumulated gradients; its next step failed
    sim = make_sim(latency_s=0.01)
    computes = _computes(2)
    head, tail = (_serve(add(sim, f"s{i}").runtime, c) for i, c in enumerate(computes))
    attacker = add(sim, "attacker").runtime
    trainer_rt = add(sim, "trainer").runtime
    tokens = torch.randint(0, CFG.vocab_size, (MICRO, SEQ), generator=torch.Generator().manual_seed(3))
    huge = torch.full((MICRO, SEQ, CFG.dim), 1e38)
    attacks = [("s0", BACKWARD, BackwardRequest(0, tokens, huge, request_id=1)), ("s1", TAIL, TailRequest(1, huge, tokens, request_id=1))]
    refusals = []

    async def attack():
        while True:
            await attacker.sleep(0.1)
            for peer, method, request in attacks:
                try:
                    await attacker.call(peer, method, request, 30.0)
                except RemoteError as error:
                    refusals.append(str(error))

    attacker.spawn(attack())
    micro_batches = 40
    trainer = _trainer(trainer_rt, 2, micro_batches, computes)
    task = trainer_rt.spawn(trainer.run())
    sim.run(until=task.process)
    assert trainer.stats.micro_batches_done == micro_batches and trainer.stats.failed_requests == 0
    rounds = len(refusals) // 2
    assert rounds >= 2
    assert refusals[:2] == [
        "peer s0 rejected backward: BackwardRequest.grad_outputs: largest |value| 1e+38 is above train.max_abs_value (1e+08)",
        "peer s1 rejected tail: TailRequest.inputs: largest |value| 1e+38 is above train.max_abs_value (1e+08)",
    ]
    for name, server in (("s0", head), ("s1", tail)):
        assert server.stats.refused_values == sum(r.startswith(f"peer {name} ") for r in refusals) >= rounds
        assert server.stats.samples == micro_batches * MICRO  # nothing of the refused requests was accumulated
        assert server.epoch == micro_batches * MICRO // (2 * MICRO)  # every epoch stepped
        assert all_finite(server.compute.parameter_values(None))


def test_a_negative_epoch_stamp_is_refused_before_the_delay_counts_grow_by_it():
    head = StageServer(add(make_sim(), "s0").runtime, "run", _computes(2)[0], AveragingConfig(10**6), throughput=1.0,
                       bandwidth_mbps=100)
    tokens = torch.zeros((MICRO, SEQ), dtype=torch.int64)
    grads = torch.zeros((MICRO, SEQ, CFG.dim))
    with pytest.raises(ValueError, match=r"^BackwardRequest\.epoch: must be >= 0, got -1000000000$"):
        head.check_request(BackwardRequest(0, tokens, grads, epoch=-10**9), BackwardRequest)
    head.check_request(BackwardRequest(0, tokens, grads, epoch=0), BackwardRequest)


# ---- the trainer's checks: a liar is banned, the honest peers never ----------------------------

def _bad_gradients(kind, inputs):
    """A lying reply's input gradient (with a fake loss of 0.001)."""
    if kind == "nan":
        return torch.full_like(inputs, math.nan)
    if kind == "huge":
        return torch.full_like(inputs, 1e38)
    if kind == "shape":
        return inputs[:, :-1]
    return inputs.double()  # dtype


class _LyingTail(StageServer):
    """A tail server answering every tail request with ``lie(inputs)``: a (loss, input gradient) pair."""

    lie = None

    async def handle_tail(self, caller, request):
        return TailResponse(*self.lie(request.inputs))


LIES = {
    **{f"{kind} gradient": (lambda kind: lambda x: (0.001, _bad_gradients(kind, x)))(kind) for kind in ("nan", "huge", "shape", "dtype")},
    "negative loss": lambda x: (-1.0, torch.zeros_like(x)),
    "huge loss": lambda x: (1e6, torch.zeros_like(x)),
    "nan loss": lambda x: (math.nan, torch.zeros_like(x)),
    "a loss of another type": lambda x: ("0.001", torch.zeros_like(x)),
}


@pytest.mark.parametrize("lie", LIES)
def test_a_tail_that_lies_is_banned_and_training_goes_on_without_blaming_the_head(lie):
    # before: the head refused the liar's gradient and was the one banned; the liar's fake loss 0.001 was recorded
    sim = make_sim(latency_s=0.01)
    computes = _computes(2)
    head = _serve(add(sim, "s0").runtime, computes[0])
    tail = _serve(add(sim, "s1").runtime, computes[1])
    liar_cls = type("Liar", (_LyingTail,), {"lie": staticmethod(LIES[lie])})
    _serve(add(sim, "liar").runtime, _computes(2)[1], LIAR_THROUGHPUT, liar_cls)
    trainer_rt = add(sim, "trainer").runtime
    records = []
    micro_batches = 30
    trainer = _trainer(trainer_rt, 2, micro_batches, computes, records)
    task = trainer_rt.spawn(trainer.run())
    sim.run(until=task.process)
    stats, liar = trainer.stats, trainer.router.state(1, "liar")
    assert stats.micro_batches_done == micro_batches and stats.micro_batches_dropped == 0
    times = [record["time_s"] for record in records]
    assert max(b - a for a, b in zip(times, times[1:])) < BAN_S  # no micro-batch waited for a ban: retried at once
    assert liar.failures >= 2 and liar.throughput == pytest.approx(LIAR_THROUGHPUT * 0.8**liar.failures)
    assert stats.failed_requests == stats.invalid_replies == liar.failures  # every failure was the liar's
    honest_head = trainer.router.state(0, "s0")
    assert honest_head.failures == 0 and honest_head.banned_until == 0.0
    assert head.stats.refused_values == 0  # the bad gradient never reached it
    assert 0.001 not in stats.losses and all(0 < loss <= MAX_LOSS for loss in stats.losses)
    assert tail.stats.samples == micro_batches * MICRO


class _LyingMiddle(StageServer):
    """A body server answering every forward with ``lie(inputs)``."""

    lie = None

    async def handle_forward(self, caller, request):
        return self.lie(request.inputs)


MIDDLE_LIES = {
    "nan activations": lambda x: ForwardResponse(torch.full_like(x, math.nan)),
    "huge activations": lambda x: ForwardResponse(torch.full_like(x, 1e38)),
    "wrong shape": lambda x: ForwardResponse(x[:, :, :-1]),
    "another class": lambda x: BackwardResponse(x),
    "a negative epoch": lambda x: ForwardResponse(x, epoch=-10**9),
}


def _out_of_range_indices(x):
    return ForwardResponse(Packed({"values": x.parts["values"], "indices": torch.full_like(x.parts["indices"], CFG.dim)}, x.shape))


@pytest.mark.parametrize("lie,codec", [
    *((lie, DenseCodec()) for lie in MIDDLE_LIES),
    ("top-k indices out of range", TopKCodec(4)),  # the one thing a decoder refuses that a layout does not show
])
def test_a_body_stage_that_lies_is_banned_and_the_next_stage_never_refuses_or_is_blamed(lie, codec):
    sim = make_sim(latency_s=0.01)
    computes = _computes(3, codec)
    servers = [_serve(add(sim, f"s{i}").runtime, c) for i, c in enumerate(computes)]
    liar_cls = type("Liar", (_LyingMiddle,), {"lie": staticmethod(MIDDLE_LIES.get(lie, _out_of_range_indices))})
    _serve(add(sim, "liar").runtime, _computes(3, codec)[1], LIAR_THROUGHPUT, liar_cls)
    trainer_rt = add(sim, "trainer").runtime
    micro_batches = 20
    trainer = _trainer(trainer_rt, 3, micro_batches, computes)
    task = trainer_rt.spawn(trainer.run())
    sim.run(until=task.process)
    stats = trainer.stats
    assert stats.micro_batches_done == micro_batches and stats.micro_batches_dropped == 0
    assert stats.failed_requests == stats.invalid_replies == trainer.router.state(1, "liar").failures >= 2
    for stage, server in enumerate(servers):
        assert server.stats.refused_values == 0 and trainer.router.state(stage, f"s{stage}").failures == 0


# ---- honest runs refuse nothing -----------------------------------------------------------------

@pytest.mark.parametrize("overrides", [
    (),
    ("compression=subspace",),
    ("compression=quantize",),
    ("compression=topk",),
    ("compression=random_projection",),
    ("topology.tail_calls=separate",),
    ("sim.numerics=false", "model.vocab_size=256"),
    ("experiment=node0_tiny", "compression=subspace"),
])
def test_honest_runs_refuse_nothing(tmp_path, overrides):
    run = run_config("train.steps=3", "train.eval_batches=0", "train.seq_len=32", "topology.peers_per_stage=2", *overrides)
    sim_run = SimulatedRun(run, tmp_path, RunRecorder(tmp_path, run.train.steps, stream=None))
    summary = sim_run.execute()
    assert summary["steps"] == 3 and summary["failed_requests"] == 0
    assert [t.stats.invalid_replies for t in sim_run.trainers] == [0]
    assert all(s.stats.refused_values == 0 for s in sim_run.swarm.servers())


def test_codec_payloads_are_checked_on_their_floating_parts():
    x = torch.randn(2, 4, 32, generator=torch.Generator().manual_seed(0))
    x[0, 0, 0] = 50.0
    assert largest_magnitude(TopKCodec(4).encode(x)) == 50.0
    scales = QuantizeCodec(8).encode(x).parts["scales"]
    assert largest_magnitude(QuantizeCodec(8).encode(x)) == scales.max().item() == pytest.approx(50.0 / 127)


# ---- the same refusal on the live wire ----------------------------------------------------------

def _refusal_scenario():
    compute = _computes(2)[0]

    async def scenario(runtimes):
        server = StageServer(runtimes["head"], "run", compute, AveragingConfig(10**6), throughput=1.0, bandwidth_mbps=50,
                             max_abs_value=BOUND)
        await server.start()
        tokens = torch.zeros((MICRO, SEQ), dtype=torch.int64)
        try:
            await runtimes["client"].call(runtimes["head"].peer_id, BACKWARD,
                                          BackwardRequest(0, tokens, torch.full((MICRO, SEQ, CFG.dim), math.inf)), 30.0)
        except RemoteError as error:
            return str(error), server.stats.refused_values, server.samples
        return "answered", 0, 0

    return scenario


@pytest.mark.parametrize("backend", ["sim", pytest.param("swarm", marks=pytest.mark.slow)])
def test_a_non_finite_gradient_is_refused_by_name_on_both_backends(backend):
    message, refused, samples = run_scenario(backend, ["client", "head"], _refusal_scenario())
    assert message.endswith("rejected backward: BackwardRequest.grad_outputs: values are not finite (NaN or inf)")
    assert (refused, samples) == (1, 0)


def test_the_measuring_tool_reports_what_the_trainers_accepted():
    from tools.measure_bounds import measure

    largest, loss, log_vocab = measure(("experiment=minimal", "train.steps=1", "train.seq_len=32"))
    assert 0 < largest < BOUND
    assert loss == pytest.approx(log_vocab, rel=0.05)  # a model at initialization predicts about uniformly: ln V
