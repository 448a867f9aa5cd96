"""Reliability: malformed requests get named errors, retries are accumulated once, bans grow, runs never fail silently."""

import json
import logging
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from node0sim.app import incomplete_run
from node0sim.assembly import CALLS_BEYOND_PIPELINE, calls_per_caller, make_trainer
from node0sim.metrics import RunRecorder
from node0sim.model import build_stages
from node0sim.protocol.averaging import AveragingConfig
from node0sim.protocol.batching import BatchingQueue
from node0sim.protocol.codecs import DenseCodec
from node0sim.protocol.messages import (
    BACKWARD,
    FORWARD,
    GET_STATE,
    TAIL,
    BackwardRequest,
    BackwardResponse,
    ForwardRequest,
    TailRequest,
)
from node0sim.protocol.stage_compute import OptimConfig, TensorStageCompute
from node0sim.protocol.stage_server import StageServer
from node0sim.protocol.state_transfer import StateRequest
from node0sim.protocol.trainer import Trainer, TrainerConfig
from node0sim.runtime import RemoteError, RPCError
from node0sim.sim.runner import SimulatedRun
from tests.backends import run_scenario
from tests.runs import MINIMAL, run_config
from tests.simutil import add, make_sim
from tests.test_pipeline import CFG, FixedBatch

TOKENS = torch.randint(0, CFG.vocab_size, (2, 4), generator=torch.Generator().manual_seed(0))
HIDDEN = torch.randn(2, 4, CFG.dim, generator=torch.Generator().manual_seed(1))

MALFORMED = [  # (server, method, request, what the refusal names)
    ("head", FORWARD, ForwardRequest(0, TOKENS[0]), "expected a [batch, seq_len, ...] payload, got shape [4]"),
    ("head", FORWARD, ForwardRequest(0, torch.tensor(3)), "got shape []"),
    ("head", FORWARD, ForwardRequest(0, 5), "ForwardRequest.inputs: expected Tensor or TensorSpec or Packed, got int"),
    ("head", FORWARD, ForwardRequest("0", TOKENS), "ForwardRequest.stage: expected int, got str"),
    ("head", FORWARD, StateRequest(0), "expected a ForwardRequest, got a StateRequest"),
    ("head", FORWARD, BackwardResponse(None), "expected a ForwardRequest, got a BackwardResponse"),
    ("head", BACKWARD, BackwardRequest(0, TOKENS, HIDDEN, epoch="x"), "BackwardRequest.epoch: expected int, got str"),
    ("head", BACKWARD, BackwardRequest(0, TOKENS, None), "BackwardRequest.grad_outputs: expected"),
    ("head", BACKWARD, BackwardRequest(0, TOKENS, HIDDEN, accumulate=1), "BackwardRequest.accumulate: expected bool"),
    ("head", GET_STATE, StateRequest("x"), "StateRequest.stage: expected int, got str"),
    ("tail", TAIL, TailRequest(1, HIDDEN, 3), "TailRequest.targets: expected Tensor or TensorSpec or Packed, got int"),
    ("tail", TAIL, TailRequest(1, HIDDEN, TOKENS.bool()), "targets must be token ids"),
    ("tail", TAIL, TailRequest(1, HIDDEN[0], TOKENS), "expected activations of shape [B, T, dim] floating point, got (4, 32)"),
    ("tail", TAIL, ForwardRequest(1, HIDDEN), "expected a TailRequest, got a ForwardRequest"),
]


def _malformed_requests_scenario(over_the_wire: bool):
    """Each malformed request sent to a head or tail server: through ``call`` (live: the wire decodes it), or straight to
    the handler (the simulator charges a message's ``wire_bytes``, which a malformed one does not have)."""
    computes = [TensorStageCompute(s, OptimConfig(), DenseCodec()) for s in build_stages(CFG, 2, seed=0)]

    async def scenario(runtimes):
        servers = {}
        for name, compute in zip(("head", "tail"), computes):
            servers[name] = StageServer(runtimes[name], "run", compute, AveragingConfig(10**6), throughput=1.0,
                                        bandwidth_mbps=50)
            await servers[name].start()
        handlers = {FORWARD: "handle_forward", BACKWARD: "handle_backward", TAIL: "handle_tail", GET_STATE: "handle_get_state"}
        answers = []
        for server, method, request, _ in MALFORMED:
            try:
                if over_the_wire:
                    await runtimes["client"].call(runtimes[server].peer_id, method, request, 30.0)
                else:
                    await getattr(servers[server], handlers[method])("client", request)
                answers.append("answered")
            except (RemoteError, ValueError) as error:
                answers.append(str(error))
        return answers

    return scenario


