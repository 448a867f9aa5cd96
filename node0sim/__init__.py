"""node0sim: a simulation-first research framework for Node0-style decentralized training."""
