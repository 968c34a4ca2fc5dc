"""The audit's report page: its plots (matplotlib, as inline PNGs) and the self-contained
HTML around them, rendered from :data:`TEMPLATE` with jinja2 (every value escaped).
"""

from __future__ import annotations

import base64
import io
from typing import Any

import jinja2
import numpy as np

from proxy.evaluation.items import SPLITS


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def plots(report: dict[str, Any], reference: dict[str, float] | None) -> dict[str, str]:
    """The report's figures as PNG data URLs: ROUGE forget vs retain, forget
    truth ratios against the reference's, ROC of the Min-K% membership inference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = report["items"]
    figs: dict[str, str] = {}
    fr = [r["rouge"] for r in items.get("forget", []) if r.get("rouge") is not None]
    rr = [r["rouge"] for r in items.get("retain", []) if r.get("rouge") is not None]
    if fr or rr:
        fig, ax = plt.subplots(figsize=(5, 3))
        bins = np.linspace(0, 1, 11).tolist()
        if fr:
            ax.hist(fr, bins=bins, alpha=0.6, label=f"forget (n={len(fr)})")
        if rr:
            ax.hist(rr, bins=bins, alpha=0.6, label=f"retain (n={len(rr)})")
        ax.set_xlabel("ROUGE-L recall of the greedy answer")
        ax.set_ylabel("items")
        ax.legend()
        figs["rouge"] = _png(fig)
    ftr = [r["truth_ratio"] for r in items.get("forget", []) if r.get("truth_ratio") is not None]
    if ftr:
        fig, ax = plt.subplots(figsize=(5, 3))
        vals = np.log(np.maximum(ftr, 1e-12))
        ref = np.log(np.maximum(list(reference.values()), 1e-12)) if reference else None
        lo, hi = (
            (min(vals.min(), ref.min()), max(vals.max(), ref.max())) if ref is not None else (vals.min(), vals.max())
        )
        bins = np.linspace(lo - 0.1, hi + 0.1, 16).tolist()
        ax.hist(vals, bins=bins, alpha=0.6, label="this model")
        if ref is not None:
            ax.hist(ref, bins=bins, alpha=0.6, label="reference (retain model)")
        ax.set_xlabel("log truth ratio, forget items")
        ax.set_ylabel("items")
        ax.legend()
        figs["truth_ratio"] = _png(fig)
    fmk = [r["min_k"] for r in items.get("forget", []) if r.get("min_k") is not None]
    hmk = [r["min_k"] for r in items.get("holdout", []) if r.get("min_k") is not None]
    if fmk and hmk:
        scores = np.r_[fmk, hmk]
        labels = np.r_[np.zeros(len(fmk)), np.ones(len(hmk))]
        order = np.argsort(-scores, kind="stable")
        tpr = np.r_[0, np.cumsum(labels[order]) / len(hmk)]
        fpr = np.r_[0, np.cumsum(1 - labels[order]) / len(fmk)]
        fig, ax = plt.subplots(figsize=(4, 4))
        ax.plot(fpr, tpr, label=f"Min-K% (AUC {report['summary'].get('mia_min_k', float('nan')):.3f})")
        ax.plot([0, 1], [0, 1], "--", color="grey", label="chance")
        ax.set_xlabel("false positive rate (forget called holdout)")
        ax.set_ylabel("true positive rate (holdout)")
        ax.legend()
        figs["mia_roc"] = _png(fig)
    return figs


def _fmt(value: Any, spec: str, missing: str = "") -> str:
    return missing if value is None else format(value, spec)


#: The report page. Every ``{{ value }}`` is escaped (``autoescape``); the figures' ``src`` are
#: PNG data URLs. Whitespace control (``-``) keeps the rows of a table on one line.
TEMPLATE = """\
<!doctype html>
<html lang=en><head><meta charset=utf-8><title>deltaproxy audit: {{ model.get("name", "") }}</title>
<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}
td,th{border:1px solid #ccc;padding:2px 6px;font-size:13px;vertical-align:top}.fail{background:#fdd}.pass{background:#dfd}
.warn{color:#a60}figure{display:inline-block;margin:0 1em 1em 0}</style></head><body>
<h1>deltaproxy audit</h1>
<p>Model <b>{{ model.get("name", "") }}</b>, offset sha256 <code>{{ model.get("offset_sha256") }}</code>,
α {{ model.get("alpha") }}, deltaproxy {{ software["version"] }}, {{ date }}.</p>
{% if not possible["probability_metrics"] -%}
<p class=warn>Probability metrics not possible: {{ possible["probability_metrics_reason"] }}</p>
{%- endif %}{% if policy -%}
<h2>Policy: {{ "PASS" if policy["pass"] else "FAIL" }}</h2><table><tr><th>metric</th><th>threshold</th><th>value</th><th></th></tr>
{%- for r in policy["results"] -%}
<tr class={{ "pass" if r["pass"] else "fail" }}><td>{{ r["metric"] }}</td>
{#- #}<td>{{ "≥ " ~ r["min"] if "min" in r else "≤ " ~ r["max"] }}</td>
{#- #}<td>{{ r["value"] | fmt(".4g", "n/a") }}</td><td>{{ "pass" if r["pass"] else "FAIL" }}</td></tr>
{%- endfor -%}
</table>
{%- endif %}
<h2>Summary</h2><table>
{%- for k, v in summary.items() -%}
<tr><td>{{ k }}</td><td>{{ v | fmt(".4g") if v is float else v }}</td></tr>
{%- endfor -%}
</table>
<h2>Plots</h2>
{%- for k, v in figures.items() -%}
<figure><img alt="{{ captions[k] }}" src="{{ v }}"><figcaption>{{ captions[k] }}</figcaption></figure>
{%- endfor %}
<h2>Items</h2><table><tr><th>split</th><th>question</th><th>greedy answer</th><th>ROUGE-L</th><th>truth ratio</th><th>leak</th></tr>
{%- for split in splits %}{% for r in items.get(split, []) -%}
<tr><td>{{ r["split"] }}</td><td>{{ r["question"] }}</td><td>{{ r.get("generation", "") }}</td>
{#- #}<td>{{ r.get("rouge") | fmt(".2f") }}</td><td>{{ r.get("truth_ratio") | fmt(".3g") }}</td>
{#- #}<td>{{ r.get("leak") | fmt(".2f") }}</td></tr>
{%- endfor %}{% endfor -%}
</table>
</body></html>
"""

CAPTIONS = {
    "rouge": "ROUGE-L recall of greedy answers, forget vs retain items",
    "truth_ratio": "Forget truth ratios against the reference (retain) model's",
    "mia_roc": "ROC of the Min-K% membership inference, forget vs holdout",
}

_ENV = jinja2.Environment(autoescape=True, keep_trailing_newline=True, undefined=jinja2.StrictUndefined)
_ENV.filters["fmt"] = _fmt
_PAGE = _ENV.from_string(TEMPLATE)


def render_html(report: dict[str, Any], reference: dict[str, float] | None) -> str:
    """A self-contained HTML page: summary, policy results, plots, per-item table."""
    return _PAGE.render(
        model=report["model"],
        software=report["software"],
        date=report["date"],
        possible=report["possible"],
        policy=report.get("policy"),
        summary=report["summary"],
        figures=plots(report, reference),
        captions=CAPTIONS,
        splits=SPLITS,
        items=report["items"],
    )
