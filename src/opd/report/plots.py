"""One metric group as an inline SVG line plot: axes with labelled ticks, a curve per series, a legend.

The SVG is drawn here, not in the browser, so the page shows its curves even with scripts off; the page's
script only adds the hover read-out, from the points each plot carries in its `data-points` attribute.
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass

from opd.report.groups import MetricGroup, Series

WIDTH, HEIGHT = 540, 250  # the SVG's user units; CSS scales it to the column
LEFT, RIGHT, TOP, BOTTOM = 84, 12, 12, 40  # margins holding the tick labels and axis titles
# Distinct colours for up to ten series (a colour-blind-friendly qualitative palette); more cycle.
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf")


@dataclass(frozen=True, kw_only=True, slots=True)
class Frame:
    """Data ranges and the pixel box they map to."""

    x_low: float
    x_high: float
    y_low: float
    y_high: float

    def x(self, step: float) -> float:
        return LEFT + (step - self.x_low) / (self.x_high - self.x_low) * (WIDTH - LEFT - RIGHT)

    def y(self, value: float) -> float:
        return HEIGHT - BOTTOM - (value - self.y_low) / (self.y_high - self.y_low) * (HEIGHT - TOP - BOTTOM)


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values (1, 2 or 5 times a power of ten apart) covering [low, high]."""
    if high <= low:
        return [low]
    raw = (high - low) / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(multiple * power for multiple in (1, 2, 5, 10) if multiple * power >= raw)
    first = math.ceil(low / step - 1e-9) * step
    return [first + index * step for index in range(int((high - first) / step + 1e-9) + 1)]


def tick_labels(values: list[float]) -> list[str]:
    """The shortest labels that tell every tick apart (a flat curve near 5.697 needs 5.69702, 5.69704...)."""
    for digits in range(3, 12):
        labels = [f"{value:.{digits}g}" if abs(value) > 1e-12 else "0" for value in values]
        if len(set(labels)) == len(labels):
            return labels
    return labels


def frame_for(series: list[Series]) -> Frame:
    """The data ranges over every series, padded so a flat curve is not drawn on the frame's edge."""
    steps = [step for one in series for step, _ in one.points]
    values = [value for one in series for _, value in one.points]
    x_low, x_high = min(steps), max(steps)
    if x_high == x_low:
        x_low, x_high = x_low - 1, x_high + 1
    y_low, y_high = min(values), max(values)
    pad = (y_high - y_low) * 0.05 or abs(y_high) * 0.05 or 1.0
    return Frame(x_low=x_low, x_high=x_high, y_low=y_low - pad, y_high=y_high + pad)


def render_plot(group: MetricGroup, series: list[Series]) -> str:
    """The group's `<figure>`: title, SVG, legend, and notes on gaps, non-finite values and downsampling."""
    drawn = [one for one in series if one.points]
    body = _svg(drawn, group.y_label) if drawn else '<p class="empty">no finite values logged</p>'
    legend = "".join(
        f'<li><span class="swatch" style="background:{PALETTE[index % len(PALETTE)]}"></span>'
        f'{html.escape(one.key)}</li>' for index, one in enumerate(drawn))
    points = {one.key: one.points for one in drawn}
    return (f'<figure class="plot" data-group="{group.slug}" data-y-label="{html.escape(group.y_label)}" '
            f'data-points="{html.escape(json.dumps(points))}">'
            f'<figcaption>{html.escape(group.title)}</figcaption>{body}<ul class="legend">{legend}</ul>'
            f'{_notes(series)}</figure>')


def _svg(series: list[Series], y_label: str) -> str:
    frame = frame_for(series)
    # data-box: what the page's script needs to map a mouse position back to a step.
    parts = [f'<svg viewBox="0 0 {WIDTH} {HEIGHT}" role="img" xmlns="http://www.w3.org/2000/svg" '
             f'data-box="{LEFT} {RIGHT} {WIDTH} {frame.x_low} {frame.x_high}">',
             _axes(frame, y_label)]
    for index, one in enumerate(series):
        colour = PALETTE[index % len(PALETTE)]
        coordinates = [(frame.x(step), frame.y(value)) for step, value in one.points]
        if len(coordinates) == 1 or _sparse(one):  # single values (an eval every N steps) as markers
            parts.extend(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{colour}"/>' for x, y in coordinates)
        if len(coordinates) > 1:
            path = " ".join(f"{x:.1f},{y:.1f}" for x, y in coordinates)
            parts.append(f'<polyline class="curve" points="{path}" fill="none" stroke="{colour}" '
                         'stroke-width="1.5"/>')
    parts.append(f'<line class="cursor" x1="0" x2="0" y1="{TOP}" y2="{HEIGHT - BOTTOM}" visibility="hidden"/>')
    parts.append("</svg>")
    return "".join(parts)


def _sparse(series: Series) -> bool:
    return len(series.points) <= 30


def _axes(frame: Frame, y_label: str) -> str:
    """Frame, grid lines, tick labels and both axis titles ("step" and the group's unit)."""
    bottom, right = HEIGHT - BOTTOM, WIDTH - RIGHT
    parts = [f'<rect class="frame" x="{LEFT}" y="{TOP}" width="{right - LEFT}" height="{bottom - TOP}"/>']
    y_ticks = nice_ticks(frame.y_low, frame.y_high)
    for value, label in zip(y_ticks, tick_labels(y_ticks)):
        y = frame.y(value)
        parts.append(f'<line class="grid" x1="{LEFT}" x2="{right}" y1="{y:.1f}" y2="{y:.1f}"/>'
                     f'<text class="tick" x="{LEFT - 4}" y="{y + 4:.1f}" text-anchor="end">'
                     f'{label}</text>')
    for value in nice_ticks(frame.x_low, frame.x_high):
        if value != int(value):
            continue  # steps are whole numbers
        x = frame.x(value)
        parts.append(f'<line class="grid" x1="{x:.1f}" x2="{x:.1f}" y1="{TOP}" y2="{bottom}"/>'
                     f'<text class="tick" x="{x:.1f}" y="{bottom + 14}" text-anchor="middle">{int(value)}</text>')
    parts.append(f'<text class="axis-title" x="{(LEFT + right) / 2:.0f}" y="{HEIGHT - 6}" '
                 'text-anchor="middle">step</text>')
    middle = (TOP + bottom) / 2
    parts.append(f'<text class="axis-title" transform="rotate(-90)" x="{-middle:.0f}" y="13" '
                 f'text-anchor="middle">{html.escape(y_label)}</text>')
    return "".join(parts)


def _notes(series: list[Series]) -> str:
    notes = []
    for one in series:
        if one.non_finite_steps:
            steps = ", ".join(str(step) for step in one.non_finite_steps[:5])
            more = " ..." if len(one.non_finite_steps) > 5 else ""
            notes.append(f"{one.key}: {len(one.non_finite_steps)} non-finite value(s), not drawn "
                         f"(steps {steps}{more})")
        if len(one.points) < one.logged_points:
            notes.append(f"{one.key}: {one.logged_points} values drawn as {len(one.points)} points "
                         "(minimum and maximum of each bucket of steps)")
    return "".join(f'<p class="note">{html.escape(note)}</p>' for note in notes)