def _check_named_refusals(answers):
    for (_, method, _, named), answer in zip(MALFORMED, answers):
        assert named in answer and "internal error" not in answer, (method, answer)


def test_malformed_requests_get_a_named_refusal_not_an_internal_error():
    _check_named_refusals(run_scenario("sim", ["client", "head", "tail"], _malformed_requests_scenario(False)))


@pytest.mark.slow
def test_malformed_requests_get_a_named_refusal_on_the_live_wire_too():
    _check_named_refusals(run_scenario("swarm", ["client", "head", "tail"], _malformed_requests_scenario(True)))


# ---- exactly-once accumulation ------------------------------------------------------------------

def test_a_keyed_request_runs_once_its_duplicates_share_the_result_or_are_refused():
    sim = make_sim()
    peer = add(sim, "server")
    calls = []

    def run_batch(kind, items):
        calls.append(items)
        return [f"result of {item}" for item in items]

    queue = BatchingQueue(peer.runtime, run_batch, max_batch_requests=1)

    async def protocol():
        first = peer.runtime.spawn(queue.submit("backward", "a", 1e12, key=("trainer", 1)))
        duplicate = peer.runtime.spawn(queue.submit("backward", "a", 1e12, key=("trainer", 1)))
        other = peer.runtime.spawn(queue.submit("backward", "b", 1e12, key=("other trainer", 1)))
        results = await peer.runtime.gather([first, duplicate, other])
        try:
            await queue.submit("backward", "a", 1e12, key=("trainer", 1))
        except ValueError as late:
            results.append(str(late))
        return results

    task = peer.runtime.spawn(protocol())
    sim.run(until=task.process)
    first, duplicate, other, late = task.process.value
    assert first == duplicate == "result of a" and other == "result of b"
    assert calls == [["a"], ["b"]]  # the duplicate ran no computation
    assert "request ('trainer', 1) was already served by this peer" in late
    assert queue.duplicates == 2


def _slow_server_run(tmp_path, *extra):
    """Two servers per stage, s1p0 on 10 Mb/s links (the others on 80 Mb/s): its backwards time out at 4 s."""
    run = run_config(
        "train.request_timeout_s=4", "train.max_inflight=8", "train.schedule=async", "train.steps=12",
        "train.eval_batches=0", "topology.peers_per_stage=2", *extra,
    )
    sim_run = SimulatedRun(run, tmp_path, RunRecorder(tmp_path, run.train.steps, stream=None))
    slow = sim_run.sim.peers["s1p0"].endpoint
    slow.up.capacity = slow.down.capacity = 10e6 / 8
    return sim_run


@pytest.mark.slow
def test_a_retried_backward_is_accumulated_once_per_stage(tmp_path):
    # before request ids, 5 of 53 stage-1 backwards of this run were accumulated twice (212 samples for 192 done)
    sim_run = _slow_server_run(tmp_path)
    summary = sim_run.execute()
    assert summary["timed_out_requests"] > 0 and summary["unaccumulated_retries"] == summary["timed_out_requests"]
    assert summary["failed_requests"] == summary["timed_out_requests"]  # every failure has one named cause
    assert summary["dropped_micro_batches"] == 0 and summary["micro_batches_in_flight"] == 0
    for stage in range(4):
        accumulated = sum(s.stats.samples for s in sim_run.swarm.servers() if s.stage == stage)
        assert accumulated == summary["samples"] == 4 * summary["micro_batches_done"], stage


def test_a_backward_whose_reply_was_lost_after_it_was_served_is_not_accumulated_again(tmp_path):
    """A live call lost mid-reply (the stream closed before the reply's end) reaches the caller as a plain RPCError
    after the server ran it: the retry on the stage's other server must ask for the input gradient only."""
    run = run_config("train.steps=4", "train.eval_batches=0", "topology.peers_per_stage=2", "train.ban_s=0")
    sim_run = SimulatedRun(run, tmp_path, RunRecorder(tmp_path, run.train.steps, stream=None))
    rt = sim_run.trainers[0].rt
    served_call, lost = rt.call, []

    async def losing_the_first_stage1_backward_reply(peer, method, request, timeout):
        response = await served_call(peer, method, request, timeout)
        if method == BACKWARD and request.stage == 1 and not lost:
            lost.append(peer)
            raise RPCError(f"{method} to peer {peer} failed: 0 bytes read on a total of 1 expected bytes")
        return response

    rt.call = losing_the_first_stage1_backward_reply
    summary = sim_run.execute()
    assert lost and summary["unaccumulated_retries"] == 1 and summary["dropped_micro_batches"] == 0
    assert summary["failed_requests"] == summary["lost_requests"] == 1
    for stage in range(run.topology.num_stages):  # the lost reply's server accumulated it; the retry's did not
        accumulated = sum(s.stats.samples for s in sim_run.swarm.servers() if s.stage == stage)
        assert accumulated == summary["samples"], stage


