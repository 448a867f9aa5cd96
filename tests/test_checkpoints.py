"""Stage checkpoints (``node0sim/protocol/checkpoints.py``): the file, and a stage whose peers all left restored from it by
the next peer to start there, on both backends."""

import re
import time

import pytest
import torch

from node0sim.config import ConfigError
from node0sim.model import build_stages
from node0sim.protocol.averaging import AveragingConfig
from node0sim.protocol.checkpoints import CHECKPOINT_FORMAT, CheckpointError, CheckpointStore
from node0sim.protocol.codecs import DenseCodec
from node0sim.protocol.messages import GET_STATE
from node0sim.protocol.stage_compute import OptimConfig, TensorStageCompute
from node0sim.protocol.stage_server import StageServer
from node0sim.protocol.state_transfer import StateResponse
from node0sim.protocol.trainer import Trainer, TrainerConfig
from swarm.local import LocalSwarm
from tests.backends import run_scenario
from tests.runs import MINIMAL, run_config
from tests.test_pipeline import CFG, FixedBatch

STEPS, MICRO = 3, 2
"""The trainer's steps, of two micro-batches of ``MICRO`` sequences: each stage ends ``STEPS`` epochs of 2 x MICRO samples."""


def _compute(stage: int = 1, seed: int = 3) -> TensorStageCompute:
    return TensorStageCompute(build_stages(CFG, 2, seed=seed)[stage], OptimConfig(lr=1e-2, warmup_steps=0), DenseCodec())


def _server(rt, compute, store=None) -> StageServer:
    averaging = AveragingConfig(2 * MICRO, progress_period_s=1.0)
    return StageServer(rt, "run", compute, averaging, throughput=1.0, bandwidth_mbps=50, checkpoints=store)


async def _refuse(caller, request):
    raise ValueError("this peer is gone")


def _state(compute: TensorStageCompute) -> dict[str, torch.Tensor]:
    return dict(compute.export_state().parts)


def _train_then_replace_the_tail(backend: str, store: CheckpointStore, joiner_compute: TensorStageCompute, leaves: bool = True):
    """Two stages, the tail's server saving checkpoints into ``store``: a trainer trains ``STEPS`` steps, the tail server
    leaves (its stage is empty; ``leaves`` false: it stays announced but refuses to send its state, as a crashed peer
    whose record outlives it), then another server starts there. The old and the new tail server."""
    batch = torch.randint(0, CFG.vocab_size, (2 * MICRO * STEPS, 17), generator=torch.Generator().manual_seed(0))

    async def scenario(runtimes):
        head, tail = _server(runtimes["s0"], _compute(stage=0)), _server(runtimes["s1"], _compute(), store)
        for server in (head, tail):
            await server.start()
        config = TrainerConfig(micro_batches=2 * STEPS, micro_batches_per_step=2, schedule="sync")
        stats = await Trainer(runtimes["trainer"], "run", 2, FixedBatch(batch, MICRO), config, lambda record: None).run()
        assert stats.micro_batches_done == 2 * STEPS
        if leaves:
            await tail.leave()
        else:
            runtimes["s1"].serve(GET_STATE, _refuse)
        joiner = _server(runtimes["s1b"], joiner_compute, store)
        await joiner.start(load_state=True)
        return tail, joiner

    return run_scenario(backend, ["trainer", "s0", "s1", "s1b"], scenario)


@pytest.mark.parametrize("backend", ["sim", pytest.param("swarm", marks=pytest.mark.slow)])
def test_a_stage_whose_peers_all_left_is_restored_from_its_checkpoint_by_the_next_peer(backend, tmp_path):
    store = CheckpointStore(tmp_path / "checkpoints", "run", every_epochs=1)
    fresh = _compute(seed=4)  # other initial weights: the restore, not the seed, makes the two equal
    tail, joiner = _train_then_replace_the_tail(backend, store, fresh)
    assert tail.epoch == STEPS and tail.stats.checkpoints_saved == STEPS and tail.stats.failed_checkpoints == 0
    assert joiner.stats.checkpoint_restores == 1 and joiner.epoch == STEPS and joiner.ready and not joiner.exited
    saved, restored = _state(tail.compute), _state(joiner.compute)
    assert saved.keys() == restored.keys()
    for key in saved:
        torch.testing.assert_close(restored[key], saved[key], atol=0, rtol=0)
    assert joiner.compute.optimizer.state_dict()["state"].keys() == tail.compute.optimizer.state_dict()["state"].keys()
    assert sorted(p.name for p in store.directory.iterdir()) == ["stage-1.pt"]  # no partial file left


def test_a_peer_whose_download_from_the_stage_failed_restores_the_checkpoint(tmp_path):
    tail, joiner = _train_then_replace_the_tail("sim", CheckpointStore(tmp_path, "run", every_epochs=1), _compute(seed=4), leaves=False)
    assert joiner.stats.failed_state_downloads >= 1 and joiner.stats.state_downloads == 0
    assert joiner.stats.checkpoint_restores == 1 and joiner.epoch == STEPS and joiner.ready
    torch.testing.assert_close(joiner.compute.parameter_values(None), tail.compute.parameter_values(None), atol=0, rtol=0)


