"""The loss curve of a run as a small self-contained SVG file: no plotting library, any browser shows it.

    records (metrics.jsonl lines) ─▶ train loss per step: a polyline
                                     eval loss:           dots joined by a dashed line
                                  ─▶ axes with "nice" ticks (1, 2 or 5 x 10^k), labels, legend

Only the standard library: the run that writes it must not need matplotlib.
"""

import math
from xml.sax.saxutils import escape

WIDTH, HEIGHT = 640, 400
LEFT, RIGHT, TOP, BOTTOM = 60, 20, 30, 45  # margins: room for tick labels and axis titles
TRAIN_COLOR, EVAL_COLOR = "#1f77b4", "#d62728"


def series(records, key):
    """(step, value) for every record that has a finite `key`."""
    out = []
    for r in records:
        value = r.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value) and "step" in r:
            out.append((r["step"], float(value)))
    return out


def nice_ticks(low, high, count=5):
    """About `count` round tick values covering [low, high]: steps of 1, 2 or 5 x 10^k."""
    if high <= low:
        high = low + 1.0
    raw = (high - low) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    first, last = math.floor(low / step + 1e-9), math.ceil(high / step - 1e-9)
    return [round(i * step, 10) for i in range(first, last + 1)]


def label(value):
    return f"{value:g}"


def write_loss_svg(records, path, title="loss"):
    """Write train loss (per step) and eval loss (where measured) of `records` to the SVG file `path`.

    records: dicts as in metrics.jsonl: "step", and "loss" and/or "eval_loss". Records without a
    finite value for a series are left out of it; with no values at all the axes are drawn empty.
    """
    train, evals = series(records, "loss"), series(records, "eval_loss")
    points = train + evals
    steps = [s for s, _ in points] or [0, 1]
    values = [v for _, v in points] or [0, 1]
    xticks = nice_ticks(min(steps), max(steps))
    yticks = nice_ticks(min(0.0, min(values)), max(values))  # from 0: a fall reads at its true size
    x0, x1, y0, y1 = xticks[0], xticks[-1], yticks[0], yticks[-1]
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def x(step):
        return LEFT + (step - x0) / (x1 - x0) * plot_w

    def y(value):
        return TOP + (1 - (value - y0) / (y1 - y0)) * plot_h

    def coords(pts):
        return " ".join(f"{x(s):.1f},{y(v):.1f}" for s, v in pts)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
        f'viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="11">',
        f'<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>',
        f'<text x="{WIDTH / 2}" y="18" text-anchor="middle" font-size="13">{escape(title)}</text>',
    ]
    for t in xticks:  # vertical grid lines and step labels
        parts.append(f'<line x1="{x(t):.1f}" y1="{TOP}" x2="{x(t):.1f}" y2="{TOP + plot_h}" stroke="#eee"/>')
        parts.append(f'<text x="{x(t):.1f}" y="{TOP + plot_h + 15}" text-anchor="middle">{label(t)}</text>')
    for t in yticks:  # horizontal grid lines and loss labels
        parts.append(f'<line x1="{LEFT}" y1="{y(t):.1f}" x2="{LEFT + plot_w}" y2="{y(t):.1f}" stroke="#eee"/>')
        parts.append(f'<text x="{LEFT - 6}" y="{y(t) + 4:.1f}" text-anchor="end">{label(t)}</text>')
    parts.append(f'<path d="M{LEFT},{TOP} V{TOP + plot_h} H{LEFT + plot_w}" fill="none" stroke="black"/>')
    parts.append(f'<text x="{LEFT + plot_w / 2}" y="{HEIGHT - 8}" text-anchor="middle">optimizer step</text>')
    parts.append(f'<text x="14" y="{TOP + plot_h / 2}" text-anchor="middle" '
                 f'transform="rotate(-90 14 {TOP + plot_h / 2})">loss per target token</text>')
    if train:
        parts.append(f'<polyline class="train" points="{coords(train)}" fill="none" stroke="{TRAIN_COLOR}" '
                     'stroke-width="1.2"/>')
    if evals:
        parts.append(f'<polyline points="{coords(evals)}" fill="none" stroke="{EVAL_COLOR}" stroke-dasharray="4 3"/>')
        parts += [f'<circle class="eval" cx="{x(s):.1f}" cy="{y(v):.1f}" r="3" fill="{EVAL_COLOR}"/>' for s, v in evals]
    legend = [("train loss", TRAIN_COLOR, bool(train)), ("eval loss", EVAL_COLOR, bool(evals))]
    row = 0
    for name, color, shown in legend:
        if shown:
            ly = TOP + 12 + 16 * row
            parts.append(f'<line x1="{WIDTH - RIGHT - 110}" y1="{ly - 4}" x2="{WIDTH - RIGHT - 90}" y2="{ly - 4}" '
                         f'stroke="{color}" stroke-width="2"/>')
            parts.append(f'<text x="{WIDTH - RIGHT - 84}" y="{ly}">{name}</text>')
            row += 1
    parts.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(parts) + "\n")
