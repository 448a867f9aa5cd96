"""The hivemind backend: node0sim's protocol on a live swarm (real P2P, DHT and processes)."""
