"""One table and a few plots for a run or a whole sweep.

    .venv/bin/python experiments/report.py <run or multirun dir> [--out DIR] [--html]

Finds every ``summary.json`` below the folder (one per job; a sweep folder from ``node0sim -m`` has
one job per subfolder), reads each job's Hydra overrides from ``.hydra/overrides.yaml`` and writes
into ``--out`` (default: the folder itself):

- ``report.md`` (and ``report.html`` with ``--html``): the overrides shared by every job, then one row
  per job: the overrides that differ between jobs, steps, tokens/s, first and last training loss,
  validation loss, activation bytes per token, failed requests; jobs that did not finish are listed;
- ``results.csv``: the same rows with every scalar of each ``summary.json``;
- ``loss_vs_tokens.png`` and ``loss_vs_time.png``: each job's training loss (step records of its
  ``metrics.jsonl``) against tokens seen and against virtual time;
- ``throughput_vs_<parameter>.png`` for each parameter that varies across jobs: tokens/s against its
  values (numbers on a numeric axis, log-scaled when they span 100x or more), one line per setting of
  the other varying parameters;
- ``heatmap_<metric>.png`` when at least two varying parameters are numeric (or ``--heatmap-axes X Y`` names two
  varying ones): ``--heatmap METRIC`` (a ``summary.json`` key, default ``tokens_per_s``) over the first two such
  parameters, one cell per pair of values, the mean where other varying parameters (e.g. seeds) give several jobs;
- for a search (jobs with a ``search.json``: ``search.objective``, e.g. ``experiment=uplink_search``): a
  "Search" section (objective, trials, infeasible ones, the best trial and its overrides, the sweeper's own
  ``optimization_results.yaml``), an objective column in the table and ``search_history.png`` (each trial's
  value and the best so far, in trial order).
"""

from __future__ import annotations

import argparse
import csv
import html
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from node0sim.metrics import read_complete_summary  # noqa: E402
from node0sim.reporting import heatmap, markdown_table, pyplot, save_figure  # noqa: E402

# Overrides that do not change a job's results (workflow settings) stay out of the table.
IGNORED_KEYS = re.compile(r"^(train\.skip_if_done|wandb\..*|hydra\..*|hydra/.*)$")
COLUMNS = ["steps", "tokens/s", "loss first", "loss last", "val loss", "activation B/token", "failed requests"]


@dataclass
class Job:
    """One run: its folder, overrides (key -> value, in command-line order) and outputs."""

    path: Path
    label: str
    overrides: dict[str, Any]
    summary: dict[str, Any] | None
    steps: list[dict[str, Any]] = field(default_factory=list)
    search: dict[str, Any] | None = None  # search.json: the value this job returned to a search sweeper

    @property
    def from_hydra(self) -> bool:
        """Whether the job has Hydra's record of its overrides (not, e.g., a script's run)."""
        return (self.path / ".hydra" / "overrides.yaml").is_file()


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def read_overrides(job_dir: Path) -> dict[str, Any]:
    """The job's overrides from ``.hydra/overrides.yaml`` (``+``/``++`` prefixes dropped), workflow keys left out."""
    path = job_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return {}
    overrides: dict[str, Any] = {}
    for line in yaml.safe_load(path.read_text()) or []:
        key, sep, value = str(line).partition("=")
        key = key.lstrip("+~")
        if sep and not IGNORED_KEYS.match(key):
            overrides[key] = _parse_value(value)
    return overrides


def read_steps(job_dir: Path) -> list[dict[str, Any]]:
    """Step records of ``metrics.jsonl`` (records with a ``step``), skipping lines that do not parse."""
    path = job_dir / "metrics.jsonl"
    steps = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and "step" in record:
                steps.append(record)
    return steps


def read_search(job_dir: Path) -> dict[str, Any] | None:
    """The job's ``search.json`` (its search objective and what it was computed from), None without one."""
    try:
        record = json.loads((job_dir / "search.json").read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("value"), (int, float)) else None


