"""The report page: one self-contained HTML file (inline CSS and SVG, images as `data:` URIs,
no script) whose Content-Security-Policy forbids anything else, so it opens offline and
fetches nothing. Everything from the job (captions, URLs, keys, errors, names) is escaped."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from html import escape

from producer.report.charts import Bar, Point, Series, bar_chart, column_chart, histogram
from recap.quality import FLAGS, word_count
from recap.store import JobInfo, JobStatus
from recap.store.report import SCORE_COLUMNS, FailedExample, SampledItem, ThroughputPoint

_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;background:#fafafa}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;background:#fff}
td,th{border:1px solid #e2e2e2;padding:6px 8px;vertical-align:top}
th{background:#f0f0f0;text-align:left}.charts{display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start}
.chart{background:#fff;border:1px solid #e2e2e2;padding:8px}.chart h3{font-size:13px;margin:0 0 6px}
.sample td.img{width:260px;text-align:center}.sample td.cap{width:36%}
.sample img{max-width:256px;max-height:256px}
.missing{width:256px;height:120px;display:flex;align-items:center;justify-content:center;
background:repeating-linear-gradient(45deg,#eee,#eee 8px,#f7f7f7 8px,#f7f7f7 16px);
color:#777;font-size:12px;padding:4px}
.key{font:11px monospace;color:#666;word-break:break-all}.flag{display:inline-block;background:#f6d7a7;
border-radius:3px;padding:0 5px;margin:1px;font-size:12px}.score{font:12px monospace}
pre{background:#fff;border:1px solid #e2e2e2;padding:8px;white-space:pre-wrap;
word-break:break-word;max-width:1100px}
.muted{color:#777}
"""


@dataclass(frozen=True, slots=True)
class SampleRow:
    """A sampled item and its thumbnail (`data:` URI), or why it has none."""

    item: SampledItem
    thumbnail: str | None
    missing: str | None = None


@dataclass(frozen=True, slots=True)
class ReportPage:
    job: JobInfo
    status: JobStatus
    sample: Sequence[SampleRow]
    failures: Sequence[FailedExample]
    throughput: Sequence[ThroughputPoint]
    provenances: dict[int, dict]
    generated_at: datetime


def render(page: ReportPage) -> str:
    """The whole HTML document."""
    title = f"recap report: {page.job.name}"
    body = "".join(
        (
            f"<h1>{escape(title)}</h1>",
            f'<p class="muted">made {page.generated_at.astimezone(UTC):%Y-%m-%d %H:%M} UTC from '
            f"{len(page.sample)} random done items; counts and errors from every chunk</p>",
            '<div class="charts">',
            _summary(page),
            _charts(page),
            "</div>",
            _sample(page.sample),
            _failures(page),
            _setup(page),
        )
    )
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)}</title><style>{_CSS}</style></head><body>{body}</body></html>\n"
    )


def _table(rows: Sequence[tuple[str, str]]) -> str:
    """Two columns; both already HTML."""
    return "<table>" + "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows) + "</table>"


def _summary(page: ReportPage) -> str:
    items, status = page.status.items, page.status
    rate = "–" if status.rate_per_s is None else f"{status.rate_per_s * 60:,.1f} items/min"
    counts = f"{items.done:,} done, {items.failed:,} failed, {items.pending:,} pending"
    chunks = ", ".join(f"{n:,} {state}" for state, n in _fields(status.chunks) if n)
    rows = [
        ("job", escape(page.job.name)),
        ("model", escape(page.job.model)),
        ("items", f"{items.total:,} ({counts})"),
        ("chunks", escape(chunks)),
        ("throughput", rate),
        ("set-up", '<a href="#setup">prompt, generation, provenance</a>'),
    ]
    return f'<div class="chart"><h3>Job</h3>{_table(rows)}</div>'


def _fields(counts) -> list[tuple[str, int]]:
    return [(name, getattr(counts, name)) for name in counts.__dataclass_fields__]


