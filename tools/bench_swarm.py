"""What the live swarm costs on loopback, measured against baselines from the same run.

    .venv/bin/python tools/bench_swarm.py hop [--repeats 20]        # per-hop overhead of one stage
    .venv/bin/python tools/bench_swarm.py throughput [--steps 40]   # local swarm vs the simulator's prediction
    .venv/bin/python tools/bench_swarm.py admission [--repeats 20]  # what admission and the idle check cost
    .venv/bin/python tools/bench_swarm.py checkpoint [--repeats 20] # a stage checkpoint's save and restore
    .venv/bin/python tools/bench_swarm.py dial [--repeats 20]       # a call to a peer id no peer has

``hop``: forward + backward through a 1-layer stage served by a live peer (two hivemind nodes in this
process, real libp2p streams over 127.0.0.1, the protocol's StageServer, the stage on ``--device``:
CUDA when available) against the same work in raw PyTorch on the same layer and device; small
(d=128, 4 x 128 tokens) and medium (d=1024, 2 x 256 tokens) activations.

``throughput``: a ``swarm.role=local`` run (bootstrap, 2 stage servers, 1 trainer: separate processes,
one torch thread each) against the simulator on the same topology with loopback-like settings (10 Gb/s,
0.1 ms, the "GPU" calibrated to this CPU's measured single-thread matmul rate).

``admission``: the size of an admission token, one check of it (signature verified, and cached), and a 32 MB request
between two live peers with the server's idle check (``request_idle_s`` = ``train.request_timeout_s``) against the
same request without it, interleaved.

``checkpoint``: saving the medium 1-layer stage's checkpoint (``swarm.checkpoint_dir``: its state exported, written,
synced and renamed into place) and restoring it (read and applied), against writing (and syncing) and reading the same
number of bytes as one raw file, in a temporary folder on this machine's disk, interleaved.

``dial``: four live nodes on loopback; one calls a peer id that no peer has (a fresh key's), which fails once p2pd's
peer lookup finds no address, against a DHT get of a missing key and a refused call to a live peer (one round trip),
interleaved. The simulator charges such a call one DHT lookup (``sim.dht_latency_ms``) before it fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from node0sim.model import ModelConfig, build_stages  # noqa: E402
from node0sim.protocol.averaging import AveragingConfig  # noqa: E402
from node0sim.protocol.codecs import DenseCodec  # noqa: E402
from node0sim.protocol.messages import BACKWARD, FORWARD, BackwardRequest, ForwardRequest  # noqa: E402
from node0sim.protocol.stage_compute import OptimConfig, TensorStageCompute  # noqa: E402
from node0sim.protocol.stage_server import StageServer  # noqa: E402
from node0sim.sim.gpus import gpu_profile  # noqa: E402
from tools.timing import median_seconds  # noqa: E402

SIZES = {  # name: (dim, heads, kv heads, batch, tokens per sequence)
    "small": (128, 4, 2, 4, 128),
    "medium": (1024, 16, 4, 2, 256),
}
LOOPBACK = ["network=datacenter", "network.latency_ms=0.1", "network.up_mbps=10000", "network.down_mbps=10000"]


def one_layer_stage(dim: int, heads: int, kv_heads: int, seq_len: int, device: str) -> TensorStageCompute:
    """The middle stage (1 transformer layer) of a 3-layer, 3-stage Llama, on ``device``."""
    cfg = ModelConfig(
        name="bench", vocab_size=257, dim=dim, n_layers=3, n_heads=heads, n_kv_heads=kv_heads, ffn_dim_multiplier=None,
        multiple_of=64, rope_theta=10000.0, max_seq_len=seq_len, qk_norm=True, norm_reorder=True, trainable_rmsnorm=False,
    )
    return TensorStageCompute(build_stages(cfg, 3, seed=0)[1], OptimConfig(lr=3e-4, warmup_steps=0), DenseCodec(), device=device)


def raw_pytorch(compute: TensorStageCompute, x: torch.Tensor, grad: torch.Tensor):
    """The work a forward + backward request pair does, as plain PyTorch on the stage's device: a forward
    without autograd, then forward + backward again (backward recomputes the forward from the resent input)."""
    module, device = compute.module, compute.device
    x, grad = x.to(device), grad.to(device)

    def run() -> None:
        with torch.no_grad():
            module(x)
        module(x.detach().requires_grad_(True)).backward(grad)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return run


async def hop_ms(compute: TensorStageCompute, x: torch.Tensor, grad: torch.Tensor, repeats: int) -> float:
    """Median ms of forward + backward RPCs to a live peer serving ``compute``."""
    from swarm.node import LiveNode, NodeSettings

    server_node = await LiveNode.start(NodeSettings())
    client = await LiveNode.start(NodeSettings(initial_peers=tuple(server_node.visible_maddrs)))
    try:
        averaging = AveragingConfig(10**9, progress_period_s=5.0)
        server = StageServer(server_node.runtime, "bench", compute, averaging, throughput=1.0, bandwidth_mbps=1e4)
        await server.start()
        peer, rt = server_node.runtime.peer_id, client.runtime
        times = []
        for attempt in range(repeats + 1):
            start = time.perf_counter()
            await rt.call(peer, FORWARD, ForwardRequest(1, x), 60)
            await rt.call(peer, BACKWARD, BackwardRequest(1, x, grad), 60)
            if attempt:  # the first round trip opens the connection
                times.append(time.perf_counter() - start)
        return 1000 * statistics.median(times)
    finally:
        await client.stop()
        await server_node.stop()


def bench_hop(repeats: int, device: str) -> None:
    """Print the per-hop table: a stage peer's forward + backward vs raw PyTorch on the same layer."""
    print(f"device {device}; {'size':8} {'message':>10} {'raw PyTorch ms':>15} {'via swarm ms':>13} "
          f"{'overhead ms':>12} {'ratio':>6}")
    for name, (dim, heads, kv_heads, batch, seq_len) in SIZES.items():
        compute = one_layer_stage(dim, heads, kv_heads, seq_len, device)
        x = torch.randn(batch, seq_len, dim)
        grad = torch.randn(batch, seq_len, dim)
        local = 1000 * median_seconds(raw_pytorch(compute, x, grad), repeats)
        remote = asyncio.run(hop_ms(compute, x, grad, repeats))
        print(f"{'':{len(device) + 9}}{name:8} {x.numel() * 4 / 2**20:>8.2f}MB {local:>15.2f} {remote:>13.2f} "
              f"{remote - local:>12.2f} {remote / local:>6.2f}")


