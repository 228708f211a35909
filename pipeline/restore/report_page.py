"""One self-contained HTML page about an output: counts, errors, sharpness, stage times and a
before/after gallery. Images are inlined as data URIs and the charts are inline SVG, so the
page opens anywhere (a mail attachment, an object-store console) with no network."""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections import Counter
from collections.abc import Mapping
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from pipeline import imaging, safe_text, storage
from pipeline.restore import shard_input, shards
from pipeline.restore.ledger import latest_per_item, read_metrics
from pipeline.restore.run_records import read_run_records
from pipeline.restore.summary import error_kind, mean_gain

# Chart colours, fixed so that a screenshot test can find the charts.
BEFORE, AFTER, STAGE = "#4c78a8", "#f58518", "#54a24b"
GALLERY_WIDTH = 360  # px per image in the gallery; larger images are shown scaled down
ZOOM_CROP, ZOOM = 48, 4  # a 48 px square of the output, shown 4x with square pixels

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px;color:#222;
     background:#fff;max-width:1200px}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd}
.sub{color:#666;font-size:13px}
table{border-collapse:collapse;font-size:13px} td,th{padding:3px 10px;text-align:left}
tr:nth-child(even){background:#f6f6f6} td.n{text-align:right;font-variant-numeric:tabular-nums}
.cards{display:flex;flex-wrap:wrap;gap:18px}
.card{border:1px solid #ddd;border-radius:6px;padding:10px}
.card h3{font-size:14px;margin:0 0 6px} .pair{display:flex;gap:8px;align-items:flex-start}
figure{margin:0} figcaption{font-size:12px;color:#555;text-align:center}
img.zoom{image-rendering:pixelated} .charts{display:flex;flex-wrap:wrap;gap:24px}
.legend span{display:inline-block;width:10px;height:10px;margin:0 4px 0 10px}
code{font-size:12px}
img.checker{background:repeating-conic-gradient(#ccc 0 25%,#fff 0 50%) 0 0/16px 16px}
"""


def write_report(output_uri: str, page_uri: str | None = None,
                 options: Mapping | None = None,
                 latest: pa.Table | None = None) -> str | None:
    """Render the page for everything under ``output_uri`` and write it to ``page_uri``
    (``{output}/report.html`` by default); returns its URI, or None when there are no metrics.
    ``latest`` (the newest row per image) saves reading the ledger when the caller has it."""
    if latest is None:
        latest = latest_per_item(read_metrics(storage.join(output_uri, "metrics"), options))
    if not latest.num_rows:
        return None
    page = render(latest, read_run_records(output_uri, options), output_uri, options)
    # The page quotes URIs, settings and error messages: none of their credentials.
    page = safe_text.redact(page, options)
    page_uri = page_uri or storage.join(output_uri, "report.html")
    storage.write_bytes_atomic(page_uri, page.encode(), options)
    return page_uri


def render(latest: pa.Table, runs: list[dict], output_uri: str, options: Mapping | None = None,
           samples: int = 2) -> str:
    """The page for ``latest`` (the newest metrics row per image, :func:`latest_per_item`).

    ``runs`` are the run records (settings, checkpoint, counts) the job wrote, newest last.
    The gallery reads the restored images and recomputes the bicubic ones from the sources;
    an image that cannot be read any more is named, not shown.
    """
    ok = latest.filter(pc.equal(latest["status"], "ok"))
    parts = [f"<h1>Restoration report</h1><div class=sub>{_e(output_uri)} &middot; "
             f"{latest.num_rows} images &middot; generated "
             f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC</div>",
             _headline(latest, ok, runs), _status_section(latest), _charts_section(ok),
             _handling_section(ok), _gallery_section(ok, options, samples),
             _runs_section(runs, latest)]
    return ("<!doctype html><html lang=en><head><meta charset=utf-8>"
            "<meta name=viewport content='width=device-width'>"
            f"<title>Restoration report: {_e(output_uri)}</title><style>{_CSS}</style></head>"
            f"<body>{''.join(parts)}</body></html>")


def _e(text) -> str:
    return html.escape(str(text), quote=True)


def _headline(latest: pa.Table, ok: pa.Table, runs: list[dict]) -> str:
    facts = [f"<b>{ok.num_rows}</b> of {latest.num_rows} images restored"]
    gain = mean_gain(ok, "lapvar")
    if gain is not None:
        facts.append(f"Laplacian variance <b>x{gain:.2f}</b> of bicubic on average")
    if runs and runs[-1].get("images_per_s") is not None:
        facts.append(f"newest run: <b>{runs[-1]['images_per_s']:.2f}</b> images/s")
    return f"<p>{' &middot; '.join(facts)}</p>"


def _status_section(latest: pa.Table) -> str:
    status = Counter(latest["status"].to_pylist())
    rows = "".join(f"<tr><td>{_e(s)}</td><td class=n>{n}</td>"
                   f"<td class=n>{100 * n / max(1, latest.num_rows):.1f}%</td></tr>"
                   for s, n in sorted(status.items()))
    errors = latest.filter(pc.not_equal(latest["status"], "ok"))
    reasons = Counter(error_kind(e or "") for e in errors["error"].to_pylist())
    top = "".join(f"<tr><td class=n>{n}</td><td><code>{_e(r)}</code></td></tr>"
                  for r, n in reasons.most_common(10))
    out = ("<h2>Images by status</h2><table><tr><th>status</th><th>images</th><th></th></tr>"
           f"{rows}</table>")
    if top:
        out += ("<h2>Top error reasons</h2><table><tr><th>images</th><th>reason</th></tr>"
                f"{top}</table>")
    return out


NOT_RECORDED = "not recorded (an earlier release)"


def _handling_section(ok: pa.Table) -> str:
    """Restored images counted by what their copies kept: alpha, colour, metadata, depth."""
    if not ok.num_rows:
        return ""

    def values(name: str) -> list:
        return ok[name].to_pylist() if name in ok.column_names else [None] * ok.num_rows

    def counts(name: str, value=lambda v: v) -> Counter:
        return Counter(NOT_RECORDED if v is None else value(v) for v in values(name))

    # A null profile is an untagged input in a recorded row, not a missing record.
    profiles = Counter(NOT_RECORDED if handled is None else "none (untagged)" if p is None else p
                       for p, handled in zip(values("colour_profile"), values("colour")))
    tables = [("Transparency", counts("alpha")), ("Colour", counts("colour")),
              ("Colour profile", profiles),
              ("Metadata kept", counts("metadata_kept", lambda v: ", ".join(sorted(v)) or
                                       "none")),
              ("Output bits per channel", counts("bit_depth", str))]
    parts = []
    for title, counter in tables:
        rows = "".join(f"<tr><td>{_e(v)}</td><td class=n>{n}</td></tr>"
                       for v, n in counter.most_common())
        parts.append(f"<table><tr><th>{_e(title)}</th><th>images</th></tr>{rows}</table>")
    return ("<h2>What the copies kept</h2><div class=charts>" + "".join(parts) + "</div>")


def _column(table: pa.Table, name: str) -> np.ndarray:
    return table[name].to_numpy(zero_copy_only=False).astype(np.float64)


def _charts_section(ok: pa.Table) -> str:
    if not ok.num_rows:
        return "<h2>Sharpness</h2><p>No image was restored.</p>"
    legend = (f"<div class=legend><span style='background:{BEFORE}'></span>bicubic 2x"
              f"<span style='background:{AFTER}'></span>restored</div>")
    charts = [_histogram(_column(ok, "lapvar_in"), _column(ok, "lapvar_out"),
                         "Laplacian variance (log scale)"),
              _histogram(_column(ok, "tenengrad_in"), _column(ok, "tenengrad_out"),
                         "Tenengrad (log scale)")]
    stages = {name: _column(ok, f"{name}_s") for name in ("read", "decode", "restore", "write")}
    return (f"<h2>Sharpness before and after</h2>{legend}<div class=charts>{''.join(charts)}"
            f"</div><h2>Time per image by stage</h2>{_stage_bars(stages)}")


def _histogram(before: np.ndarray, after: np.ndarray, title: str,
               width: int = 520, height: int = 220) -> str:
    """Two series binned on one log10 axis, drawn as side-by-side bars in each bin."""
    bins = int(np.clip(2 * np.sqrt(before.size), 6, 30))
    b, a = (np.log10(np.clip(x[np.isfinite(x)], 1e-6, None)) for x in (before, after))
    both = np.concatenate([b, a])
    lo, hi = float(both.min()), float(both.max())
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    edges = np.linspace(lo, hi, bins + 1)
    hb, ha = np.histogram(b, edges)[0], np.histogram(a, edges)[0]
    top = max(1, int(max(hb.max(), ha.max())))
    left, bottom, plot_w, plot_h = 40, 30, width - 50, height - 60
    step = plot_w / bins
    bars = []
    for i, (nb, na) in enumerate(zip(hb, ha)):
        for k, (n, colour) in enumerate(((nb, BEFORE), (na, AFTER))):
            h = plot_h * n / top
            x = left + i * step + k * step / 2
            bars.append(f"<rect x='{x:.1f}' y='{height - bottom - h:.1f}' width='{step / 2:.1f}'"
                        f" height='{h:.1f}' fill='{colour}'><title>{n} images</title></rect>")
    ticks = []
    for v in range(math.ceil(lo), math.floor(hi) + 1):
        x = left + (v - lo) / (hi - lo) * plot_w
        ticks.append(f"<text x='{x:.1f}' y='{height - bottom + 16}' font-size='11' "
                     f"text-anchor='middle'>1e{v}</text>")
    axis = (f"<line x1='{left}' y1='{height - bottom}' x2='{left + plot_w}' "
            f"y2='{height - bottom}' stroke='#888'/>"
            f"<text x='{left - 6}' y='{height - bottom - plot_h + 4}' font-size='11' "
            f"text-anchor='end'>{top}</text>")
    return (f"<figure><svg width='{width}' height='{height}' role='img'>"
            f"<text x='{left}' y='16' font-size='13'>{_e(title)}</text>{axis}"
            f"{''.join(bars)}{''.join(ticks)}</svg></figure>")


def _stage_bars(stages: dict[str, np.ndarray], width: int = 520) -> str:
    """Mean and 95th percentile milliseconds per image of each stage, as bars and a table."""
    means = {k: float(np.nanmean(v)) * 1000 if np.isfinite(v).any() else 0.0
             for k, v in stages.items()}
    top = max(max(means.values()), 1e-9)
    rows, bars = [], []
    for i, (name, values) in enumerate(stages.items()):
        w = (width - 170) * means[name] / top
        bars.append(f"<text x='0' y='{22 + 26 * i}' font-size='12'>{name}</text>"
                    f"<rect x='70' y='{10 + 26 * i}' width='{w:.1f}' height='16' "
                    f"fill='{STAGE}'/><text x='{76 + w:.1f}' y='{22 + 26 * i}' font-size='11'>"
                    f"{means[name]:.1f} ms</text>")
        finite = values[np.isfinite(values)]
        p95 = float(np.percentile(finite, 95)) * 1000 if finite.size else float("nan")
        rows.append(f"<tr><td>{name}</td><td class=n>{means[name]:.1f}</td>"
                    f"<td class=n>{p95:.1f}</td></tr>")
    svg = (f"<svg width='{width}' height='{16 + 26 * len(stages)}' role='img'>"
           f"{''.join(bars)}</svg>")
    return (f"<div class=charts><figure>{svg}</figure><table><tr><th>stage</th>"
            f"<th>mean ms</th><th>p95 ms</th></tr>{''.join(rows)}</table></div>"
            "<p class=sub>restore is each image's share of its batch on its actor: the 2x "
            "bicubic upscale, the sharpness measures and the model, on the actor's device.</p>")


def _gallery_section(ok: pa.Table, options: Mapping | None, samples: int) -> str:
    if not ok.num_rows:
        return ""
    before, after = _column(ok, "lapvar_in"), _column(ok, "lapvar_out")
    gain = np.where(before > 0, after / np.where(before > 0, before, 1), np.nan)
    picks: list[tuple[str, int]] = []
    order = np.argsort(np.nan_to_num(gain, nan=-np.inf))
    picks.append(("largest sharpness gain", int(order[-1])))
    finite = np.flatnonzero(np.isfinite(gain))
    if finite.size:
        picks.append(("smallest sharpness gain", int(finite[np.argmin(gain[finite])])))
    # Evenly spaced through the ledger: a fixed, unselected sample.
    for i in np.linspace(0, ok.num_rows - 1, samples + 2)[1:-1].round().astype(int):
        picks.append(("sample", int(i)))
    if "alpha" in ok.column_names:  # one transparent image, shown on a checkerboard
        kept = np.flatnonzero(np.array([a == "kept" for a in ok["alpha"].to_pylist()]))
        if kept.size and not set(kept.tolist()) & {i for _, i in picks}:
            picks.append(("transparent", int(kept[0])))
    seen, cards = set(), []
    for label, i in picks:
        if i in seen:
            continue
        seen.add(i)
        cards.append(_card(label, ok.slice(i, 1).to_pylist()[0], gain[i], options))
    return ("<h2>Before and after</h2><p class=sub>Left: the bicubic 2x the model starts from; "
            f"right: the restored image. Below: a {ZOOM_CROP} px square at {ZOOM}x.</p>"
            f"<div class=cards>{''.join(cards)}</div>")


def _card(label: str, row: dict, gain: float, options: Mapping | None) -> str:
    change = f"x{gain:.2f}" if np.isfinite(gain) else "n/a (flat bicubic)"
    head = (f"<h3>{_e(label)}: {_e(row['id'])}</h3><div class=sub>{row['in_width']}x"
            f"{row['in_height']} &rarr; {row['out_width']}x{row['out_height']}, "
            f"Laplacian variance {change}</div>")
    try:
        restored = _rgba(imaging.read(shards.read_output(row, options)))
        source = imaging.read(shard_input.read_source(row["source_uri"], options))
        bicubic = _rgba(source, upscale=True)
    except Exception as e:
        return f"<div class=card>{head}<p>cannot show it: {_e(type(e).__name__)}: {_e(e)}</p></div>"
    y, x = _busiest_square(restored, ZOOM_CROP)
    figures = [_figure(_fit(bicubic), "bicubic"), _figure(_fit(restored), "restored")]
    zooms = [_figure(_zoom(img, y, x), name, css="zoom") for img, name in
             ((bicubic, "bicubic"), (restored, "restored"))]
    return (f"<div class=card>{head}<div class=pair>{''.join(figures)}</div>"
            f"<div class=pair>{''.join(zooms)}</div></div>")


def _rgba(image: imaging.Decoded, upscale: bool = False) -> np.ndarray:
    """8-bit RGB, or RGBA for an image with alpha (2x bicubic with ``upscale``)."""
    rgb = imaging.to_8bit(image.rgb)
    alpha = None if image.alpha is None else imaging.to_8bit(image.alpha)
    if upscale:
        rgb = imaging.upscale2x(rgb)
        alpha = None if alpha is None else imaging.upscale_alpha(alpha)
    return rgb if alpha is None else np.dstack([rgb, alpha])


def _figure(rgb: np.ndarray, caption: str, css: str = "") -> str:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG")
    data = base64.b64encode(buf.getvalue()).decode()
    if rgb.shape[2] == 4:
        css = f"{css} checker".strip()
    return (f"<figure><img class='{css}' width={rgb.shape[1]} height={rgb.shape[0]} "
            f"alt='{_e(caption)}' src='data:image/png;base64,{data}'>"
            f"<figcaption>{_e(caption)}</figcaption></figure>")


def _fit(rgb: np.ndarray) -> np.ndarray:
    h, w = rgb.shape[:2]
    if w <= GALLERY_WIDTH:
        return rgb
    size = (GALLERY_WIDTH, max(1, round(h * GALLERY_WIDTH / w)))
    return np.asarray(Image.fromarray(rgb).resize(size, Image.LANCZOS))


def _busiest_square(rgb: np.ndarray, size: int) -> tuple[int, int]:
    """Top-left corner of the ``size`` square with the most gradient energy: where sharpening
    shows (edges, eyes, text) rather than sky."""
    grey = rgb[..., :3].astype(np.float32).mean(axis=2)
    h, w = grey.shape
    if h <= size or w <= size:
        return 0, 0
    energy = np.zeros_like(grey)
    energy[:, 1:] += np.abs(np.diff(grey, axis=1))
    energy[1:, :] += np.abs(np.diff(grey, axis=0))
    s = np.pad(energy.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    sums = s[size:, size:] - s[:-size, size:] - s[size:, :-size] + s[:-size, :-size]
    y, x = np.unravel_index(int(np.argmax(sums)), sums.shape)
    return int(y), int(x)


def _zoom(rgb: np.ndarray, y: int, x: int) -> np.ndarray:
    crop = rgb[y:y + ZOOM_CROP, x:x + ZOOM_CROP]
    return np.repeat(np.repeat(crop, ZOOM, axis=0), ZOOM, axis=1)


def _runs_section(runs: list[dict], latest: pa.Table) -> str:
    """The settings of the newest run (from its record) and every checkpoint in the ledger."""
    checkpoints = Counter(zip(latest["model"].to_pylist(), latest["checkpoint_sha256"].to_pylist(),
                              latest["device"].to_pylist(), latest["precision"].to_pylist()))
    rows = "".join(f"<tr><td>{_e(m)}</td><td><code>{_e(c or 'none')}</code></td>"
                   f"<td>{_e(d or '')}</td><td>{_e(p or '')}</td><td class=n>{n}</td></tr>"
                   for (m, c, d, p), n in checkpoints.most_common())
    out = ("<h2>Models</h2><table><tr><th>model</th><th>checkpoint sha256</th><th>device</th>"
           f"<th>precision</th><th>images</th></tr>{rows}</table>")
    if runs:
        newest = runs[-1]
        out += (f"<h2>Newest run: {_e(newest.get('run_id'))}</h2><pre>"
                f"{_e(json.dumps(newest, indent=2, sort_keys=True, default=str))}</pre>")
        if len(runs) > 1:
            out += f"<p class=sub>{len(runs)} runs in all wrote into this output.</p>"
    return out
