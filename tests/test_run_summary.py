"""The summary both backends write, the servers' exit reports, and the bytes the live all-reduces count."""

import json

import pytest
import torch

from node0sim.app import incomplete_run
from node0sim.assembly import method_bytes, micro_batch_share, trainer_steps
from node0sim.metrics import SUMMARY_KEYS
from node0sim.protocol.averaging import AveragingConfig, GroupAverager
from node0sim.protocol.messages import AVERAGING_METHODS
from node0sim.summary import RunSummary, ServerReport, ServerTotals, TrainerTotals, with_server_reports
from tests.backends import run_scenario
from tests.runs import run_config


def _report(name: str, stage: int, **counters) -> ServerReport:
    zero = dict(epoch=1, samples=8, averaging_rounds=0, solo_steps=0, state_averaging_rounds=0, state_downloads=0,
                failed_state_downloads=0, averaging_timeouts=0, request_calls=0, batched_requests=0)
    return ServerReport(peer_id=f"id-{name}", stage=stage, **(zero | counters))


def test_a_summary_is_one_flat_object_with_every_summary_key():
    summary = RunSummary(
        backend="sim", numerics=True, model="tiny", seed=0, num_stages=2, num_trainers=1, schedule="sync", compression="none",
        compression_rate=1.0, churn="none", steps=1, samples=4, tokens=64, sim_time_s=1.0, wall_time_s=0.1, tokens_per_s=64.0,
        tokens_per_s_steady=None, loss_first=None, loss_last=None, val_loss=None, activation_bytes_per_token=None,
        micro_batches_started=1, micro_batches_done=1, micro_batches_in_flight=0, rpc_bytes_per_stage=[0, 0],
        trainer_totals=TrainerTotals(0, 0, 0, 0, 0, 0, 10),
        servers=ServerTotals(),
    ).as_dict()
    assert tuple(summary) == SUMMARY_KEYS
    assert summary["bytes_sent"] == 10 and summary["averaging_rounds"] is None
    assert len(SUMMARY_KEYS) == len(set(SUMMARY_KEYS))


def test_server_totals_sum_the_reports_and_the_local_role_keeps_them_by_name():
    reports = {
        "s0p0": _report("s0p0", 0, averaging_rounds=3, request_calls=4, batched_requests=6, averaging_bytes=100,
                        state_download_bytes=0, failed_rounds=2, refused_values=5, declined_state_downloads=1),
        "s1p0": _report("s1p0", 1, averaging_rounds=2, request_calls=2, batched_requests=2, averaging_bytes=50,
                        state_download_bytes=7, state_downloads=1, failed_rounds=1, declined_state_downloads=2),
    }
    summary = with_server_reports({"steps": 3}, reports, num_stages=3, num_peers=2)
    assert summary["failed_rounds"] == 3 and summary["refused_values"] == 5 and summary["declined_state_downloads"] == 3
    assert summary["averaging_rounds"] == 5 and summary["request_calls"] == 6 and summary["mean_requests_per_call"] == 8 / 6
    assert summary["averaging_bytes"] == 150 and summary["state_download_bytes"] == 7 and summary["state_downloads"] == 1
    assert summary["final_peers_per_stage"] == [1, 1, 0] and summary["num_peers"] == 2 and summary["steps"] == 3
    assert [r["name"] for r in summary["server_reports"]] == ["s0p0", "s1p0"]
    written = json.loads(json.dumps(summary["server_reports"][1]))
    assert ServerReport.from_dict(written) == reports["s1p0"]


def test_the_trainers_invalid_replies_reach_the_summary():
    from node0sim.assembly import trainer_totals
    from node0sim.protocol.trainer import TrainerStats

    assert trainer_totals([TrainerStats(invalid_replies=2), TrainerStats(invalid_replies=1)], 0).invalid_replies == 3


def test_the_micro_batches_are_split_across_trainers_without_loss():
    run = run_config("train.steps=5", "train.batch_size=12", "train.micro_batch_size=4", "topology.num_trainers=2",
                             "train.schedule=async")
    shares = [micro_batch_share(run, i) for i in range(2)]
    assert shares == [8, 7] and sum(shares) == 5 * run.train.micro_batches_per_step


def test_a_live_trainer_of_several_is_complete_after_its_own_share_of_the_steps():
    """Bug: each live trainer of two expected all ``train.steps`` and exited 3 ("incomplete run: 8 of 16 steps")."""
    run = run_config("train.steps=16", "train.batch_size=8", "train.micro_batch_size=4", "topology.num_trainers=2",
                     "train.schedule=async")
    assert [trainer_steps(run, i) for i in range(2)] == [8, 8]
    assert trainer_steps(run_config("train.steps=16"), 0) == 16
    done = {"steps": 8, "backend": "swarm"}
    assert incomplete_run(run, done, trainer_steps(run, 0)) is None
    assert incomplete_run(run, {**done, "steps": 7, "timed_out_requests": 0, "no_peer_requests": 0, "failed_requests": 0,
                                "failed_probes": 0, "dropped_micro_batches": 0, "micro_batches_in_flight": 0},
                          trainer_steps(run, 0)).startswith("incomplete run: 7 of 8 steps")


@pytest.mark.slow
@pytest.mark.parametrize("averager", ["protocol", "hivemind"])
def test_a_live_all_reduce_counts_the_bytes_it_sends(averager):
    """``averaging_bytes`` of a live run: both all-reduces add what they send to the runtime's per-method counters."""
    vector = torch.arange(20_000.0)

    async def scenario(runtimes):
        averager_class = GroupAverager
        if averager == "hivemind":
            from swarm.allreduce import HivemindGroupAverager, install

            for rt in runtimes.values():
                await install(rt)
            averager_class = HivemindGroupAverager
        averagers = [averager_class(rt, 0, AveragingConfig(8, averaging_timeout_s=20.0)) for rt in runtimes.values()]
        for a in averagers:
            a.serve()
        members = sorted(rt.peer_id for rt in runtimes.values())
        tasks = [rt.spawn(a.all_reduce("r", members, [1.0, 1.0], vector, 1.0)) for rt, a in zip(runtimes.values(), averagers)]
        await runtimes["a"].gather(tasks)
        return [dict(rt.sent_bytes) for rt in runtimes.values()]

    vector_bytes = vector.numel() * 4
    for sent in run_scenario("swarm", ["a", "b"], scenario):
        # each member sends the other's half of its vector, and its own averaged half back
        for method in AVERAGING_METHODS:
            assert vector_bytes / 2 * 0.9 < sent.get(method, 0) < vector_bytes / 2 * 1.2, (method, sent)
        assert method_bytes(sent, AVERAGING_METHODS) > vector_bytes * 0.9
