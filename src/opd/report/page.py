"""`opd report RUN_DIR`: the run folder's metrics.jsonl and samples.jsonl as one self-contained report.html.

The page holds everything it shows (inline SVG, CSS and script; no network, no other file), so it can be
copied off a cluster and opened anywhere. It is derived from the run's files: writing it again replaces it.
"""

from __future__ import annotations

import html
from pathlib import Path

from opd.report.assets import SCRIPT, STYLE
from opd.report.groups import build_series, group_metrics
from opd.report.plots import render_plot
from opd.report.samples_view import SampleViews, read_samples
from opd.report.token_html import domain_section, legend
from opd.runtime.monitor import read_metrics
from opd.runtime.run_folder import segment_configs, write_text_atomically

REPORT_NAME = "report.html"  # one of the run folder's own names (runtime/run_folder.RUN_FOLDER_NAMES)


class ReportError(ValueError):
    pass


def write_report(run_dir: str | Path, output: str | Path | None = None) -> Path:
    """Write the report of `run_dir` (default `run_dir/report.html`, replaced if present); returns its path."""
    run_dir = Path(run_dir)
    target = _output_path(run_dir, output)
    records = _metrics_records(run_dir)
    samples_path = run_dir / "samples.jsonl"
    views = read_samples(samples_path) if samples_path.is_file() else None
    write_text_atomically(target, render_page(run_dir, records, views))
    return target


def _output_path(run_dir: Path, output: str | Path | None) -> Path:
    if not run_dir.exists():
        raise ReportError(f"{run_dir} does not exist (give the run's train.output_dir)")
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir} is not a folder (give the run's train.output_dir)")
    target = run_dir / REPORT_NAME if output is None else Path(output)
    if target.resolve().parent == run_dir.resolve() and target.name != REPORT_NAME:
        # Any other name in the run folder would make `opd train --resume` refuse it as holding foreign files.
        raise ReportError(f"--output {target}: inside the run folder the report must be named "
                          f"{REPORT_NAME} (other names are not the run's own and would stop a resume)")
    if not target.parent.is_dir():
        raise ReportError(f"--output {target}: folder {target.parent} does not exist")
    return target


def _metrics_records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise ReportError(f"{run_dir} has no metrics.jsonl (is it a run folder? a run writes it "
                          "from its first step)")
    records = read_metrics(path)
    if not records:
        raise ReportError(f"{path} holds no step yet (a run writes a line after each step)")
    return records


def render_page(run_dir: Path, records: list[dict], views: SampleViews | None) -> str:
    keys = list(dict.fromkeys(key for record in records for key in record if key != "step"))
    groups = group_metrics(keys)
    plots = "".join(render_plot(group, [build_series(records, key) for key in group.keys]) for group in groups)
    steps = [record["step"] for record in records]
    summary = (f"{len(records)} logged steps ({min(steps)} to {max(steps)}), {len(keys)} metrics in "
               f"{len(groups)} plots, from {run_dir.resolve()}/metrics.jsonl")
    return "".join([
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
        f"<title>opd report: {html.escape(run_dir.resolve().name)}</title><style>{STYLE}</style></head><body>",
        f"<h1>opd run report: {html.escape(run_dir.resolve().name)}</h1>",
        f'<p class="summary">{html.escape(summary)}. Written by <code>opd report</code>; derived from the run\'s '
        "files and rewritten by each call.</p>",
        '<div id="opd-report-status"></div>',
        f'<h2>Metrics</h2><div class="plots">{plots}</div>',
        _samples_block(views),
        _config_block(run_dir),
        f"<script>{SCRIPT}</script></body></html>",
    ])


def _samples_block(views: SampleViews | None) -> str:
    if views is None:
        return ('<h2>Samples</h2><p class="note">No samples.jsonl: this run logged no samples '
                "(train.log_samples_every: 0).</p>")
    if not views.records:
        return '<h2>Samples</h2><p class="note">samples.jsonl holds no sample yet.</p>'
    options = "".join(f'<option value="{step}">step {step}</option>' for step in views.shown_steps)
    notes = "".join(f'<p class="note">{html.escape(note)}</p>' for note in views.notes)
    sections = "".join(domain_section(domain, views) for domain in views.domains)
    return (f"<h2>Samples</h2>{notes}{legend(views.scale)}"
            f'<label>show step <select id="step-select"><option value="all">all shown steps</option>{options}'
            f"</select></label>{sections}")


def _config_block(run_dir: Path) -> str:
    """Every segment's config as written by the run (config.yaml, config.resume-*.yaml), folded."""
    parts = []
    for path in segment_configs(run_dir):
        parts.append(f"<details><summary>{html.escape(path.name)}</summary>"
                     f"<pre>{html.escape(path.read_text(encoding='utf-8', errors='replace'))}</pre></details>")
    return "<h2>Config</h2>" + "".join(parts) if parts else ""