def test_a_stopped_run_counts_its_micro_batches_in_flight(tmp_path):
    run = run_config("train.steps=50", "train.eval_batches=0", "train.max_sim_time_s=3", "train.schedule=async",
                             "topology.num_stages=2", "train.seq_len=32")
    summary = SimulatedRun(run, tmp_path, RunRecorder(tmp_path, run.train.steps, stream=None)).execute()
    assert summary["micro_batches_in_flight"] == run.train.max_inflight  # async keeps max_inflight going until the stop
    assert summary["micro_batches_started"] == (
        summary["micro_batches_done"] + summary["dropped_micro_batches"] + summary["micro_batches_in_flight"]
    )


# ---- bans ---------------------------------------------------------------------------------------

def test_the_trainer_takes_its_bans_from_the_config():
    run = run_config("train.ban_s=5", "train.max_ban_s=40")
    trainer = make_trainer(SimpleNamespace(peer_id="t"), run, [SimpleNamespace(codec=DenseCodec(), cfg=CFG)] * 4, None, 0, print)
    assert (trainer.router.ban_s, trainer.router.max_ban_s) == (5.0, 40.0)


class _RefusingTail(StageServer):
    """A tail server that announces a high throughput and refuses every request."""

    async def handle_tail(self, caller, request):
        raise ValueError("broken")


def test_a_failing_peer_is_banned_longer_each_time_and_its_estimate_falls():
    sim = make_sim(latency_s=0.01)
    computes = [TensorStageCompute(s, OptimConfig(), DenseCodec()) for s in build_stages(CFG, 2, seed=0)]
    tail_copy = TensorStageCompute(build_stages(CFG, 2, seed=0)[1], OptimConfig(), DenseCodec())
    for name, compute, cls, throughput in (("s0", computes[0], StageServer, 1.0), ("s1", computes[1], StageServer, 1.0),
                                          ("liar", tail_copy, _RefusingTail, 1e6)):
        peer = add(sim, name)
        server = cls(peer.runtime, "run", compute, AveragingConfig(10**6, progress_period_s=0.5), throughput=throughput,
                     bandwidth_mbps=100)
        peer.runtime.spawn(server.start())
    trainer_peer = add(sim, "trainer")
    batch = torch.randint(0, CFG.vocab_size, (32, 9), generator=torch.Generator().manual_seed(2))
    cfg = TrainerConfig(micro_batches=16, micro_batches_per_step=16, schedule="async", max_inflight=1, ban_s=0.05,
                        max_ban_s=10.0, discovery_period_s=0.5)
    trainer = Trainer(trainer_peer.runtime, "run", 2, FixedBatch(batch, 2), cfg, lambda record: None)
    task = trainer_peer.runtime.spawn(trainer.run())
    sim.run(until=task.process)
    liar = trainer.router.state(1, "liar")
    assert trainer.stats.micro_batches_done == 16 and trainer.stats.micro_batches_dropped == 0
    assert trainer.stats.failed_requests == liar.failures  # every failure was the liar's, none followed by a success
    assert trainer.stats.refused_requests == liar.failures  # and named: a refusal
    assert liar.failures >= 2 and liar.throughput == pytest.approx(1e6 * 0.8**liar.failures)
    assert liar.banned_until - sim.env.now <= trainer.router.ban_for(liar.failures)


# ---- no silent failure --------------------------------------------------------------------------

SLOW_LINKS = ("network.up_mbps=0.2", "network.down_mbps=0.2", "train.steps=2", "train.eval_batches=0",
              "train.max_sim_time_s=200")


def test_a_run_at_0_2_mbps_says_every_request_timed_out_and_why(tmp_path):
    run = run_config(*SLOW_LINKS)
    summary = SimulatedRun(run, tmp_path, RunRecorder(tmp_path, run.train.steps, stream=None)).execute()
    activation = 4 * 128 * 128 * 4 + 64  # a [4, 128, 128] fp32 forward response and its header
    seconds = activation * 8 / 0.2e6
    message = incomplete_run(run, summary)
    assert message.startswith(f"incomplete run: 0 of 2 steps; every request timed out ({summary['timed_out_requests']})")
    assert (f"train.request_timeout_s=30 but one activation ({activation / 1e6:.2f} MB) takes ~{seconds:.1f} s at these "
            "links (0.2 Mb/s; a backward call moves three)") in message
    assert f"{summary['dropped_micro_batches']} micro-batches dropped after train.max_retries=3" in message
    assert incomplete_run(run, {**summary, "steps": 2}) is None