def _sort_key(root: Path, job_dir: Path) -> tuple:
    match = re.match(r"^(\d+)_", job_dir.name)
    return (str(job_dir.parent.relative_to(root)) if job_dir != root else "", int(match.group(1)) if match else -1,
            str(job_dir))


def _label(root: Path, job_dir: Path) -> str:
    if job_dir == root:
        return job_dir.name
    match = re.match(r"^(\d+)_", job_dir.name)
    rel = job_dir.relative_to(root)
    if match and len(rel.parts) == 1:
        return f"#{match.group(1)}"
    return str(rel)


def find_jobs(root: Path) -> tuple[list[Job], list[Path]]:
    """Finished jobs below ``root`` (sorted by sweep job number) and folders of jobs without a complete summary."""
    root = Path(root)
    done: dict[Path, dict[str, Any]] = {}
    for path in root.rglob("summary.json"):
        if "wandb" in path.relative_to(root).parts:
            continue
        summary = read_complete_summary(path.parent)
        if summary is not None:
            done[path.parent] = summary
    started = {p.parent.parent for p in root.rglob(".hydra/overrides.yaml")}
    if len(started) > 1:
        started.discard(root)  # a multirun folder's own .hydra is not a job
    incomplete = sorted(started - set(done), key=lambda p: _sort_key(root, p))
    jobs = [
        Job(path=d, label=_label(root, d), overrides=read_overrides(d), summary=done[d], steps=read_steps(d),
            search=read_search(d))
        for d in sorted(done, key=lambda p: _sort_key(root, p))
    ]
    return jobs, incomplete


def varying_keys(jobs: list[Job]) -> list[str]:
    """Override keys whose value differs between jobs (or that some jobs lack), in first-seen order."""
    keys = list(dict.fromkeys(k for job in jobs for k in job.overrides))

    def setting(job: Job, key: str) -> str:
        return _value_text(job.overrides[key]) if key in job.overrides else "\0unset"

    return [k for k in keys if len({setting(j, k) for j in jobs}) > 1]


