"""Region presets: one-way latency between regions, in milliseconds.

One-way latency is half the round-trip time. The round-trip times are rounded medians of
public inter-region ping measurements between AWS regions (cloudping.co, "AWS Latency
Monitoring", and WonderNetwork's global ping statistics give the same picture to within a
few ms): e.g. Frankfurt-London ~14 ms, Virginia-Frankfurt ~90 ms, Virginia-Tokyo ~150 ms,
Frankfurt-Sydney ~290 ms RTT. Inside one cloud region the RTT is about 1 ms; inside one
datacenter (same rack/pod) tens of microseconds.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RegionPreset:
    """Named regions and the symmetric one-way latency (ms) between each pair."""

    regions: tuple[str, ...]
    one_way_ms: dict[tuple[str, str], float]

    def latency_ms(self, a: str, b: str) -> float:
        """One-way latency from region ``a`` to region ``b``."""
        return self.one_way_ms[(a, b)] if (a, b) in self.one_way_ms else self.one_way_ms[(b, a)]


def _preset(intra_rtt_ms: float, rtt_ms: dict[tuple[str, str], float]) -> RegionPreset:
    regions = tuple(dict.fromkeys(r for pair in rtt_ms for r in pair)) if rtt_ms else ("local",)
    one_way = {(r, r): intra_rtt_ms / 2 for r in regions}
    one_way.update({pair: rtt / 2 for pair, rtt in rtt_ms.items()})
    return RegionPreset(regions, one_way)


REGION_PRESETS: dict[str, RegionPreset] = {
    "datacenter": _preset(0.05, {}),
    "single_region": _preset(1.0, {}),
    "europe": _preset(
        1.0,
        {
            ("london", "frankfurt"): 14, ("london", "paris"): 8, ("london", "stockholm"): 30,
            ("london", "milan"): 23, ("frankfurt", "paris"): 9, ("frankfurt", "stockholm"): 21,
            ("frankfurt", "milan"): 11, ("paris", "stockholm"): 29, ("paris", "milan"): 19,
            ("stockholm", "milan"): 30,
        },
    ),
    "worldwide": _preset(
        1.0,
        {
            ("virginia", "oregon"): 65, ("virginia", "frankfurt"): 90, ("virginia", "tokyo"): 150,
            ("virginia", "sydney"): 200, ("oregon", "frankfurt"): 140, ("oregon", "tokyo"): 100,
            ("oregon", "sydney"): 140, ("frankfurt", "tokyo"): 230, ("frankfurt", "sydney"): 290,
            ("tokyo", "sydney"): 105,
        },
    ),
}


def region_preset(name: str) -> RegionPreset:
    """The preset called ``name``; a ValueError lists the known ones."""
    try:
        return REGION_PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown region preset {name!r}; known: {sorted(REGION_PRESETS)}") from None
