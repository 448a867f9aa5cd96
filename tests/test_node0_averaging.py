"""Node0's averaging-side mechanisms on the simulator (virtual time): warm-started PowerSGD and its Q handed
to joiners, the tail left uncompressed, partition state averaging with optimizer state, equal all-reduce parts,
the optimizer lock that blocks backward while a stage averages, and the watchdog."""

import copy

import pytest
import torch

from node0sim.app import compose_run_config
from node0sim.model import build_stages
from node0sim.protocol.averaging import AveragingConfig, GroupAverager
from node0sim.protocol.codecs import DenseCodec
from node0sim.protocol.powersgd import PowerSGD
from node0sim.protocol.stage_compute import CostStageCompute, OptimConfig, TensorStageCompute
from node0sim.protocol.stage_server import StageServer
from node0sim.summary import ServerTotals
from node0sim.assembly import server_report
from tests.simutil import add, make_sim
from tests.test_pipeline import CFG
from tests.test_swarm_protocol import _run, _servers_of


def _spectrum_matrix(m: int, n: int, singular_values: list[float], seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(m, m, generator=generator)).Q[:, : len(singular_values)]
    v = torch.linalg.qr(torch.randn(n, n, generator=generator)).Q[:, : len(singular_values)]
    return u @ torch.diag(torch.tensor(singular_values)) @ v.T


def _best_rank(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(matrix)
    return u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank]


def _powersgd_rounds(states: dict, gradients_per_round: list[dict], samples: dict) -> list[dict]:
    """Run PowerSGD rounds among ``states`` (name -> PowerSGD) on a simulated stage; per round, name -> (mean, contributors)."""
    sim = make_sim(latency_s=0.01)
    peers = {name: add(sim, name) for name in states}
    averagers = {name: GroupAverager(peer.runtime, 0, AveragingConfig(8, averaging_timeout_s=10.0)) for name, peer in peers.items()}
    for averager in averagers.values():
        averager.serve()
    members = sorted(states)
    outcomes = []
    for round_, gradients in enumerate(gradients_per_round):
        tasks = {
            name: peers[name].runtime.spawn(state.average(
                averagers[name], f"g{round_}", members, [1.0] * len(members), gradients[name] * samples[name], samples[name], round_,
            ))
            for name, state in states.items()
        }
        sim.run(until=sim.env.all_of([t.process for t in tasks.values()]))
        outcomes.append({name: task.process.value for name, task in tasks.items()})
    return outcomes


# ---- PowerSGD -----------------------------------------------------------------------------------

def test_warm_started_q_converges_to_the_best_rank_r_mean_and_a_fresh_q_does_not():
    shape, rank = (40, 30), 3
    mean = _spectrum_matrix(*shape, [10.0, 8.0, 6.0, 1.0, 0.5], seed=0)
    best = _best_rank(mean, rank)
    spread = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    gradients = {"a": (mean + spread).reshape(-1), "b": (mean - spread).reshape(-1)}  # equal weights: the mean is `mean`

    def errors(warm_start: bool) -> list[float]:
        states = {n: PowerSGD([shape], rank, warm_start=warm_start, init_seed=5) for n in gradients}
        result = []
        for _ in range(8):
            for state in states.values():
                state.errors.clear()  # every round compresses the same mean (no error feedback)
            (outcome,) = _powersgd_rounds(states, [gradients], {"a": 2, "b": 2})
            result.append(float((outcome["a"][0].view(shape) - best).norm() / best.norm()))
        return result

    warm, fresh = errors(True), errors(False)
    # power iteration: the error shrinks by about sigma_4 / sigma_3 = 1/6 per round, from the first round's
    assert next(i for i, e in enumerate(warm) if e < 1e-4) <= 5
    assert min(fresh) > 1e-2  # one power step from a random Q every round: never better than the first


def test_a_joiner_that_received_q_continues_exactly_like_the_peer_it_replaced():
    shape, rank, names = (24, 16), 2, ("a", "b", "c")
    generator = torch.Generator().manual_seed(0)
    column_space = torch.linalg.qr(torch.randn(shape[0], rank, generator=generator)).Q
    # rounds whose gradients share one rank-2 column space: the local error stays ~0, so Q is all a peer carries
    low_rank = [{n: (column_space @ torch.randn(rank, shape[1], generator=generator)).reshape(-1) for n in names} for _ in range(3)]
    full_rank = {n: torch.randn(shape, generator=generator).reshape(-1) for n in names}
    samples = dict.fromkeys(names, 1)
    before = {n: PowerSGD([shape], rank, warm_start=True, init_seed=3) for n in names}
    _powersgd_rounds(before, low_rank, samples)
    assert float(before["c"].errors[0].abs().max()) < 1e-4

    def next_round(joiner_gets_q: bool | None) -> dict:
        """The full-rank round with c as it was (None), or replaced by a joiner with or without the donor a's Q."""
        states = copy.deepcopy(before)
        if joiner_gets_q is not None:
            states["c"] = PowerSGD([shape], rank, warm_start=True, init_seed=3)
            if joiner_gets_q:
                states["c"].import_queries(states["a"].export_queries())  # what a state download carries
        (outcome,) = _powersgd_rounds(states, [full_rank], samples)
        return {"mean": outcome["c"][0], "q": states["c"].queries[0]}

    stayed, joined, uninformed = next_round(None), next_round(True), next_round(False)
    torch.testing.assert_close(joined["mean"], stayed["mean"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(joined["q"], stayed["q"], atol=1e-4, rtol=1e-4)
    assert float((uninformed["mean"] - stayed["mean"]).abs().max()) > 1e-2  # without Q it would not