def bench_throughput(steps: int) -> None:
    """Print live vs simulated steady tokens/s for 2 stages x 1 server, one trainer."""
    from node0sim.app import compose_run_config
    from node0sim.sim.runner import run_simulation
    from swarm.roles import measured_flops

    common = ["experiment=minimal", "topology.num_stages=2", "train.batch_size=8", "train.micro_batch_size=4", "train.seq_len=128",
              "train.eval_batches=0", "wandb.enabled=false", f"train.steps={steps}"]
    with tempfile.TemporaryDirectory() as out:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "NODE0SIM_RUNTIME_DIR": tempfile.mkdtemp(prefix="n0-")}
        subprocess.run([sys.executable, "-m", "node0sim", "backend=swarm", "swarm.role=local", *common,
                        f"hydra.run.dir={out}/live"], env=env, check=True, stdout=subprocess.DEVNULL)
        live = json.loads((Path(out) / "live/summary.json").read_text())
        torch.set_num_threads(1)  # each live peer runs with one torch thread
        flops = measured_flops(torch.device("cpu"))
        utilization = flops / gpu_profile("rtx3090").peak_flops
        run = compose_run_config(*common, *LOOPBACK, "sim.gpu=rtx3090", f"sim.utilization={utilization}")
        simulated = run_simulation(run, Path(out) / "sim")
    print(f"this CPU, one thread: {flops / 1e9:.1f} GFLOP/s (the simulated GPU's peak x utilization)")
    for label, summary in (("live swarm (loopback)", live), ("simulator prediction", simulated)):
        print(f"{label:24} steady {summary['tokens_per_s_steady']:>8.0f} tok/s, overall {summary['tokens_per_s']:>8.0f} tok/s")
    print(f"live / predicted (steady): {live['tokens_per_s_steady'] / simulated['tokens_per_s_steady']:.2f}")


def bench_admission(repeats: int) -> None:
    import timeit

    from node0sim.config import TrainConfig
    from node0sim.protocol.averaging import Ack, ReducePart
    from swarm import admission
    from swarm.lifecycle import ensure_identity, fingerprint, rsa_peer_id

    with tempfile.TemporaryDirectory() as folder:
        organizer = ensure_identity(Path(folder) / "organizer.key")
        peer = rsa_peer_id(ensure_identity(Path(folder) / "peer.key").get_public_key().to_bytes())
    token = admission.issue(organizer, "bench", peer, time.time() + 3600).to_bytes()
    rule = admission.Admission("bench", fingerprint(organizer.get_public_key().to_bytes()))

    def uncached() -> None:
        admission._verified.cache_clear()
        rule.check(token, peer, time.time())

    print(f"token: {len(token)} bytes")
    print(f"check: {timeit.timeit(uncached, number=200) / 200 * 1e6:.0f} us uncached, "
          f"{timeit.timeit(lambda: rule.check(token, peer, time.time()), number=2000) / 2000 * 1e6:.1f} us cached")

    async def requests() -> dict[float | None, list[float]]:
        from swarm.node import LiveNode, NodeSettings

        server = await LiveNode.start(NodeSettings())
        client = await LiveNode.start(NodeSettings(initial_peers=tuple(server.visible_maddrs)))
        try:
            server.runtime.serve("reduce_part", lambda caller, msg: asyncio.sleep(0, Ack()))
            part = ReducePart(0, "t", torch.ones(8 * 2**20), 1.0)  # 32 MB of float32
            times: dict[float | None, list[float]] = {None: [], TrainConfig.request_timeout_s: []}
            await client.runtime.call(server.runtime.peer_id, "reduce_part", part, 60)  # warm-up
            for _ in range(repeats):
                for idle in times:
                    server.runtime.request_idle_s = idle
                    started = time.perf_counter()
                    await client.runtime.call(server.runtime.peer_id, "reduce_part", part, 60)
                    times[idle].append(time.perf_counter() - started)
            return times
        finally:
            await client.stop()
            await server.stop()

    times = asyncio.run(requests())
    without, with_check = (statistics.median(t) * 1000 for t in times.values())
    print(f"32 MB request, median of {repeats}: {without:.0f} ms without the idle check, {with_check:.0f} ms with it "
          f"({with_check / without:.2f}x)")