def test_a_run_whose_probes_all_fail_says_so(tmp_path):
    """A probe timeout below every round trip: no peer ever gets work, and the last line says why. With compression, as
    the summary's dense twin then runs: it inherited the timeout and never started (the run hung; bug found trying it)."""
    run = run_config("train.probe_timeout_s=0.001", "train.steps=2", "train.eval_batches=0", "train.max_sim_time_s=100",
                     "compression=subspace")
    summary = SimulatedRun(run, tmp_path, RunRecorder(tmp_path, 2, stream=None)).execute()
    assert summary["steps"] == 0 and summary["failed_requests"] == 0 and summary["failed_probes"] > 0
    assert (f"incomplete run: 0 of 2 steps; it stopped at train.max_sim_time_s=100; {summary['failed_probes']} probes of "
            "listed peers got no answer within train.probe_timeout_s=0.001 (those peers got no work)") in incomplete_run(run, summary)


@pytest.mark.slow
def test_the_command_exits_non_zero_on_a_partial_run_unless_allowed(tmp_path):
    command = [sys.executable, "-m", "node0sim", MINIMAL, *SLOW_LINKS, "wandb.enabled=false"]
    refused = subprocess.run([*command, f"hydra.run.dir={tmp_path / 'a'}"], capture_output=True, text=True, timeout=600)
    assert refused.returncode == 3, refused.stderr[-2000:]
    last = refused.stderr.strip().splitlines()[-1]
    assert last.startswith("node0sim: incomplete run: 0 of 2 steps; every request timed out") and "train.allow_partial" in last
    assert json.loads((tmp_path / "a" / "summary.json").read_text())["steps"] == 0  # the outputs are written anyway
    allowed = subprocess.run([*command, "train.allow_partial=true", f"hydra.run.dir={tmp_path / 'b'}"],
                             capture_output=True, text=True, timeout=600)
    assert allowed.returncode == 0, allowed.stderr[-2000:]
    assert allowed.stdout.strip().splitlines()[-1].endswith("(accepted: train.allow_partial=true)")


def test_the_final_swarm_snapshot_is_written_once(tmp_path):
    run = run_config("train.steps=50", "train.eval_batches=0", "train.max_sim_time_s=2", "sim.snapshot_period_s=1",
                             "topology.num_stages=2", "train.seq_len=32")
    SimulatedRun(run, tmp_path, RunRecorder(tmp_path, run.train.steps, stream=None)).execute()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["time_s"] for r in records if r.get("event") == "swarm"] == [1.0, 2.0]


def test_a_lone_server_does_not_log_its_solo_steps_as_failures(caplog):
    from swarm.roles import log_solo_step

    def server(others):
        return SimpleNamespace(stage=1, epoch=7, progress=SimpleNamespace(others=lambda: others))

    with caplog.at_level(logging.INFO, logger="node0sim.swarm"):
        log_solo_step(server({}))
        assert not caplog.records
        log_solo_step(server({"peer": object()}))
    assert [r.getMessage() for r in caplog.records] == [
        "Averaging step failed: could not find a group; stepped with local gradients (stage 1, epoch 7, "
        "1 other ready peer(s) in the stage)"
    ]



@pytest.mark.parametrize("overrides,window", [
    ([], "micro_batches_per_step"),  # relayed, sync: a step's micro-batches
    (["train.schedule=async", "train.max_inflight=6", "topology.num_trainers=3"], "max_inflight"),
    (["topology.pipeline=direct"], "num_stages"),  # 1F1B
    (["topology.pipeline=direct", "topology.schedule=gpipe"], "micro_batches_per_step"),
])
def test_the_cap_on_a_callers_open_calls_is_twice_what_the_schedule_keeps_in_flight_plus_the_rest(overrides, window):
    run = run_config("train.batch_size=16", "train.micro_batch_size=4", *overrides)
    in_flight = {"micro_batches_per_step": run.train.micro_batches_per_step, "max_inflight": run.train.max_inflight,
                 "num_stages": run.topology.num_stages}[window]
    assert calls_per_caller(run) == 2 * run.topology.num_trainers * in_flight + CALLS_BEYOND_PIPELINE
