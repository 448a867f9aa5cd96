"""Codec cost (encode + decode, forward and gradient) relative to the stage's own forward time.

    .venv/bin/python tools/bench_codec.py [--repeats 20]

For the tiny model (d=128) and a mid-size one (d=1024, 8 layers, 2 per stage) it times, in the
same run, one body stage's forward pass and each codec's compress + decompress of that stage's
output, and prints the ratio (lower is better; the subspace codec's target is "negligible").
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from node0sim.model import ModelConfig, build_stages  # noqa: E402
from node0sim.model.subspace import make_basis  # noqa: E402
from node0sim.protocol.codecs import make_codec, rank_for  # noqa: E402
from tools.timing import median_seconds  # noqa: E402

MODELS = {
    "tiny": (ModelConfig("tiny", 257, 128, 4, 4, 2, None, 64, 10000.0, 256, True, True, False), 4, 8, 128),
    "mid": (ModelConfig("mid", 32000, 1024, 8, 16, 4, None, 256, 10000.0, 512, True, True, False), 4, 4, 512),
}
"""name: (config, num_stages, batch, seq_len)"""

CODECS = [("subspace", 8), ("subspace", 32), ("topk", 8), ("quantize", 1)]


def measure(name: str, repeats: int) -> list[tuple[str, float, float, float]]:
    """Rows of (codec, codec ms, stage forward ms, ratio) for model ``name``."""
    cfg, num_stages, batch, seq_len = MODELS[name]
    stage = build_stages(cfg, num_stages, seed=0)[1]
    ids = torch.randint(0, cfg.vocab_size, (batch, seq_len))
    x = torch.randn(batch, seq_len, cfg.dim)
    with torch.no_grad():
        forward_ms = 1e3 * median_seconds(lambda: stage(x), repeats)
        rows = []
        for codec_name, rate in CODECS:
            basis = make_basis(cfg.dim, rank_for(cfg.dim, rate), cfg.vocab_size, seed=0) if codec_name == "subspace" else None
            codec = make_codec(codec_name, cfg.dim, rate, basis=basis)

            def round_trip():
                codec.decode(codec.encode(x, ids), ids)
                codec.decode_grad(codec.encode_grad(x))

            codec_ms = 1e3 * median_seconds(round_trip, repeats)
            label = f"{codec_name} rate {rate:g}" if codec_name != "quantize" else "quantize int8"
            rows.append((label, codec_ms, forward_ms, codec_ms / forward_ms))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    for name in MODELS:
        cfg, num_stages, batch, seq_len = MODELS[name]
        print(f"{name}: d={cfg.dim}, {cfg.n_layers // num_stages} layers per stage, batch {batch} x {seq_len} tokens")
        for codec, codec_ms, forward_ms, ratio in measure(name, args.repeats):
            print(f"  {codec:18s} encode+decode (acts + grads) {codec_ms:8.2f} ms | "
                  f"stage forward {forward_ms:8.2f} ms | ratio {ratio:.3f}")


if __name__ == "__main__":
    main()