def bench_checkpoint(repeats: int) -> None:
    from node0sim.protocol.checkpoints import CheckpointStore
    from node0sim.protocol.state_transfer import StateResponse

    dim, heads, kv_heads, _, seq_len = SIZES["medium"]
    compute = one_layer_stage(dim, heads, kv_heads, seq_len, "cpu")
    compute.step_with(torch.zeros(compute.num_trainable))  # the optimizer's state exists, as after a first step
    with tempfile.TemporaryDirectory() as folder:
        store = CheckpointStore(Path(folder), "bench", every_epochs=1)
        raw = Path(folder) / "raw.bin"

        def save() -> None:
            store.save(compute.index, StateResponse(1, compute.export_state()))

        def write_raw() -> None:
            with open(raw, "wb") as file:
                file.write(payload)
                file.flush()
                os.fsync(file.fileno())

        save()
        payload = os.urandom(store.path(compute.index).stat().st_size)
        times: dict[str, list[float]] = {"save": [], "raw write": [], "restore": [], "raw read": []}
        def restore() -> None:
            compute.import_state(store.load(compute.index).state)

        for _ in range(repeats):
            for name, run in (("save", save), ("raw write", write_raw), ("restore", restore), ("raw read", raw.read_bytes)):
                started = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - started)
    ms = {name: statistics.median(t) * 1000 for name, t in times.items()}
    print(f"checkpoint of a 1-layer d={dim} stage: {len(payload) / 1e6:.1f} MB on disk, median of {repeats}")
    print(f"save {ms['save']:.0f} ms, raw write {ms['raw write']:.0f} ms ({ms['save'] / ms['raw write']:.2f}x); "
          f"restore {ms['restore']:.0f} ms, raw read {ms['raw read']:.0f} ms ({ms['restore'] / ms['raw read']:.2f}x)")


def bench_dial(repeats: int) -> None:
    from hivemind.utils.crypto import RSAPrivateKey

    from node0sim.protocol.state_transfer import StateRequest
    from node0sim.runtime import RemoteError, RPCError
    from swarm.lifecycle import rsa_peer_id
    from swarm.node import LiveNode, NodeSettings

    async def measure() -> dict[str, list[float]]:
        nodes = [await LiveNode.start(NodeSettings())]
        for _ in range(3):
            nodes.append(await LiveNode.start(NodeSettings(initial_peers=tuple(nodes[0].visible_maddrs))))
        client, server = nodes[-1].runtime, nodes[0].runtime
        unknown = [rsa_peer_id(RSAPrivateKey().get_public_key().to_bytes()) for _ in range(repeats)]
        errors: dict[str, str] = {}

        async def call(peer: str, expected: type[Exception]) -> None:
            try:
                await client.call(peer, "bench_unserved", StateRequest(0), 30)
            except expected as error:
                errors[expected.__name__] = str(error)
                return
            raise AssertionError(f"the call to {peer} did not fail with {expected.__name__}")

        times: dict[str, list[float]] = {"unknown peer id": [], "DHT get of a missing key": [], "refused call": []}
        try:
            await client.dht_get("bench/warm-up")
            for peer in unknown:
                for name, run in (("unknown peer id", lambda: call(peer, RPCError)),
                                  ("DHT get of a missing key", lambda: client.dht_get(f"bench/{peer}")),
                                  ("refused call", lambda: call(server.peer_id, RemoteError))):
                    started = time.perf_counter()
                    await run()
                    times[name].append(time.perf_counter() - started)
        finally:
            for node in nodes:
                await node.stop()
        print(f"the unknown id's error: {errors['RPCError']}")
        return times

    times = asyncio.run(measure())
    ms = {name: statistics.median(t) * 1000 for name, t in times.items()}
    print(f"4 live nodes on loopback, median of {repeats}: " + ", ".join(f"{name} {value:.2f} ms" for name, value in ms.items()))
    print(f"unknown peer id / DHT get: {ms['unknown peer id'] / ms['DHT get of a missing key']:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["hop", "throughput", "admission", "checkpoint", "dial"])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="hop: the stage's device")
    args = parser.parse_args()
    if args.what == "hop":
        bench_hop(args.repeats, args.device)
    elif args.what == "admission":
        bench_admission(args.repeats)
    elif args.what == "checkpoint":
        bench_checkpoint(args.repeats)
    elif args.what == "dial":
        bench_dial(args.repeats)
    else:
        bench_throughput(args.steps)


if __name__ == "__main__":
    main()
