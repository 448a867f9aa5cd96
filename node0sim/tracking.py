"""Experiment tracking: a Weights & Biases sink for :class:`node0sim.metrics.RunRecorder`.

Every run logs its resolved config, each metrics record (step records against ``step``, ``swarm``
snapshots as ``swarm/...`` against virtual time ``time_s``) and its summary. ``metrics.jsonl`` stays
the source of truth: tracking never stops a run. When wandb cannot start or fails later, one line
says so (``wandb unavailable: ...; metrics are still in metrics.jsonl``) and the run goes on.

Mode: ``wandb.mode`` if set, else ``$WANDB_MODE``, else ``offline`` (the run is written under the run
directory, ``<run dir>/wandb/offline-run-*``; ``wandb sync`` uploads it later). ``WANDB_MODE=online``
(with a key from ``wandb login`` or ``$WANDB_API_KEY``) tracks live. In a Hydra multirun the jobs of
one sweep share a ``group`` (the sweep folder's name) and a ``job_type`` (the experiment, or ``run``).
"""

from __future__ import annotations

import math
import os
import re
import sys
from pathlib import Path
from typing import Any, Mapping, TextIO

WARNING = "wandb unavailable: {reason}; metrics are still in metrics.jsonl"
_TIMESTAMP = re.compile(r"^\d{2,4}-\d{2}")  # 2026-11-25, 08-40-12, 2026-11-25_08-40-12


def flatten_record(record: Mapping[str, Any]) -> dict[str, float | int]:
    """The numeric content of one metrics record, flat, as wandb logs it.

    A record with ``event: <name>`` has its keys under ``<name>/`` (``time_s`` and ``step`` stay
    plain, they are the x axes); lists and dicts become ``key/<index or name>``; strings and None
    are dropped.
    """
    prefix = f"{record['event']}/" if isinstance(record.get("event"), str) else ""
    out: dict[str, float | int] = {}
    for key, value in record.items():
        if key == "event":
            continue
        _flatten(key if key in ("step", "time_s") else prefix + str(key), value, out)
    return out


def _flatten(name: str, value: Any, out: dict[str, float | int]) -> None:
    if isinstance(value, bool):
        out[name] = int(value)
    elif isinstance(value, (int, float)):
        out[name] = value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            _flatten(f"{name}/{key}", item, out)
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _flatten(f"{name}/{index}", item, out)


