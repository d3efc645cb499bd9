"""A self-contained HTML report: images embedded as data URIs, charts as inline SVG, no scripts, no network.

One page per run or sweep: the grid, loss curves, per-block ΔW norms (attention vs conv), the metrics
table per variant and epoch, verdicts with their numbers, and the suggested epoch.
"""
from __future__ import annotations

import base64
import html
from pathlib import Path

from lorakit.formats.atomic import atomic_write

DOTS = 40  # a line series with at most this many points also marks each point
COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2"]
STYLE = """body{font-family:system-ui,sans-serif;margin:24px;max-width:1700px;color:#222}
.side{display:flex;gap:24px;align-items:flex-start;flex-wrap:wrap}.side>div{flex:0 1 600px;min-width:360px}
.side>div.wide{flex:1 1 0;min-width:min(100%,640px)}.findings{max-width:640px;background:#f6f8fa;padding:4px 12px;border-left:4px solid #888}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f4f4f4}td.l,th.l{text-align:left}.v-overfit{color:#b00}.v-underfit{color:#a60}
.v-good{color:#070}.v-style{color:#a0a}img{image-rendering:pixelated;max-width:100%}svg{background:#fafafa}"""


def data_uri(path: str | Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def line_chart(series: dict[str, list[tuple[float, float]]], title: str, width: int = 560,
               height: int = 240) -> str:
    """series name -> [(x, y)] as an SVG line chart with axis ranges printed."""
    points = [p for s in series.values() for p in s]
    if not points:
        return f"<p>{html.escape(title)}: no data</p>"
    x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
    y0, y1 = min(p[1] for p in points), max(p[1] for p in points)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1e-9)
    pad = 40

    def xy(p):
        return (pad + (p[0] - x0) / (x1 - x0) * (width - 2 * pad),
                height - pad - (p[1] - y0) / (y1 - y0) * (height - 2 * pad))

    parts = [f'<svg width="{width}" height="{height}" role="img"><title>{html.escape(title)}</title>',
             f'<text x="{pad}" y="16" font-size="13">{html.escape(title)}</text>',
             f'<text x="4" y="{pad}" font-size="10">{y1:.4g}</text>',
             f'<text x="4" y="{height - pad}" font-size="10">{y0:.4g}</text>',
             f'<text x="{pad}" y="{height - 8}" font-size="10">{x0:.4g}</text>',
             f'<text x="{width - pad}" y="{height - 8}" font-size="10" text-anchor="end">{x1:.4g}</text>']
    for n, (name, pts) in enumerate(series.items()):
        colour = COLOURS[n % len(COLOURS)]
        coords = " ".join(f"{a:.1f},{b:.1f}" for a, b in map(xy, pts))
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{coords}"/>')
        if len(pts) <= DOTS:  # sparse series (validation every epoch) show each measurement
            parts += [f'<circle cx="{a:.1f}" cy="{b:.1f}" r="3" fill="{colour}"/>' for a, b in map(xy, pts)]
        parts.append(f'<text x="{width - pad}" y="{30 + 14 * n}" font-size="11" fill="{colour}" '
                     f'text-anchor="end">{html.escape(name)}</text>')
    return "".join(parts) + "</svg>"


def bar_chart(values: dict[str, dict[str, float]], title: str, width: int = 900, height: int = 220) -> str:
    """Grouped bars: label (block) -> {series (attention/conv): value}."""
    labels = list(values)
    names = sorted({k for v in values.values() for k in v})
    top = max((v for d in values.values() for v in d.values()), default=0) or 1.0
    pad, slot = 40, (width - 80) / max(len(labels), 1)
    parts = [f'<svg width="{width}" height="{height}" role="img"><title>{html.escape(title)}</title>',
             f'<text x="{pad}" y="16" font-size="13">{html.escape(title)} (max {top:.3g})</text>']
    bar = slot / (len(names) + 1)
    for i, label in enumerate(labels):
        for n, name in enumerate(names):
            value = values[label].get(name, 0.0)
            h = value / top * (height - 70)
            x = pad + i * slot + n * bar
            parts.append(f'<rect x="{x:.1f}" y="{height - 40 - h:.1f}" width="{bar:.1f}" height="{h:.1f}" '
                         f'fill="{COLOURS[n % len(COLOURS)]}"><title>{label} {name} {value:.4g}</title></rect>')
        parts.append(f'<text x="{pad + i * slot:.1f}" y="{height - 24}" font-size="9" '
                     f'transform="rotate(45 {pad + i * slot:.1f},{height - 24})">{html.escape(label)}</text>')
    for n, name in enumerate(names):
        parts.append(f'<text x="{width - 40}" y="{30 + 14 * n}" font-size="11" text-anchor="end" '
                     f'fill="{COLOURS[n % len(COLOURS)]}">{html.escape(name)}</text>')
    return "".join(parts) + "</svg>"


def table(rows: list[dict], columns: list[str], fmt: str = "{:.4g}") -> str:
    head = "".join(f'<th class="{"l" if i == 0 else ""}">{html.escape(c)}</th>' for i, c in enumerate(columns))
    body = []
    for row in rows:
        cells = []
        for i, c in enumerate(columns):
            v = row.get(c, "")
            text = fmt.format(v) if isinstance(v, float) else str(v)
            cells.append(f'<td class="{"l" if i == 0 else ""}">{html.escape(text)}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def verdict_table(rows: list[dict]) -> str:
    """rows: {"variant", "epoch", "why", "verdicts": [{"kind", "line"}]}: one row per variant, its verdicts
    (the word coloured by kind) with their numbers."""
    body = []
    for row in rows:
        verdicts = "".join(f'<div><b class="v-{html.escape(v["kind"].split()[0])}">{html.escape(v["kind"])}</b>: '
                           f'{html.escape(v["line"])}</div>' for v in row["verdicts"])
        body.append(f'<tr><td class="l">{html.escape(row["variant"])}</td><td>{row["epoch"]}</td>'
                    f'<td class="l">{verdicts}<div><small>{html.escape(row["why"])}</small></div></td></tr>')
    return ('<table class="verdicts"><tr><th class="l">variant</th><th>best epoch</th><th class="l">verdict at '
            f'the best epoch</th></tr>{"".join(body)}</table>')


def side_by_side(left: str, right: str) -> str:
    """Two blocks next to each other on a wide screen (the right one takes the remaining width), stacked
    on a narrow one."""
    return f'<div class="side"><div>{left}</div><div class="wide">{right}</div></div>'


def paragraphs(text: str) -> str:
    """Plain text (blank lines between paragraphs) as escaped HTML."""
    return "".join(f"<p>{html.escape(p.strip())}</p>" for p in text.split("\n\n") if p.strip())


def write_report(path: str | Path, title: str, sections: list[tuple[str, str]]) -> Path:
    """sections: (heading, HTML body) in order."""
    body = "".join(f"<h2>{html.escape(h)}</h2>{content}" for h, content in sections)
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>")
    return atomic_write(path, page)