def _charts(page: ReportPage) -> str:
    items = [row.item for row in page.sample]
    charts = [
        (
            "Caption length (words, sample)",
            histogram(
                "caption length",
                [
                    Series("original", [word_count(i.org_caption) for i in items if i.org_caption]),
                    Series("new", [word_count(i.caption) for i in items if i.caption]),
                ],
            ),
        ),
        ("Flag rates (sample)", bar_chart("flag rates", _flag_bars(items))),
        (
            "Failed items by error class (all chunks)",
            bar_chart("errors", [Bar(k, v) for k, v in page.status.errors.items()], "no failed items"),
        ),
        (
            "Throughput (items per minute)",
            column_chart(
                "throughput",
                [
                    Point(f"{datetime.fromtimestamp(p.start, UTC):%H:%M:%S}", p.per_minute)
                    for p in page.throughput
                ],
            ),
        ),
    ]
    scores = [Series(name, [i.scores[name] for i in items if name in i.scores]) for name in SCORE_COLUMNS]
    if any(s.values for s in scores):
        charts.append(("Scores (sample)", histogram("scores", [s for s in scores if s.values])))
    return "".join(f'<div class="chart"><h3>{escape(name)}</h3>{svg}</div>' for name, svg in charts)


def _flag_bars(items: Sequence[SampledItem]) -> list[Bar]:
    if not items:
        return []
    counts = Counter(flag for item in items for flag in set(item.flags))
    unflagged = sum(1 for item in items if not item.flags)
    names = list(FLAGS) + sorted(set(counts) - set(FLAGS))
    bars = [(name, counts[name]) for name in names] + [("no flag", unflagged)]
    return [Bar(name, 100.0 * n / len(items), f"{100.0 * n / len(items):.1f}% ({n})") for name, n in bars]


def _sample(rows: Sequence[SampleRow]) -> str:
    if not rows:
        return "<h2>Sample</h2><p>No done items yet.</p>"
    head = "<tr><th>image</th><th>original caption</th><th>new caption</th><th>flags and scores</th></tr>"
    body = "".join(map(_sample_row, rows))
    return f"<h2>Sample ({len(rows)} items)</h2><table class=sample>{head}{body}</table>"


def _sample_row(row: SampleRow) -> str:
    item = row.item
    if row.thumbnail:
        image = f'<img src="{escape(row.thumbnail)}" alt="{escape(item.key)}" loading="eager">'
    else:
        image = f'<div class="missing">image gone: {escape(row.missing or "unknown")}</div>'
    size = f"{item.width}×{item.height}" if item.width and item.height else ""
    where = f'<div class="key">{escape(item.key)}<br>{escape(item.url)}<br>{size}</div>'
    flags = (
        "".join(f'<span class="flag">{escape(f)}</span>' for f in item.flags)
        or '<span class="muted">none</span>'
    )
    scores = "".join(f'<div class="score">{escape(k)} {v:.4f}</div>' for k, v in item.scores.items())
    return (
        f'<tr><td class="img">{image}{where}</td><td class="cap">{_caption(item.org_caption)}</td>'
        f'<td class="cap">{_caption(item.caption)}</td><td>{flags}{scores}</td></tr>'
    )


def _caption(text: str | None) -> str:
    if not text:
        return '<span class="muted">none</span>'
    return f'{escape(text)}<div class="muted">{word_count(text)} words</div>'


def _failures(page: ReportPage) -> str:
    if not page.status.errors:
        return "<h2>Failed items</h2><p>None.</p>"
    by_class: dict[str, list[FailedExample]] = {}
    for example in page.failures:
        by_class.setdefault(example.error_class, []).append(example)
    parts = ["<h2>Failed items by error class</h2>"]
    for name, count in page.status.errors.items():
        rows = "".join(
            f'<tr><td class="key">{escape(e.key)}</td><td class="key">{escape(e.url)}</td>'
            f"<td>{escape(e.error or '')}</td></tr>"
            for e in by_class.get(name, [])
        )
        parts.append(f"<h3>{escape(name)}: {count:,} items</h3><table>{rows}</table>")
    return "".join(parts)


def _setup(page: ReportPage) -> str:
    provenance = "".join(
        f"<h3>provenance {pid}</h3><pre>{escape(_json(data))}</pre>"
        for pid, data in sorted(page.provenances.items())
    )
    return (
        '<h2 id="setup">Model, prompt and generation</h2>'
        + _table([("model", escape(page.job.model)), ("prompt", f"<pre>{escape(page.job.prompt)}</pre>")])
        + f"<h3>generation</h3><pre>{escape(_json(page.job.generation.to_json()))}</pre>"
        + (provenance or '<p class="muted">no provenance in the sample</p>')
    )


def _json(data: dict) -> str:
    return json.dumps(data, indent=2, sort_keys=True, default=str)
