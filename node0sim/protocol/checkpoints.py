"""Stage checkpoints: a designated peer saves its stage's state every few epochs; a peer that starts in a stage with
no ready peer restores the newest saved state instead of starting from the initial weights.

Node0's volunteers keep no checkpoints (``checkpoint_dir=None``, see ``node0-code-facts.md``): a stage whose peers
all leave loses its weights. Here a peer started with ``swarm.checkpoint_dir`` keeps one file per stage,
``<dir>/stage-<k>.pt``: its parameters, optimizer state and PowerSGD Q (what a joiner downloads, see
``state_transfer.py``), the epoch, and the run id. A save replaces the file atomically (written beside it, then
synced, then renamed over it), so a crash mid-save leaves the previous checkpoint whole.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from node0sim.protocol.messages import Packed
from node0sim.protocol.state_transfer import StateResponse

CHECKPOINT_FORMAT = 1
"""Bumped when the file's layout changes; a file of another format is refused, not misread."""


class CheckpointError(ValueError):
    """A checkpoint file that cannot be restored: unreadable, of another run or stage, or of another format."""


@dataclass(frozen=True)
class CheckpointStore:
    """The checkpoints of one run in ``directory``: saved every ``every_epochs`` epochs (the epoch a step reached)."""

    directory: Path
    run_id: str
    every_epochs: int

    def path(self, stage: int) -> Path:
        """The file of ``stage``'s checkpoint."""
        return self.directory / f"stage-{stage}.pt"

    def due(self, epoch: int) -> bool:
        """Whether a step that reached ``epoch`` is saved."""
        return epoch % self.every_epochs == 0

    def save(self, stage: int, state: StateResponse) -> None:
        """Replace ``stage``'s checkpoint with ``state`` (atomically)."""
        if not isinstance(state.state, Packed):
            raise CheckpointError(f"stage {stage}: only a numerics-mode state (tensors) can be checkpointed")
        target = self.path(stage)
        content = {
            "format": CHECKPOINT_FORMAT, "run_id": self.run_id, "stage": stage, "epoch": state.epoch,
            "parts": state.state.parts, "shape": list(state.state.shape), "queries": state.queries,
        }
        partial = None
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            # a file of its own per save: the peers of a stage may share the folder
            handle, partial = tempfile.mkstemp(prefix=f"{target.name}.", suffix=".partial", dir=self.directory)
            with os.fdopen(handle, "wb") as file:
                torch.save(content, file)
                file.flush()
                os.fsync(file.fileno())  # on disk before it replaces the previous checkpoint
            os.replace(partial, target)
        except (OSError, RuntimeError) as error:  # torch's writer reports some write failures as RuntimeError
            if partial is not None:
                Path(partial).unlink(missing_ok=True)
            raise CheckpointError(f"{target}: cannot write it ({error})") from None

    def load(self, stage: int) -> StateResponse | None:
        """``stage``'s newest checkpoint (None when there is none); a file that cannot be restored raises
        :class:`CheckpointError` naming it and what is wrong."""
        path = self.path(stage)
        if not path.exists():
            return None
        try:
            content = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # a truncated or foreign file: torch raises several types
            raise CheckpointError(f"{path}: not a readable checkpoint ({type(error).__name__}: {error})") from None
        if not isinstance(content, dict) or content.get("format") != CHECKPOINT_FORMAT:
            found = content.get("format") if isinstance(content, dict) else type(content).__name__
            raise CheckpointError(f"{path}: checkpoint format {found!r}, this version reads {CHECKPOINT_FORMAT}")
        for key, expected in (("run_id", self.run_id), ("stage", stage)):
            if content.get(key) != expected:
                raise CheckpointError(
                    f"{path}: a checkpoint of {key} {content.get(key)!r}, this peer needs {expected!r} "
                    "(give each run its own swarm.checkpoint_dir)"
                )
        epoch, parts = content.get("epoch"), content.get("parts")
        if not isinstance(epoch, int) or epoch < 0 or not isinstance(parts, dict):
            raise CheckpointError(f"{path}: malformed checkpoint (epoch {epoch!r}, parts of type {type(parts).__name__})")
        return StateResponse(epoch, Packed(parts, tuple(content["shape"])), content.get("queries"))
