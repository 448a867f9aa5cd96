"""Protocol roles and messages, written once against ``node0sim.runtime.Runtime`` (no backend imports)."""