def test_a_checkpoint_of_another_model_exits_the_peer_with_the_reason_and_is_kept(tmp_path):
    store = CheckpointStore(tmp_path, "run", every_epochs=1)
    wider = TensorStageCompute(build_stages(CFG.__class__(**{**CFG.__dict__, "dim": 2 * CFG.dim}), 2, seed=3)[1],
                               OptimConfig(lr=1e-2, warmup_steps=0), DenseCodec())
    store.save(1, StateResponse(5, wider.export_state()))
    before = store.path(1).read_bytes()

    async def scenario(runtimes):
        joiner = _server(runtimes["s1"], _compute(), store)
        await joiner.start(load_state=True)
        return joiner

    joiner = run_scenario("sim", ["s1"], scenario)
    assert joiner.exited and joiner.stats.watchdog_exit == "failed_state_loads" and not joiner.ready
    assert str(store.path(1)) in joiner.stats.checkpoint_error and "stage 1" in joiner.stats.checkpoint_error
    assert store.path(1).read_bytes() == before


def test_a_failed_save_is_counted_and_the_stage_keeps_stepping(tmp_path):
    (tmp_path / "taken").write_text("a file where the folder should be")
    tail, _ = _train_then_replace_the_tail("sim", CheckpointStore(tmp_path / "taken", "run", every_epochs=1), _compute())
    assert tail.epoch == STEPS and tail.stats.checkpoints_saved == 0 and tail.stats.failed_checkpoints == STEPS
    assert "cannot write it" in tail.stats.checkpoint_error and str(tmp_path / "taken") in tail.stats.checkpoint_error


def test_every_epochs_saves_only_the_epochs_it_names(tmp_path):
    tail, joiner = _train_then_replace_the_tail("sim", CheckpointStore(tmp_path, "run", every_epochs=2), _compute(seed=4))
    assert tail.stats.checkpoints_saved == STEPS // 2 and joiner.epoch == 2 * (STEPS // 2)


def _saved(tmp_path, **content) -> CheckpointStore:
    store = CheckpointStore(tmp_path, "run", every_epochs=1)
    store.save(0, StateResponse(2, _compute(stage=0).export_state()))
    if content:
        torch.save({**torch.load(store.path(0), weights_only=True), **content}, store.path(0))
    return store


@pytest.mark.parametrize("content,message", [
    ({"run_id": "other"}, "a checkpoint of run_id 'other', this peer needs 'run'"),
    ({"stage": 1}, "a checkpoint of stage 1, this peer needs 0"),
    ({"format": CHECKPOINT_FORMAT + 1}, f"checkpoint format {CHECKPOINT_FORMAT + 1}, this version reads {CHECKPOINT_FORMAT}"),
    ({"epoch": -1}, "malformed checkpoint (epoch -1"),
])
def test_a_checkpoint_of_another_run_stage_or_format_is_refused_naming_the_file(tmp_path, content, message):
    store = _saved(tmp_path, **content)
    with pytest.raises(CheckpointError, match="stage-0.pt") as refused:
        store.load(0)
    assert message in str(refused.value)


def test_a_truncated_or_foreign_file_is_refused_and_a_missing_one_is_no_checkpoint(tmp_path):
    store = _saved(tmp_path)
    assert store.load(0).epoch == 2 and store.load(1) is None
    store.path(0).write_bytes(store.path(0).read_bytes()[:100])
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        store.load(0)
    torch.save(torch.nn.Linear(2, 2), store.path(0))  # a pickled module: refused by the weights-only loader
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        store.load(0)


@pytest.mark.parametrize("overrides,message", [
    (["backend=swarm", "swarm.checkpoint_every_epochs=0"], "swarm.checkpoint_every_epochs: must be >= 1, got 0"),
    (["swarm.checkpoint_dir=/tmp/x"], "swarm.checkpoint_dir: checkpoints are kept by live stage servers (backend=swarm)"),
])
def test_checkpoint_settings_fail_fast_with_the_key_named(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        run_config(*overrides)


LIVE = ["topology.num_stages=2", "train.batch_size=8", "train.micro_batch_size=4", "train.seq_len=32", "train.eval_batches=1",
        "wandb.enabled=false", "run_id=checkpoint-test", MINIMAL]


def _wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


@pytest.mark.slow
def test_a_killed_tail_server_restarted_with_its_checkpoint_dir_resumes_its_stage_and_training_goes_on(tmp_path, private_runtime_dir):
    """The user's flow: the only server of a stage keeps checkpoints, is killed (its record outlives it, so the restarted
    server's download from it fails first), and a server started with the same folder takes the stage up where it was."""
    folder, store = tmp_path / "checkpoints", CheckpointStore(tmp_path / "checkpoints", "checkpoint-test", every_epochs=1)
    with LocalSwarm(LIVE, tmp_path / "peers") as swarm:
        swarm.start_bootstrap()
        swarm.start_server("s0", 0)
        swarm.start_server("s1", 1, f"swarm.checkpoint_dir={folder}")
        trainer = swarm.start("trainer", "trainer", f"hydra.run.dir={tmp_path / 'a'}", "train.steps=4")
        assert trainer.wait(timeout=300) == 0, swarm.log_tail("trainer")
        _wait_for(lambda: store.path(1).exists() and store.load(1).epoch == 4, 60, "the checkpoint of epoch 4")
        swarm.kill("s1")
        swarm.start_server("s1b", 1, f"swarm.checkpoint_dir={folder}")
        restored = "Restored stage 1 from its checkpoint"
        _wait_for(lambda: restored in swarm.log_tail("s1b", 200), 180, "the restarted server's restore")
        assert f"{store.path(1)} (epoch 4)" in swarm.log_tail("s1b", 200)
        trainer = swarm.start("trainer2", "trainer", f"hydra.run.dir={tmp_path / 'b'}", "train.steps=2")
        assert trainer.wait(timeout=300) == 0, swarm.log_tail("trainer2")
        _wait_for(lambda: store.load(1).epoch == 6, 60, "the restored server's own checkpoint of epoch 6")