def _jsonable(value: Any) -> Any:
    """``value`` with non-finite floats as strings (wandb's summary is JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    text = f"{type(error).__name__}: {text}" if text else type(error).__name__
    return text if len(text) <= 300 else text[:297] + "..."


class WandbSink:
    """Sends a run's records and summary to wandb; any wandb failure is reported once and ignored.

    ``log(record)`` and ``finish(summary)`` follow the RunRecorder sink protocol; ``finish(None)``
    closes a run that failed.
    """

    def __init__(
        self,
        out_dir: Path,
        config: Mapping[str, Any],
        *,
        project: str = "node0sim",
        entity: str | None = None,
        mode: str | None = None,
        group: str | None = None,
        job_type: str = "run",
        name: str | None = None,
        stream: TextIO | None = None,
    ):
        self.stream = stream
        self.run: Any = None
        self.warned = False
        self._keys: set[str] = set()
        self.location: str | None = None  # where the run can be found: its folder (offline) or URL (online)
        self.mode = mode or os.environ.get("WANDB_MODE") or "offline"
        try:
            import wandb

            self.run = wandb.init(
                project=project, entity=entity, mode=self.mode, dir=os.environ.get("WANDB_DIR") or str(out_dir),
                config=dict(config), group=group, job_type=job_type, name=name,
                settings=wandb.Settings(quiet=True),  # no history table at the end: the run prints its own summary
            )
            self.location = (self.run.url if self.mode == "online" else None) or str(self.run.settings.sync_dir)
            self.run.define_metric("step")
            self.run.define_metric("time_s")
        except Exception as error:  # noqa: BLE001 - tracking must never stop a run
            self._fail(error)

    @property
    def active(self) -> bool:
        """Whether records still go to wandb."""
        return self.run is not None

    def _fail(self, error: BaseException) -> None:
        if not self.warned:
            self.warned = True
            print(WARNING.format(reason=_one_line(error)), file=self.stream or sys.stderr, flush=True)
        run, self.run, self.location = self.run, None, None
        if run is not None:
            try:
                run.finish(exit_code=1, quiet=True)
            except Exception:  # noqa: BLE001
                pass

    def log(self, record: Mapping[str, Any]) -> None:
        """Log one metrics record (a step record, or an ``event`` record such as ``swarm``)."""
        if self.run is None:
            return
        try:
            payload = flatten_record(record)
            event = record.get("event")
            if isinstance(event, str):  # event records (swarm snapshots, ...) are plotted against virtual time
                if f"{event}/*" not in self._keys:
                    self.run.define_metric(f"{event}/*", step_metric="time_s")
                    self._keys.add(f"{event}/*")
            else:  # step records against the step
                for key in payload.keys() - self._keys - {"step", "time_s"}:
                    self.run.define_metric(key, step_metric="step")
                self._keys |= payload.keys()
            if payload:
                self.run.log(payload)
        except Exception as error:  # noqa: BLE001
            self._fail(error)

    def finish(self, summary: Mapping[str, Any] | None) -> None:
        """Write ``summary`` into the wandb run's summary and close it; None: the run failed."""
        if self.run is None:
            return
        run = self.run
        try:
            if summary is not None:
                run.summary.update(_jsonable({k: v for k, v in summary.items() if k != "outputs"}))
            self.run = None
            run.finish(exit_code=0 if summary is not None else 1)
        except Exception as error:  # noqa: BLE001
            self.run = run
            self._fail(error)


def hydra_job_info(out_dir: Path) -> dict[str, Any]:
    """Group, job type, name and overrides of the current Hydra job (defaults outside Hydra)."""
    info: dict[str, Any] = {"group": None, "job_type": "run", "name": None, "overrides": [], "multirun": False}
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hydra_cfg = HydraConfig.get()
    except Exception:  # noqa: BLE001 - not inside a Hydra app
        return info
    info["overrides"] = list(hydra_cfg.overrides.task)
    info["job_type"] = hydra_cfg.runtime.choices.get("experiment") or "run"
    if hydra_cfg.mode == RunMode.MULTIRUN:
        info["multirun"] = True
        info["group"] = sweep_group(Path(hydra_cfg.sweep.dir))
        info["name"] = Path(out_dir).name
    return info


def sweep_group(sweep_dir: Path) -> str:
    """The wandb group of a sweep: its folder's name, after its parent's when the name is a timestamp
    (``multirun/2026-11-25/08-40-12`` -> ``2026-11-25_08-40-12``, ``multirun/churn_sweep/2026-11-25_08-40-12``
    -> ``churn_sweep_2026-11-25_08-40-12``, ``multirun/bw`` -> ``bw``)."""
    sweep_dir = Path(sweep_dir).resolve()
    parent = sweep_dir.parent.name
    if _TIMESTAMP.match(sweep_dir.name) and parent and parent != "multirun":
        return f"{parent}_{sweep_dir.name}"
    return sweep_dir.name


def make_sinks(run_cfg: Any, config: Mapping[str, Any], out_dir: Path) -> list[WandbSink]:
    """The sinks ``run_cfg`` asks for (a wandb sink unless ``wandb.enabled=false``)."""
    settings = run_cfg.wandb
    if not settings.enabled:
        return []
    info = hydra_job_info(out_dir)
    logged = {k: v for k, v in config.items() if k != "hydra"}
    logged["overrides"] = info["overrides"]
    return [
        WandbSink(
            out_dir, logged, project=settings.project, entity=settings.entity, mode=settings.mode,
            group=info["group"], job_type=info["job_type"], name=info["name"],
        )
    ]