def _fmt(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-" if value is None else str(value)
    return format(value, spec)


def _override_text(overrides: dict[str, Any], keys: list[str]) -> str:
    return " ".join(f"{k}={_value_text(overrides[k])}" for k in keys if k in overrides)


def _value_text(value: Any) -> str:
    return "null" if value is None else json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def table_rows(jobs: list[Job], keys: list[str]) -> list[list[str]]:
    """One row per job: label, the overrides in ``keys``, then COLUMNS."""
    rows = []
    for job in jobs:
        s = job.summary or {}
        rows.append([
            job.label, _override_text(job.overrides, keys) or ("(defaults)" if job.from_hydra else "-"),
            _fmt(s.get("steps"), "d"),
            _fmt(s.get("tokens_per_s"), ",.1f"), _fmt(s.get("loss_first"), ".4f"), _fmt(s.get("loss_last"), ".4f"),
            _fmt(s.get("val_loss"), ".4f"), _fmt(s.get("activation_bytes_per_token"), ",.0f"),
            _fmt(s.get("failed_requests"), "d"),
        ])
    return rows


def _legend(ax: Any, count: int) -> None:
    if count > 1:
        ax.legend(fontsize=7 if count <= 12 else 5, ncol=1 if count <= 12 else 2)


def plot_loss(jobs: list[Job], keys: list[str], x_key: str, xlabel: str, path: Path) -> Path | None:
    """Training loss of every job against ``x_key`` of its step records; None when no job logged a loss."""
    curves = []
    for job in jobs:
        points = [(r[x_key], r["loss"]) for r in job.steps
                  if isinstance(r.get("loss"), (int, float)) and math.isfinite(r["loss"]) and x_key in r]
        if points:
            curves.append((f"{job.label} {_override_text(job.overrides, keys)}".strip(), points))
    if not curves:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    for label, points in curves:
        ax.plot(*zip(*points), label=label)
    ax.set(xlabel=xlabel, ylabel="training loss", title=f"loss vs {xlabel}")
    ax.grid(alpha=0.3)
    _legend(ax, len(curves))
    return save_figure(fig, path)


def _numeric(values: list[Any]) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def _slug(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", key).strip("_")


def plot_throughput(jobs: list[Job], keys: list[str], key: str, path: Path) -> Path:
    """Tokens/s against the values of ``key``, one line per setting of the other varying keys."""
    others = [k for k in keys if k != key]
    values = [j.overrides.get(key) for j in jobs]
    numeric = _numeric(values)
    categories = list(dict.fromkeys(_value_text(v) for v in values))
    series: dict[str, list[tuple[Any, float]]] = {}
    for job, value in zip(jobs, values):
        x = value if numeric else categories.index(_value_text(value))
        series.setdefault(_override_text(job.overrides, others), []).append((x, job.summary["tokens_per_s"]))
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, points in series.items():
        points.sort(key=lambda p: p[0])
        ax.plot(*zip(*points), marker="o", label=label or None)
    if numeric:
        positive = [v for v in values if v > 0]
        if len(positive) == len(values) and max(positive) / min(positive) >= 100:
            ax.set_xscale("log")
    else:
        ax.set_xticks(range(len(categories)), categories)
    ax.set(xlabel=key, ylabel="tokens/s", title=f"throughput vs {key}")
    ax.grid(alpha=0.3)
    if len(series) > 1:
        _legend(ax, len(series))
    return save_figure(fig, path)


def heatmap_axes(jobs: list[Job], keys: list[str], axes: list[str] | None = None) -> tuple[str, str] | None:
    """The heat map's (x, y) parameters: ``axes`` (two varying keys) or the first two numeric varying keys; None when
    fewer than two vary numerically."""
    if axes is not None:
        if len(axes) != 2 or axes[0] == axes[1]:
            raise SystemExit(f"report: --heatmap-axes needs two different keys, got {axes}")
        unknown = [k for k in axes if k not in keys]
        if unknown:
            raise SystemExit(f"report: --heatmap-axes {' '.join(unknown)}: not a varying parameter (varying: {', '.join(keys) or 'none'})")
        return axes[0], axes[1]
    numeric = [k for k in keys if _numeric([j.overrides.get(k) for j in jobs])]
    return (numeric[0], numeric[1]) if len(numeric) >= 2 else None


def heatmap_grid(jobs: list[Job], x_key: str, y_key: str, metric: str) -> tuple[list[str], list[str], list[list[float | None]]]:
    """The x and y values (sorted when numeric, as text) and ``means[y][x]``: the mean ``metric`` of the jobs at each
    pair of values (None where no job has a finite one)."""
    cells: dict[tuple[str, str], list[float]] = {}
    for job in jobs:
        value = (job.summary or {}).get(metric)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            cells.setdefault((_value_text(job.overrides.get(x_key)), _value_text(job.overrides.get(y_key))), []).append(value)
    if not cells:
        raise SystemExit(f"report: --heatmap {metric}: no job's summary has a finite number for {metric!r}")

    def ordered(key: str) -> list[str]:
        values = list(dict.fromkeys(j.overrides.get(key) for j in jobs))
        return [_value_text(v) for v in (sorted(values) if _numeric(values) else values)]

    xs, ys = ordered(x_key), ordered(y_key)
    return xs, ys, [[sum(cells[x, y]) / len(cells[x, y]) if (x, y) in cells else None for x in xs] for y in ys]


def plot_heatmap(jobs: list[Job], keys: list[str], x_key: str, y_key: str, metric: str, path: Path) -> Path:
    """Heat map of ``metric`` over (``x_key``, ``y_key``) (:func:`heatmap_grid`), the other varying keys averaged."""
    xs, ys, means = heatmap_grid(jobs, x_key, y_key, metric)
    others = [k for k in keys if k not in (x_key, y_key)]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(1.2 * len(xs) + 3, 0.8 * len(ys) + 2.5))
    image = heatmap(ax, xs, ys, means, labels=[[_fmt(v, ".4g") for v in row] for row in means])
    fig.colorbar(image, ax=ax, label=metric)
    ax.set(xlabel=x_key, ylabel=y_key, title=metric + (f"\n(mean over {', '.join(others)})" if others else ""))
    return save_figure(fig, path)


def search_section(root: Path, jobs: list[Job], keys: list[str]) -> list[str]:
    """Markdown lines on the search: objective, trials, infeasible ones, the best trial; [] when no job has one."""
    trials = [j for j in jobs if j.search is not None]
    if not trials:
        return []
    objectives = sorted({j.search["objective"] for j in trials})
    feasible = [j for j in trials if math.isfinite(j.search["value"])]
    lines = ["## Search", "", f"Objective `{', '.join(objectives)}` (minimized), {len(trials)} trial(s), "
             f"{len(trials) - len(feasible)} infeasible (value inf: constraint not met or target not reached).", ""]
    if feasible:
        best = min(feasible, key=lambda j: j.search["value"])
        details = ", ".join(f"{k} {_fmt(v, '.4g') if isinstance(v, float) else v}" for k, v in best.search.items()
                            if k not in ("objective", "value"))
        lines += [f"Best trial: {best.label} `{_override_text(best.overrides, keys)}`: value "
                  f"**{best.search['value']:.4g}** ({details}).", ""]
    else:
        lines += ["No feasible trial.", ""]
    optuna_result = root / "optimization_results.yaml"
    if optuna_result.is_file():
        result = yaml.safe_load(optuna_result.read_text()) or {}
        lines += [f"The sweeper's result (`optimization_results.yaml`): best value {result.get('best_value')}, "
                  f"best parameters `{result.get('best_params')}`.", ""]
    return lines


def plot_search_history(jobs: list[Job], path: Path) -> Path | None:
    """Each trial's objective value and the best so far, in trial order; None without a finite value."""
    trials = [(i, j.search["value"]) for i, j in enumerate(j for j in jobs if j.search is not None)]
    finite = [(i, v) for i, v in trials if math.isfinite(v)]
    if not finite:
        return None
    best, running = math.inf, []
    for i, value in trials:
        best = min(best, value)
        if math.isfinite(best):
            running.append((i, best))
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(*zip(*finite), "o", label="trial")
    ax.step(*zip(*running), where="post", label="best so far")
    infeasible = len(trials) - len(finite)
    ax.set(xlabel="trial", ylabel=f"objective ({jobs[0].search['objective'] if jobs[0].search else 'value'})",
           title="search history" + (f" ({infeasible} infeasible trial(s) not shown)" if infeasible else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def write_csv(path: Path, jobs: list[Job], keys: list[str]) -> Path:
    """Every scalar of every summary, with the job's overrides, one row per job."""
    scalars = list(dict.fromkeys(k for j in jobs for k, v in (j.summary or {}).items()
                                 if v is None or isinstance(v, (int, float, str, bool))))
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["job", "path", *keys, *[f"summary.{k}" if k in keys else k for k in scalars]])
        for job in jobs:
            writer.writerow([job.label, str(job.path), *[_value_text(job.overrides.get(k)) for k in keys],
                             *[(job.summary or {}).get(k) for k in scalars]])
    return path


def write_html(path: Path, title: str, common: str, header: list[str], rows: list[list[str]],
               incomplete: list[str], images: list[Path]) -> Path:
    """A self-contained page: the table and the plots (linked, next to the page)."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    parts = [f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}td:nth-child(2){text-align:left}</style>",
             f"<h1>{html.escape(title)}</h1>", f"<p>{html.escape(common)}</p>",
             f"<table><tr>{head}</tr>{body}</table>"]
    if incomplete:
        parts.append("<p>Not finished: " + ", ".join(html.escape(i) for i in incomplete) + "</p>")
    parts += [f"<p><img src='{html.escape(p.name)}'></p>" for p in images]
    path.write_text("\n".join(parts) + "\n")
    return path


def build_report(root: Path, out: Path, html_page: bool = False, heatmap_metric: str = "tokens_per_s",
                 heatmap_keys: list[str] | None = None) -> dict[str, Any]:
    """Write the report for ``root`` into ``out`` (the heat map of ``heatmap_metric`` over ``heatmap_keys`` or the
    first two numeric varying keys); returns what was written (paths) and the table."""
    root, out = Path(root).resolve(), Path(out).resolve()
    jobs, incomplete = find_jobs(root)
    if not jobs:
        raise SystemExit(f"report: no complete summary.json below {root}")
    out.mkdir(parents=True, exist_ok=True)
    keys = varying_keys(jobs)
    common_keys = [k for k in dict.fromkeys(k for j in jobs for k in j.overrides) if k not in keys]
    shown = keys if len(jobs) > 1 else common_keys
    common = (f"Common overrides: `{_override_text(jobs[0].overrides, common_keys)}`" if common_keys and len(jobs) > 1
              else "Common overrides: none" if len(jobs) > 1 else "Single run.")
    header = ["job", "overrides", *COLUMNS]
    rows = table_rows(jobs, shown)
    if any(j.search is not None for j in jobs):
        header.append("objective")
        rows = [[*row, _fmt(j.search["value"], ".4g") if j.search else "-"] for row, j in zip(rows, jobs)]

    images = [p for p in (
        plot_loss(jobs, keys, "tokens", "tokens", out / "loss_vs_tokens.png"),
        plot_loss(jobs, keys, "time_s", "virtual time (s)", out / "loss_vs_time.png"),
    ) if p is not None]
    images += [plot_throughput(jobs, keys, key, out / f"throughput_vs_{_slug(key)}.png") for key in keys]
    axes = heatmap_axes(jobs, keys, heatmap_keys)
    if axes is not None:
        images.append(plot_heatmap(jobs, keys, *axes, heatmap_metric, out / f"heatmap_{_slug(heatmap_metric)}.png"))
    history = plot_search_history(jobs, out / "search_history.png")
    images += [history] if history is not None else []

    incomplete_labels = [_label(root, p) for p in incomplete]
    title = f"Report: {root.name}"
    lines = [f"# {title}", "", f"{len(jobs)} finished job(s) in `{root}`.", "", common, "",
             markdown_table(header, rows), *search_section(root, jobs, keys)]
    if incomplete_labels:
        lines += [f"Not finished ({len(incomplete_labels)}): " + ", ".join(f"`{i}`" for i in incomplete_labels), ""]
    lines += [f"![{p.stem}]({p.relative_to(out) if p.is_relative_to(out) else p})\n" for p in images]
    written = {"report": out / "report.md", "csv": write_csv(out / "results.csv", jobs, shown), "plots": images}
    written["report"].write_text("\n".join(lines))
    if html_page:
        written["html"] = write_html(out / "report.html", title, common.replace("`", ""), header, rows,
                                     incomplete_labels, images)
    return {"written": written, "rows": rows, "varying": keys, "incomplete": incomplete}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path, help="a run folder or a multirun (sweep) folder")
    parser.add_argument("--out", type=Path, default=None, help="where to write (default: the folder itself)")
    parser.add_argument("--html", action="store_true", help="also write report.html")
    parser.add_argument("--heatmap", default="tokens_per_s", metavar="METRIC",
                        help="summary.json key of the heat map over two numeric varying parameters (default tokens_per_s)")
    parser.add_argument("--heatmap-axes", nargs=2, metavar=("X", "Y"), help="the heat map's two varying parameters")
    args = parser.parse_args(argv)
    if not args.root.is_dir():
        parser.error(f"{args.root} is not a folder")
    result = build_report(args.root, args.out or args.root, args.html, args.heatmap, args.heatmap_axes)
    written = result["written"]
    print(f"report: {len(result['rows'])} job(s)"
          + (f", varying {', '.join(result['varying'])}" if result["varying"] else "")
          + (f", {len(result['incomplete'])} not finished" if result["incomplete"] else ""))
    for name in ("report", "html", "csv"):
        if name in written:
            print(f"  {written[name]}")
    for path in written["plots"]:
        print(f"  {path}")


if __name__ == "__main__":
    sys.exit(main())
