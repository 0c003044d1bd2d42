"""One self-contained HTML page for a run folder (images and plots embedded as data URIs).

The page is assembled from what the run left on disk, so it can be rebuilt at any time with
`diode report RUN_DIR`: synthesis folders (`manifest.jsonl`, `grids/`, `batches/`), training or
distillation folders (`history.json`), experiment tables (`table.json`), demo summaries
(`summary.json`), in the folder itself and its immediate subfolders.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from diode.errors import DiodeError  # noqa: E402
from diode.io import atomic_write_text  # noqa: E402

MAX_GRIDS = 4  # batches whose grids are shown per synthesis folder

CSS = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px;color:#222}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
img{max-width:100%;image-rendering:pixelated;border:1px solid #ddd;margin:.3em 0}
.pair{display:flex;gap:1em;flex-wrap:wrap}.pair figure{margin:0;flex:1;min-width:300px}
figcaption{font-size:.9em;color:#555}
"""


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _figure_png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="{_data_uri(png)}">'


def _table(rows: list[dict], columns: list[str] | None = None) -> str:
    if not rows:
        return "<p>(empty)</p>"
    columns = columns or list(rows[0])

    def cell(v) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return html.escape("" if v is None else str(v))

    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{cell(r.get(c))}</td>" for c in columns) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _synthesis_section(folder: Path) -> str:
    parts = [f"<h2>Synthesis: {html.escape(folder.name)}</h2>"]
    summary_path = folder / "summary.json"
    if summary_path.exists():
        summary = json.loads(summary_path.read_text())
        parts.append(_table([{k: v for k, v in summary.items()}]))
    records = [json.loads(p.read_text()) for p in sorted((folder / "batches").glob("*.json"))]
    if records and records[0].get("history"):
        fig, ax = plt.subplots(figsize=(7, 3.2))
        for key in ("total", "task", "bn", "tv_l1"):
            xs = [h["iteration"] for h in records[0]["history"] if key in h]
            ys = [h[key] for h in records[0]["history"] if key in h]
            if xs:
                ax.plot(xs, ys, label=key)
        ax.set_yscale("log")
        ax.set_xlabel("iteration")
        ax.set_title("loss terms (unweighted; total weighted), batch 0")
        ax.legend()
        parts.append(_img(_figure_png(fig), "synthesis loss curves"))
    for rec in records[:MAX_GRIDS]:
        b = rec["batch"]
        figures = []
        for kind, caption in (("targets", "requested targets (+ aggregated false positives)"),
                              ("teacher", "teacher predictions (score >= 0.3)")):
            path = folder / "grids" / f"{b:06d}_{kind}.png"
            if path.exists():
                figures.append(f"<figure>{_img(path.read_bytes(), f'batch {b} {kind}')}"
                               f"<figcaption>batch {b}: {caption}</figcaption></figure>")
        agreement = rec.get("teacher_agreement")
        parts.append(f"<p>batch {b}: teacher agreement (mAP@.5) {agreement:.3f}</p>" if agreement is not None else "")
        parts.append(f'<div class="pair">{"".join(figures)}</div>')
    return "\n".join(parts)


def _training_section(folder: Path) -> str:
    history = json.loads((folder / "history.json").read_text())
    parts = [f"<h2>Training: {html.escape(folder.name)}</h2>"]
    if history:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.2))
        keys = list(history[0]["loss"])
        for k in keys:
            ax1.plot([h["epoch"] for h in history], [h["loss"][k] for h in history], label=k)
        ax1.set_xlabel("epoch")
        ax1.set_title("training loss terms")
        ax1.legend()
        evaluated = [h for h in history if h.get("metrics")]
        if evaluated:
            for key, label in (("map_50", "mAP@.5"), ("map", "mAP@[.5:.95]")):
                ax2.plot([h["epoch"] for h in evaluated], [h["metrics"][key] for h in evaluated], "o-", label=label)
            ax2.set_xlabel("epoch")
            ax2.set_title("validation (real images)")
            ax2.legend()
        parts.append(_img(_figure_png(fig), "training curves"))
        last = evaluated[-1]["metrics"] if evaluated else None
        if last:
            parts.append(_table([{"metric": k, "value": last[k]} for k in
                                 ("map", "map_50", "map_75", "map_small", "map_medium", "map_large")]))
    return "\n".join(parts)


def _table_section(folder: Path) -> str:
    table = json.loads((folder / "table.json").read_text())
    rows = table["rows"] if isinstance(table, dict) else table
    parts = [f"<h2>Results: {html.escape(folder.name)}</h2>", _table(rows)]
    for plot in sorted(folder.glob("*.png")):
        parts.append(f"<figure>{_img(plot.read_bytes(), plot.stem)}<figcaption>{html.escape(plot.stem)}"
                     f"</figcaption></figure>")
    return "\n".join(parts)


def _summary_section(folder: Path) -> str:
    summary = json.loads((folder / "summary.json").read_text())
    return "<h2>Summary</h2>" + _table([{"key": k, "value": v} for k, v in summary.items()
                                         if not isinstance(v, (dict, list))])


def _sections(folder: Path, top: bool) -> list[str]:
    sections = []
    if (folder / "manifest.jsonl").exists():
        sections.append(_synthesis_section(folder))
    elif top and (folder / "summary.json").exists():
        sections.append(_summary_section(folder))
    if (folder / "table.json").exists():
        sections.append(_table_section(folder))
    if (folder / "history.json").exists():
        sections.append(_training_section(folder))
    return sections


def write_report(run_dir: str | Path) -> Path:
    """Write `run_dir/report.html` and return its path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DiodeError(f"{run_dir}: no such run folder")
    sections = _sections(run_dir, top=True)
    for sub in sorted(p for p in run_dir.iterdir() if p.is_dir()):
        sections.extend(_sections(sub, top=False))
    if not sections:
        raise DiodeError(f"{run_dir}: nothing to report (no manifest.jsonl, history.json, table.json or "
                         f"summary.json here or one level down)")
    page = (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>diode report: "
            f"{html.escape(run_dir.name)}</title><style>{CSS}</style></head><body>"
            f"<h1>diode report: {html.escape(str(run_dir))}</h1>{''.join(sections)}</body></html>")
    out = run_dir / "report.html"
    atomic_write_text(out, page)
    return out
