"""Self-contained HTML report for ``edgekit report``.

One file, viewable offline: no external scripts, fonts, stylesheets or images. Plots are drawn with
matplotlib (object API, no pyplot, no GUI backend) and embedded as inline SVG; the numbers behind
them follow as plain HTML tables. Every number in ``data`` may be ``None`` (unknown); the page says
"not measured" instead of failing.

Entry point: :func:`render_report`.
"""

from __future__ import annotations

import html
import io
import math
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterable

NA = "not measured"

# Categorical colours (matplotlib's tab10, written out so the page does not depend on a style).
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf"]
EDGE_MEASURED = "#2ca02c"
EDGE_PREDICTED = "#1f77b4"
CLOUD = "#ff7f0e"
GREY = "#b0b0b0"


# ----------------------------------------------------------------------------------------- values

def _num(v: Any) -> float | None:
    """A finite float, or None for anything unknown (None, NaN, inf, bool, strings)."""
    if v is None or isinstance(v, bool):
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _d(v: Any) -> dict:
    return v if isinstance(v, dict) else {}


def _s(v: Any, default: str = "") -> str:
    return default if v is None else str(v)


def _e(v: Any, default: str = "") -> str:
    return html.escape(_s(v, default), quote=True)


def _na(text: str = NA) -> str:
    return f'<span class="na">{html.escape(text)}</span>'


def _fmt(v: Any, spec: str, unit: str = "", scale: float = 1.0, missing: str = NA) -> str:
    """HTML cell text for a number (already escaped)."""
    f = _num(v)
    if f is None:
        return _na(missing)
    return html.escape(format(f / scale, spec) + (f" {unit}" if unit else ""))


def _mb(v: Any, missing: str = NA) -> str:
    return _fmt(v, ",.1f", "MB", 1e6, missing)


def _gb(v: Any, missing: str = NA) -> str:
    return _fmt(v, ",.2f", "GB", 1e9, missing)


def _pct_err(pred: Any, meas: Any) -> float | None:
    p, m = _num(pred), _num(meas)
    if p is None or m is None or m == 0:
        return None
    return (p - m) / abs(m) * 100.0


def _bool(v: Any) -> str:
    if v is True:
        return '<span class="ok">yes</span>'
    if v is False:
        return '<span class="bad">no</span>'
    return _na("unknown")


def _tex(s: Any) -> str:
    """A label safe for matplotlib's text layout: ``$`` would start mathtext."""
    return _s(s).replace("\\", "\\\\").replace("$", r"\$")


def _speed(v: float) -> str:
    return f"{v:,.0f}" if abs(v) >= 10 else f"{v:.1f}"


def _short(s: str, n: int = 28) -> str:
    return s if len(s) <= n else s[: n - 1] + "\u2026"


# ------------------------------------------------------------------------------------ the data

def _artifacts(data: dict) -> list[dict]:
    arts = data.get("artifacts") or []
    out = []
    for i, a in enumerate(arts if isinstance(arts, list) else []):
        if not isinstance(a, dict):
            continue
        a = dict(a)
        a["name"] = _s(a.get("name"), f"artifact {i + 1}") or f"artifact {i + 1}"
        out.append(a)
    return out


def _target_names(arts: list[dict]) -> list[str]:
    names: list[str] = []
    for a in arts:
        for t in _d(a.get("targets")):
            if t not in names:
                names.append(str(t))
    return names


def _cloud(data: dict) -> dict[str, dict]:
    return {str(k): _d(v) for k, v in _d(data.get("cloud")).items()}


def _quality_delta(a: dict) -> float | None:
    q = _d(a.get("quality"))
    ppl, ref = _num(q.get("ppl")), _num(q.get("ref_ppl"))
    return None if ppl is None or ref is None else ppl - ref


# ------------------------------------------------------------------------------- matplotlib

def _figure(width_in: float, height_in: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), layout="constrained")
    FigureCanvasAgg(fig)  # a renderer for text extents (label placement); saving as SVG is separate
    return fig


def _rc() -> dict:
    return {
        "svg.fonttype": "none",
        "font.family": "sans-serif",
        "font.sans-serif": ["DejaVu Sans", "Liberation Sans", "Arial", "Helvetica"],
        "font.size": 9.5,
        "axes.titlesize": 10.5,
        "axes.labelsize": 9.5,
        "axes.spines.top": False,
        "axes.spines.right": False,
        "axes.grid": True,
        "grid.color": "#e6e6e6",
        "grid.linewidth": 0.7,
        "axes.axisbelow": True,
        "axes.edgecolor": "#888888",
        "xtick.color": "#444444",
        "ytick.color": "#444444",
        "legend.frameon": False,
        "svg.hashsalt": "edgekit",
    }


_ID_RE = re.compile(r'\bid="([^"]+)"')


def _svg(fig, prefix: str) -> str:
    """The figure as an inline ``<svg>`` element: no XML prolog, scalable, ids made page-unique."""
    buf = io.StringIO()
    fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None})
    s = buf.getvalue()
    s = s[s.index("<svg"):]
    # Several SVGs share one HTML document, so their ids (clip paths, markers) must not collide.
    ids = set(_ID_RE.findall(s))
    if ids:
        s = _ID_RE.sub(lambda m: f'id="{prefix}-{m.group(1)}"', s)
        s = re.sub(r'url\(#([^)]+)\)', lambda m: f"url(#{prefix}-{m.group(1)})" if m.group(1) in ids
                   else m.group(0), s)
        s = re.sub(r'href="#([^"]+)"', lambda m: f'href="#{prefix}-{m.group(1)}"' if m.group(1) in ids
                   else m.group(0), s)
    # Scale with the page: keep the viewBox, drop the fixed size.
    head_end = s.index(">")
    head = s[:head_end]
    head = re.sub(r'\swidth="[^"]*"', "", head, count=1)
    head = re.sub(r'\sheight="[^"]*"', "", head, count=1)
    head += ' role="img" preserveAspectRatio="xMidYMid meet"'
    return head + s[head_end:]


def _log_scale_wanted(values: Iterable[float]) -> bool:
    vals = [v for v in values if v is not None]
    pos = [v for v in vals if v > 0]
    return len(pos) >= 2 and len(pos) == len(vals) and max(pos) / min(pos) >= 20


def _set_quality_axis(ax, values: list[float]) -> None:
    vals = [v for v in values if v is not None]
    if _log_scale_wanted(vals):
        ax.set_yscale("log")
    elif vals and min(vals) == 0 < max(vals) and max(vals) / min(v for v in vals if v > 0) >= 20:
        # a lossless artifact (KLD exactly 0) among lossy ones: log scale above a small linear band
        lt = min(v for v in vals if v > 0)
        ax.set_yscale("symlog", linthresh=lt)
        ax.set_ylim(-0.4 * lt, max(vals) * 10 ** 0.35)
        return
    _pad_axis(ax, "y", vals, log=ax.get_yscale() == "log")


def _pad_axis(ax, which: str, vals: list[float], log: bool = False, frac: float = 0.12) -> None:
    vals = [v for v in vals if v is not None]
    if not vals:
        return
    lo, hi = min(vals), max(vals)
    if log and lo > 0:
        llo, lhi = math.log10(lo), math.log10(hi)
        span = max(lhi - llo, 0.3)
        lim = (10 ** (llo - span * frac * 1.5), 10 ** (lhi + span * frac * 1.5))
    else:
        span = (hi - lo) or (abs(hi) * 0.5 or 1.0)
        lim = (lo - span * frac, hi + span * frac)
        if lo >= 0 and lim[0] < 0 and lo - span * frac < 0:
            lim = (max(lim[0], -span * 0.02) if lo > 0 else -span * frac * 0.5, lim[1])
    (ax.set_ylim if which == "y" else ax.set_xlim)(*lim)


_OFFSETS = [(7, 6, "left", "bottom"), (7, -6, "left", "top"), (-7, 6, "right", "bottom"),
            (-7, -6, "right", "top"), (0, 10, "center", "bottom"), (0, -10, "center", "top"),
            (12, 0, "left", "center"), (-12, 0, "right", "center"), (10, 16, "left", "bottom"),
            (10, -16, "left", "top"), (-10, 16, "right", "bottom"), (-10, -16, "right", "top")]


def _place_labels(fig, ax, points: list[tuple[float, float, str, str]], fontsize: float = 8.5,
                  settle: bool = True) -> None:
    """Greedy label placement: for each point try a few offsets, keep the first that overlaps
    neither an earlier label nor a marker and stays inside the axes. Labels take no part in the
    layout, so the axes do not move after they are placed."""
    renderer = fig.canvas.get_renderer()
    if settle:
        fig.draw_without_rendering()  # settle the constrained layout before measuring
    ax_box = ax.get_window_extent(renderer)
    marker_boxes = []
    from matplotlib.transforms import Bbox

    for x, y, _, _ in points:
        px, py = ax.transData.transform((x, y))
        marker_boxes.append(Bbox.from_extents(px - 4, py - 4, px + 4, py + 4))
    placed: list = []
    for i, (x, y, text, color) in enumerate(points):
        best = None
        best_cost = None
        for dx, dy, ha, va in _OFFSETS:
            t = ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", ha=ha, va=va,
                            fontsize=fontsize, color=color,
                            arrowprops=dict(arrowstyle="-", color="#9a9a9a", lw=0.6, shrinkA=0, shrinkB=5))
            t.set_in_layout(False)
            bb = t.get_window_extent(renderer).expanded(1.04, 1.1)
            cost = sum(bb.overlaps(p) for p in placed) * 10
            cost += sum(bb.overlaps(m) for j, m in enumerate(marker_boxes) if j != i) * 3
            if not (ax_box.x0 <= bb.x0 and bb.x1 <= ax_box.x1 and ax_box.y0 <= bb.y0 and bb.y1 <= ax_box.y1):
                cost += 5
            if best is None or cost < best_cost:
                if best is not None:
                    best[0].remove()
                best, best_cost = (t, bb), cost
            else:
                t.remove()
            if cost == 0:
                break
        placed.append(best[1])


def _no_data(fig_id: str, title: str, note: str) -> str:
    return (f'<figure class="plot" id="{_e(fig_id)}"><div class="nodata">no data: {html.escape(note)}</div>'
            f"<figcaption><b>{html.escape(title)}</b></figcaption></figure>")


def _figure_html(fig_id: str, svg: str, title: str, caption: str) -> str:
    return (f'<figure class="plot" id="{_e(fig_id)}">{svg}'
            f"<figcaption><b>{html.escape(title)}.</b> {caption}</figcaption></figure>")


def _safe_plot(fig_id: str, title: str, fn: Callable[[], str]) -> str:
    """A plot that fails to draw must not take the whole report down."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - reported on the page instead
        return _no_data(fig_id, title, f"the plot could not be drawn ({type(exc).__name__}: {exc})")


# ---------------------------------------------------------------------------- plot 1: overview

def _size_kld_points(arts: list[dict]) -> tuple[list[tuple[dict, float, float]], list[str]]:
    """(artifact, size in MB, mean KLD) for artifacts that have both, and the names of those that do not."""
    pts, skipped = [], []
    for a in arts:
        size, kld = _num(a.get("size_bytes")), _num(_d(a.get("quality")).get("kld_mean"))
        if size is None or kld is None:
            skipped.append(a["name"])
        else:
            pts.append((a, size / 1e6, kld))
    return pts, skipped


def _plot_size_quality_latency(arts: list[dict]) -> str:
    fig_id, title = "size-quality-latency", "Size, quality and predicted speed"
    pts, skipped = _size_kld_points(arts)
    if not pts:
        return _no_data(fig_id, title, "no artifact has both a size and a measured KL divergence")

    # Panels: this host (measured decode speed, else its prediction), then each target device.
    panels: list[tuple[str, Callable[[dict], tuple[float | None, Any]]]] = []

    def host_speed(a: dict) -> tuple[float | None, Any]:
        m = _num(_d(a.get("measured")).get("decode_tok_s"))
        if m is not None:
            return m, True
        p = _num(_d(a.get("predicted_host")).get("decode_tok_s"))
        return p, ("predicted" if p is not None else True)

    panels.append(("this host", host_speed))
    for t in _target_names(arts):
        def tgt_speed(a: dict, t=t) -> tuple[float | None, Any]:
            rec = _d(_d(a.get("targets")).get(t))
            return _num(rec.get("decode_tok_s")), rec.get("fits")
        panels.append((t, tgt_speed))

    speeds = [fn(a)[0] for _, fn in panels for a, _, _ in pts]
    speeds = [s for s in speeds if s is not None and s > 0]
    import matplotlib
    from matplotlib.colors import LogNorm, Normalize

    ncols = min(len(panels), 2)
    nrows = math.ceil(len(panels) / ncols)
    with matplotlib.rc_context(_rc()):
        fig = _figure(11.0, 0.5 + 3.3 * nrows)
        axes = fig.subplots(nrows, ncols, squeeze=False, sharex=True, sharey=True)
        if speeds and max(speeds) / min(speeds) >= 8:
            norm = LogNorm(vmin=min(speeds), vmax=max(speeds))
        else:
            lo, hi = (min(speeds), max(speeds)) if speeds else (0.0, 1.0)
            norm = Normalize(vmin=lo if hi > lo else lo * 0.9, vmax=hi if hi > lo else hi * 1.1 + 1e-9)
        cmap = matplotlib.colormaps["viridis"]
        sizes_mb = [p[1] for p in pts]
        klds = [p[2] for p in pts]
        for k, (pname, fn) in enumerate(panels):
            ax = axes[k // ncols][k % ncols]
            for a, size, kld in pts:
                sp, fits = fn(a)
                if sp is None:
                    ax.scatter([size], [kld], s=70, facecolors="white", edgecolors=GREY, linewidths=1.2, zorder=3)
                else:
                    ax.scatter([size], [kld], s=90, c=[cmap(norm(sp))], edgecolors="#333333", linewidths=0.6,
                               zorder=3)
                if fits is False:
                    ax.scatter([size], [kld], s=190, marker="x", c="#d62728", linewidths=1.6, zorder=4)
            kind = ""
            if pname != "this host":
                kinds = {_s(_d(_d(a.get("targets")).get(pname)).get("kind")) for a in arts} - {""}
                kind = f" ({', '.join(sorted(kinds))})" if kinds else ""
            ax.set_title(_tex(pname + kind) + ("  (measured, else predicted)" if pname == "this host" else
                                               "  (predicted)"), loc="left")
            if k // ncols == nrows - 1 or (k + ncols) >= len(panels):
                ax.set_xlabel("size (MB)")
                ax.xaxis.set_tick_params(labelbottom=True)
            if k % ncols == 0:
                ax.set_ylabel("mean KL divergence vs reference\n(lower is better)")
            if k == 0:
                _set_quality_axis(ax, klds)
                _pad_axis(ax, "x", sizes_mb, frac=0.2)
        for k in range(len(panels), nrows * ncols):
            axes[k // ncols][k % ncols].set_visible(False)
        if speeds:
            from matplotlib.cm import ScalarMappable

            sm = ScalarMappable(norm=norm, cmap=cmap)
            cb = fig.colorbar(sm, ax=axes.ravel().tolist(), shrink=0.8, pad=0.01, aspect=30)
            cb.set_label("decode speed (tokens/s)")
            if isinstance(norm, LogNorm):
                from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

                ticks = [m * 10 ** e for e in range(-2, 6) for m in (1, 2, 5)
                         if norm.vmin <= m * 10 ** e <= norm.vmax]
                cb.ax.yaxis.set_major_locator(FixedLocator(ticks))
                cb.ax.yaxis.set_minor_locator(NullLocator())
                cb.ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        for k, (_name, fn) in enumerate(panels):
            ax = axes[k // ncols][k % ncols]
            pts_k = []
            for a, size, kld in pts:
                sp, fits = fn(a)
                lab = f"{_short(a['name'])}: " + (NA if sp is None else f"{_speed(sp)} tok/s")
                if fits is False:
                    lab += " (does not fit)"
                elif fits == "predicted":
                    lab += " (predicted)"
                pts_k.append((size, kld, _tex(lab), "#222222" if sp is not None else "#888888"))
            _place_labels(fig, ax, pts_k, fontsize=8, settle=k == 0)
        svg = _svg(fig, fig_id)
    cap = ("Each panel places every artifact by file size and quality loss (mean KL divergence of its "
           "next-token distribution from the float reference; lower-left is smaller and more faithful). "
           "Marker colour is the decode speed on that device: measured on this host where available, "
           "otherwise the prediction. Hollow grey markers have no speed; a red &times; means the model "
           "does not fit the device's memory budget.")
    if skipped:
        cap += " Not plotted (size or quality not measured): " + html.escape(", ".join(skipped)) + "."
    return _figure_html(fig_id, svg, title, cap)


# ------------------------------------------------------------------------------ plot 2: pareto

def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the non-dominated points when both coordinates are to be minimised,
    sorted by the first coordinate."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    front: list[int] = []
    best = math.inf
    for i in order:
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return front


def _plot_pareto(arts: list[dict]) -> str:
    fig_id, title = "pareto", "Pareto frontier: size vs quality"
    pts, skipped = _size_kld_points(arts)
    if not pts:
        return _no_data(fig_id, title, "no artifact has both a size and a measured KL divergence")
    import matplotlib

    front = pareto_front([(p[1], p[2]) for p in pts])
    fset = set(front)
    with matplotlib.rc_context(_rc()):
        fig = _figure(11.0, 4.6)
        ax = fig.add_subplot()
        _set_quality_axis(ax, [p[2] for p in pts])
        _pad_axis(ax, "x", [p[1] for p in pts], frac=0.2)
        fx = [pts[i][1] for i in front]
        fy = [pts[i][2] for i in front]
        xlo, xhi = ax.get_xlim()
        ylo, yhi = ax.get_ylim()
        # The frontier as a staircase: from each frontier point, the region to its right is
        # reachable at that quality until a smaller-loss point appears.
        sx = list(fx) + [xhi]
        sy = list(fy) + [fy[-1]]
        ax.step(sx, sy, where="post", color="#1f77b4", linewidth=1.8, zorder=2, label="Pareto frontier")
        ax.plot([fx[0], fx[0]], [yhi, fy[0]], color="#1f77b4", linewidth=1.8, zorder=2)
        ax.fill_between(sx, sy, [yhi] * len(sx), step="post", color="#1f77b4", alpha=0.06, zorder=1)
        ax.set_xlim(xlo, xhi)
        ax.set_ylim(ylo, yhi)
        recipes = []
        for a, _, _ in pts:
            r = _s(a.get("recipe"), "?")
            if r not in recipes:
                recipes.append(r)
        labels = []
        for i, (a, size, kld) in enumerate(pts):
            r = _s(a.get("recipe"), "?")
            col = PALETTE[recipes.index(r) % len(PALETTE)]
            if i in fset:
                ax.scatter([size], [kld], s=90, c=[col], edgecolors="#222222", linewidths=0.7, zorder=4)
                labels.append((size, kld, _tex(f"{_short(a['name'])} [{r}]"), "#111111"))
            else:
                ax.scatter([size], [kld], s=70, c=GREY, edgecolors="#888888", linewidths=0.6, zorder=3)
                labels.append((size, kld, _tex(f"{_short(a['name'])} [{r}] (dominated)"), "#999999"))
        from matplotlib.lines import Line2D

        handles = [Line2D([], [], color="#1f77b4", lw=1.8, label="Pareto frontier")]
        if len(front) < len(pts):
            handles.append(Line2D([], [], marker="o", ls="", mfc=GREY, mec="#888888", ms=8, label="dominated"))
        front_recipes = [r for r in recipes if any(_s(pts[i][0].get("recipe"), "?") == r for i in front)]
        for r in front_recipes:
            handles.append(Line2D([], [], marker="o", ls="", mfc=PALETTE[recipes.index(r) % len(PALETTE)],
                                  mec="#222222", ms=8, label=_tex(f"recipe {r}")))
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8.5)
        ax.set_xlabel("size (MB)")
        ax.set_ylabel("mean KL divergence vs reference\n(lower is better)")
        ax.set_title("lower-left is better", loc="left", color="#555555", fontsize=9)
        _place_labels(fig, ax, labels)
        svg = _svg(fig, fig_id)
    cap = (f"{len(front)} of {len(pts)} artifacts are on the frontier: no other artifact is both "
           "smaller and closer to the reference. Grey points are dominated (some frontier artifact beats "
           "them on both). The shaded region is what the frontier already covers.")
    if skipped:
        cap += " Not plotted (size or quality not measured): " + html.escape(", ".join(skipped)) + "."
    return _figure_html(fig_id, svg, title, cap)


# ----------------------------------------------------------------- plot 3: measured vs predicted

_MVP = [("decode_tok_s", "decode_tok_s", "decode speed (tokens/s)"),
        ("ttft_ms", "ttft_ms", "time to first token (ms)")]


def _plot_measured_vs_predicted(arts: list[dict]) -> str:
    fig_id, title = "measured-vs-predicted", "Measured vs predicted on this host"
    series = []
    for mkey, pkey, label in _MVP:
        pairs = []
        for j, a in enumerate(arts):
            m = _num(_d(a.get("measured")).get(mkey))
            p = _num(_d(a.get("predicted_host")).get(pkey))
            if m is not None and p is not None:
                pairs.append((a["name"], p, m, PALETTE[j % len(PALETTE)]))
        series.append((label, pairs))
    if not any(pairs for _, pairs in series):
        return _no_data(fig_id, title, "no artifact has both a measurement and a prediction on this host")
    import matplotlib

    with matplotlib.rc_context(_rc()):
        fig = _figure(11.0, 4.6)
        axes = fig.subplots(1, 2, squeeze=False)[0]
        for ax, (label, pairs) in zip(axes, series):
            ax.set_title(label, loc="left")
            if not pairs:
                ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="#888888")
                ax.set_xticks([])
                ax.set_yticks([])
                continue
            vals = [v for _, p, m, _ in pairs for v in (p, m)]
            lo, hi = min(vals), max(vals)
            span = (hi - lo) or max(hi * 0.3, 1.0)
            lim = (max(0.0, lo - span * 0.25) if lo >= 0 else lo - span * 0.25, hi + span * 0.25)
            ax.plot(lim, lim, color="#999999", linestyle="--", linewidth=1, zorder=1, label="y = x (exact)")
            ax.fill_between(lim, [v * 0.9 for v in lim], [v * 1.1 for v in lim], color="#999999", alpha=0.12,
                            zorder=0, label="\u00b110%")
            labels = []
            for name, p, m, col in pairs:
                ax.scatter([p], [m], s=80, c=[col], edgecolors="#222222", linewidths=0.6, zorder=3)
                err = _pct_err(p, m)
                labels.append((p, m, _tex(f"{_short(name)}: {err:+.1f}%" if err is not None else _short(name)),
                               "#222222"))
            ax.set_xlim(*lim)
            ax.set_ylim(*lim)
            ax.set_aspect("equal", adjustable="box")
            ax.set_xlabel("predicted")
            ax.set_ylabel("measured")
            ax.legend(loc="upper left", fontsize=8)
            _place_labels(fig, ax, labels)
        svg = _svg(fig, fig_id)
    cap = ("Each point is one artifact: x is the prediction for this host, y the measurement. Points on "
           "the dashed line are predicted exactly; the band is &plusmn;10%. Labels give the prediction error "
           "(predicted &minus; measured) / measured.")
    missing = [a["name"] for a in arts if not any(
        _num(_d(a.get("measured")).get(mk)) is not None and _num(_d(a.get("predicted_host")).get(pk)) is not None
        for mk, pk, _ in _MVP)]
    if missing:
        cap += " Not plotted (not measured or not predicted): " + html.escape(", ".join(missing)) + "."
    return _figure_html(fig_id, svg, title, cap)


# ------------------------------------------------------------------- plot 4: edge vs cloud

def _edge_cloud_rows(arts: list[dict], cloud: dict[str, dict]) -> list[dict]:
    """One row per (artifact, place it runs) plus one per cloud baseline."""
    rows = []
    for a in arts:
        m = _d(a.get("measured"))
        ph = _d(a.get("predicted_host"))
        dq = _quality_delta(a)
        rows.append(dict(group="edge-measured", label=f"{a['name']} @ this host", artifact=a["name"],
                         where="this host (measured)", ttft_ms=_num(m.get("ttft_ms")),
                         decode_tok_s=_num(m.get("decode_tok_s")),
                         memory_bytes=_num(m.get("peak_rss_bytes")), fits=None, quality_delta=dq,
                         usd_per_1k=None, rtt_ms=None, source="measured" if m else NA,
                         predicted_ttft=_num(ph.get("ttft_ms")), predicted_decode=_num(ph.get("decode_tok_s"))))
        for t, rec in _d(a.get("targets")).items():
            rec = _d(rec)
            kind = _s(rec.get("kind"))
            rows.append(dict(group="edge-predicted", label=f"{a['name']} @ {t}", artifact=a["name"],
                             where=f"{t} ({kind}, predicted)" if kind else f"{t} (predicted)",
                             ttft_ms=_num(rec.get("ttft_ms")), decode_tok_s=_num(rec.get("decode_tok_s")),
                             memory_bytes=_num(rec.get("peak_memory_bytes")), fits=rec.get("fits"),
                             budget=_num(rec.get("memory_budget_bytes")), quality_delta=dq, usd_per_1k=None,
                             rtt_ms=None, source="predicted"))
    for name, c in cloud.items():
        rows.append(dict(group="cloud", label=f"{name} (cloud)", artifact="reference model", where=name,
                         ttft_ms=_num(c.get("ttft_ms")), decode_tok_s=_num(c.get("decode_tok_s")),
                         memory_bytes=None, fits=None, quality_delta=0.0, usd_per_1k=_num(c.get("usd_per_1k_tokens")),
                         rtt_ms=_num(c.get("rtt_ms")), source=_s(c.get("source"), "unknown")))
    return rows


def _plot_edge_vs_cloud(arts: list[dict], cloud: dict[str, dict]) -> str:
    fig_id, title = "edge-vs-cloud", "Edge vs cloud: latency and speed"
    rows = _edge_cloud_rows(arts, cloud)
    if not any(r["ttft_ms"] is not None or r["decode_tok_s"] is not None for r in rows):
        return _no_data(fig_id, title, "nothing measured on this host, no target-device predictions and no cloud baselines")
    import matplotlib

    colors = {"edge-measured": EDGE_MEASURED, "edge-predicted": EDGE_PREDICTED, "cloud": CLOUD}
    n = len(rows)
    with matplotlib.rc_context(_rc()):
        fig = _figure(11.0, 1.2 + 0.27 * n)
        axes = fig.subplots(1, 2, sharey=True)
        ys = list(range(n))[::-1]
        for ax, key, label, better in ((axes[0], "ttft_ms", "time to first token (ms)", "shorter is better"),
                                       (axes[1], "decode_tok_s", "decode speed (tokens/s)", "longer is better")):
            vals = [r[key] for r in rows]
            known = [v for v in vals if v is not None]
            vmax = max(known) if known else 1.0
            pos = [v for v in known if v > 0]
            log = len(pos) >= 2 and max(pos) / min(pos) >= 50
            if log:
                ax.set_xscale("log")
                x0 = 10 ** math.floor(math.log10(min(pos)) - 0.05)
                x1 = vmax * 3.0
            else:
                x0, x1 = 0.0, vmax * 1.15
            for y, r, v in zip(ys, rows, vals):
                if v is None or (log and v <= 0):
                    ax.text(x0 * 1.05 if log else vmax * 0.01, y, NA, va="center", ha="left", fontsize=7.5,
                            color="#999999", style="italic")
                    continue
                ax.barh([y], [v - x0 if log else v], left=x0 if log else 0, color=colors[r["group"]], height=0.7,
                        alpha=1.0 if r.get("fits") is not False else 0.35)
                ax.text(v * 1.06 if log else v + vmax * 0.01, y, _speed(v), va="center", ha="left", fontsize=7.5,
                        color="#333333")
            ax.set_xlim(x0, x1)
            if log:
                from matplotlib.ticker import FuncFormatter

                ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}" if v >= 1 else f"{v:g}"))
            ax.set_title(f"{label}, {better}" + (" (log scale)" if log else ""), loc="left")
            ax.grid(axis="y", visible=False)
            # separators between artifacts and the cloud block
            prev = None
            for y, r in zip(ys, rows):
                key_ = r["artifact"] if r["group"] != "cloud" else "cloud"
                if prev is not None and key_ != prev:
                    ax.axhline(y + 0.5, color="#dddddd", linewidth=0.8)
                prev = key_
        axes[0].set_yticks(ys)
        axes[0].set_yticklabels([_tex(_short(r["label"], 44)) for r in rows], fontsize=8)
        axes[0].set_ylim(-0.7, n - 0.3)
        from matplotlib.patches import Patch

        handles = [Patch(color=EDGE_MEASURED, label="edge, measured on this host"),
                   Patch(color=EDGE_PREDICTED, label="edge, predicted for target device"),
                   Patch(color=CLOUD, label="cloud baseline")]
        fig.legend(handles=handles, loc="outside lower center", ncols=3, fontsize=8.5)
        svg = _svg(fig, fig_id)
    cap = ("Every artifact on this host (measured) and on each target device (predicted), next to the cloud "
           "baselines, which serve the reference model. Faded bars: the model does not fit the device's memory "
           "budget. Cloud time to first token is as given in the data (network round trip listed in the table).")
    if not cloud:
        cap += " <b>No cloud baselines in the data</b>: only edge numbers are shown."
    return _figure_html(fig_id, svg, title, cap)


# ------------------------------------------------------------------------------------ tables

def _table(headers: list[str], rows: list[list[str]], cls: str = "") -> str:
    """Headers are plain text (escaped here); cells are HTML already escaped by the caller."""
    th = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>'


def _host_table(host: dict) -> str:
    rows = [
        ["machine", _e(host.get("machine"), "") or _na("unknown")],
        ["logical cores", _fmt(host.get("cores_logical"), ",.0f", missing="unknown")],
        ["memory", _gb(host.get("ram_bytes"))],
        ["memory copy bandwidth", _fmt(host.get("copy_bandwidth_gbs"), ",.1f", "GB/s")],
        ["f32 compute", _fmt(host.get("compute_f32_gflops"), ",.1f", "GFLOP/s")],
    ]
    extra = [k for k in host if k not in {"machine", "cores_logical", "ram_bytes", "copy_bandwidth_gbs",
                                          "compute_f32_gflops"}]
    for k in extra:
        v = host[k]
        rows.append([_e(k), _e(v) if not isinstance(v, (dict, list)) else _e(repr(v))])
    return _table(["", "value"], rows, "kv")


def _artifact_table(arts: list[dict]) -> str:
    rows = []
    for a in arts:
        q = _d(a.get("quality"))
        dq = _quality_delta(a)
        rows.append([
            f"<b>{_e(a['name'])}</b>" + (f'<div class="sub">{_e(a.get("dir"))}</div>' if a.get("dir") else ""),
            _e(a.get("format"), "?"), _e(a.get("recipe"), "?"),
            _mb(a.get("size_bytes")), _fmt(a.get("bits_per_weight"), ".2f"),
            _fmt(q.get("ppl"), ".3f"), _fmt(q.get("ref_ppl"), ".3f"),
            _na() if dq is None else html.escape(f"{dq:+.3f}"),
            _fmt(q.get("kld_mean"), ".4f"), _fmt(q.get("kld_p99"), ".4f"),
            _fmt(_num(q.get("top1_agreement")) * 100 if _num(q.get("top1_agreement")) is not None else None,
                 ".1f", "%"),
        ])
    return _table(["artifact", "format", "recipe", "size", "bits/weight", "perplexity", "reference ppl",
                   "ppl delta", "KLD mean", "KLD p99", "top-1 agreement"], rows, "num")


def _err_cell(pred: Any, meas: Any) -> str:
    e = _pct_err(pred, meas)
    if e is None:
        return _na("-")
    cls = "ok" if abs(e) <= 10 else ("warn" if abs(e) <= 25 else "bad")
    return f'<span class="{cls}">{html.escape(f"{e:+.1f}%")}</span>'


def _host_perf_table(arts: list[dict]) -> str:
    rows = []
    for a in arts:
        m, p = _d(a.get("measured")), _d(a.get("predicted_host"))
        rows.append([
            f"<b>{_e(a['name'])}</b>",
            _fmt(m.get("decode_tok_s"), ",.1f"), _fmt(p.get("decode_tok_s"), ",.1f", missing="not predicted"),
            _err_cell(p.get("decode_tok_s"), m.get("decode_tok_s")),
            _fmt(m.get("ttft_ms"), ",.0f", "ms"), _fmt(p.get("ttft_ms"), ",.0f", "ms", missing="not predicted"),
            _err_cell(p.get("ttft_ms"), m.get("ttft_ms")),
            _fmt(m.get("prefill_tok_s"), ",.0f"),
            _mb(m.get("peak_rss_bytes")), _mb(p.get("peak_memory_bytes"), missing="not predicted"),
            _err_cell(p.get("peak_memory_bytes"), m.get("peak_rss_bytes")),
            _fmt(m.get("load_s"), ".2f", "s"), _fmt(p.get("load_s"), ".2f", "s", missing="not predicted"),
        ])
    return _table(["artifact", "decode tok/s measured", "predicted", "error", "TTFT measured", "predicted",
                   "error", "prefill tok/s", "peak RSS measured", "peak memory predicted", "error",
                   "load measured", "predicted"], rows, "num")


def _devices_table(arts: list[dict]) -> str | None:
    """Measurements made on the user's devices (`edgekit profile --device`), with the device's calibrated prediction."""
    rows = []
    for a in arts:
        for dev, m in sorted(_d(a.get("devices")).items()):
            m = _d(m)
            rows.append([f"<b>{_e(a['name'])}</b>", _e(dev) + (f" <small>({_e(m.get('cpu'))})</small>" if m.get("cpu") else ""),
                         _fmt(m.get("decode_tok_s"), ",.1f"), _fmt(m.get("predicted_decode_tok_s"), ",.1f", missing="not calibrated"),
                         _err_cell(m.get("predicted_decode_tok_s"), m.get("decode_tok_s")),
                         _fmt(m.get("ttft_ms"), ",.0f", "ms"), _fmt(m.get("prefill_tok_s"), ",.0f"), _mb(m.get("peak_rss_bytes")),
                         _fmt(m.get("kld_mean"), ".4f"), _fmt(m.get("joules_per_token"), ".3f", "J", missing="no power meter"),
                         _fmt(m.get("roofline_decode_percent"), ".0f", "%"), _e(m.get("measured_at") or "")])
    if not rows:
        return None
    return _table(["artifact", "device", "decode tok/s", "predicted", "error", "TTFT", "prefill tok/s", "peak RSS",
                   "KLD", "energy / token", "% of roofline", "measured"], rows, "num")


def _sweep_section(sweep: dict) -> str:
    """The sweep's candidates per device: figures (measured or predicted), constraints met, the front, the choice."""
    parts = []
    cons = ", ".join(f"{k} {v:g}" for k, v in _d(sweep.get("constraints")).items()) or "none"
    parts.append(f"<p>Objectives (minimised): {_e(', '.join(sweep.get('objectives') or []))}; constraints: {_e(cons)}. "
                 "&#9733; marks the chosen artifact, &#9670; the Pareto front among candidates that meet the constraints.</p>")
    for dev in sweep.get("devices") or []:
        front = set(_d(sweep.get("fronts")).get(dev) or [])
        best = _d(sweep.get("best")).get(dev)
        rows = []
        for c in sweep.get("candidates") or []:
            f = _d(_d(c.get("devices")).get(dev))
            mark = ("&#9733; " if c["candidate"] == best else "") + ("&#9670; " if c["candidate"] in front else "")
            if not f:
                rows.append([f"{mark}<b>{_e(c['candidate'])}</b>", _na(_e(c.get("error") or "no figures")), "", "", "", "", "", ""])
                continue
            rows.append([f"{mark}<b>{_e(c['candidate'])}</b>", _e(f.get("how")), _mb(f.get("size_bytes")), _fmt(f.get("kld_mean"), ".4f"),
                         _fmt(f.get("decode_tok_s"), ",.1f"), _fmt(f.get("ttft_ms"), ",.0f", "ms"), _mb(f.get("peak_memory_bytes")),
                         "yes" if f.get("feasible") else _e("no: " + ", ".join(f.get("violates") or []))])
        parts.append(f"<h3>{_e(dev)}</h3>")
        parts.append('<div class="tablewrap">' + _table(["candidate", "figures", "size", "KLD", "decode tok/s", "TTFT",
                                                          "peak memory", "meets constraints"], rows, "num") + "</div>")
    return "".join(parts)


def _targets_table(arts: list[dict]) -> str:
    rows = []
    for a in arts:
        for t, rec in _d(a.get("targets")).items():
            rec = _d(rec)
            rows.append([
                f"<b>{_e(a['name'])}</b>", _e(t), _e(rec.get("kind"), "?"),
                _fmt(rec.get("decode_tok_s"), ",.1f", missing="not predicted"),
                _fmt(rec.get("ttft_ms"), ",.0f", "ms", missing="not predicted"),
                _mb(rec.get("peak_memory_bytes"), missing="not predicted"),
                _gb(rec.get("memory_budget_bytes"), missing="unknown"),
                _fmt(rec.get("load_s"), ".2f", "s", missing="not predicted"),
                _bool(rec.get("fits")),
            ])
    if not rows:
        return '<p class="nodata">no data: no target devices in the report.</p>'
    return _table(["artifact", "target", "kind", "decode tok/s", "TTFT", "peak memory", "memory budget",
                   "load", "fits"], rows, "num")


def _edge_cloud_table(arts: list[dict], cloud: dict[str, dict]) -> str:
    rows = []
    for r in _edge_cloud_rows(arts, cloud):
        dq = r["quality_delta"]
        if r["group"] == "cloud":
            cost = _fmt(r["usd_per_1k"], ".5f", "USD", missing="unknown")
            mem = _na("n/a (server)")
        else:
            cost = _na("on device")
            mem = _mb(r["memory_bytes"], missing=NA if r["group"] == "edge-measured" else "not predicted")
            if r.get("fits") is False:
                mem += ' <span class="bad">(does not fit)</span>'
        rows.append([
            f'<span class="dot {r["group"]}"></span>{_e(r["artifact"]) if r["group"] != "cloud" else "reference"}',
            _e(r["where"]),
            _fmt(r["ttft_ms"], ",.0f", "ms"), _fmt(r["decode_tok_s"], ",.1f"),
            _fmt(r["rtt_ms"], ",.0f", "ms", missing="-"),
            mem,
            _na() if dq is None else html.escape(f"{dq:+.3f}"),
            cost,
            _e(r["source"]),
        ])
    return _table(["model", "where", "TTFT", "decode tok/s", "network RTT", "memory",
                   "quality delta (ppl \u2212 ref)", "cost / 1k tokens", "source"], rows, "num")


# -------------------------------------------------------------------------------------- page

CSS = """
:root{--fg:#1d2230;--muted:#6b7280;--line:#e5e7eb;--bg:#fafbfc;--card:#fff;--accent:#1f77b4}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--fg);
 font:14px/1.5 -apple-system,BlinkMacSystemFont,"Segoe UI",Roboto,"DejaVu Sans","Liberation Sans",Arial,sans-serif}
main{max-width:1180px;margin:0 auto;padding:28px 28px 60px}
header{margin-bottom:16px}
header h1{margin:0 0 4px;font-size:26px;letter-spacing:-.01em}
header .meta{color:var(--muted);font-size:13px}
h2{font-size:18px;margin:34px 0 12px;padding-bottom:6px;border-bottom:1px solid var(--line)}
.cards{display:flex;flex-wrap:wrap;gap:12px;margin:18px 0 6px}
.card{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:10px 14px;min-width:150px}
.card .v{font-size:20px;font-weight:600}.card .k{color:var(--muted);font-size:12px}
figure.plot{background:var(--card);border:1px solid var(--line);border-radius:8px;margin:0 0 18px;padding:12px 14px}
figure.plot svg{display:block;width:100%;height:auto}
figure.plot figcaption{color:#374151;font-size:13px;margin-top:6px;max-width:1000px}
.nodata{color:var(--muted);font-style:italic;padding:18px 6px;border:1px dashed var(--line);border-radius:6px;
 text-align:center;background:#fcfcfd}
.tablewrap{overflow-x:auto;background:var(--card);border:1px solid var(--line);border-radius:8px;margin-bottom:18px}
table{border-collapse:collapse;width:100%;font-size:12.5px}
th,td{padding:5px 8px;border-bottom:1px solid var(--line);text-align:left;vertical-align:top;white-space:nowrap}
thead th{background:#f3f4f6;font-weight:600;font-size:11.5px;color:#374151;white-space:normal;vertical-align:bottom}
table.num td:not(:first-child){font-variant-numeric:tabular-nums}
tbody tr:last-child td{border-bottom:none}
tbody tr:hover{background:#f9fafb}
table.kv{width:auto}.tablewrap.narrow{display:inline-block;min-width:380px}
td:last-child{white-space:normal}table.kv td:first-child{color:var(--muted)}
.sub{color:var(--muted);font-size:11px;font-weight:normal}
.na{color:#9ca3af;font-style:italic}
.ok{color:#15803d}.warn{color:#b45309}.bad{color:#b91c1c;font-weight:600}
.dot{display:inline-block;width:9px;height:9px;border-radius:50%;margin-right:6px;vertical-align:middle}
.dot.edge-measured{background:#2ca02c}.dot.edge-predicted{background:#1f77b4}.dot.cloud{background:#ff7f0e}
footer{color:var(--muted);font-size:12px;margin-top:30px}
"""


def _is_encoder(a: dict) -> bool:
    return _s(a.get("kind")) == "encoder"


def _encoder_table(arts: list[dict]) -> str:
    """Sentence encoders: texts/s and latency per batch, measured here and predicted per target."""
    rows = []
    for a in arts:
        m, ph = _d(a.get("measured")), _d(a.get("predicted_host"))
        q = _d(a.get("quality"))
        tokens = _fmt(a.get("tokens_per_text"), ".0f")
        if m:
            bs = _s(m.get("batch_size"), "?")
            rows.append([f"<b>{_e(a['name'])}</b>", "this host (measured)", "cpu", _na("set's own lengths"),
                         _fmt(m.get("single_latency_ms"), ",.2f", "ms"),
                         _fmt(m.get("batch_latency_ms"), ",.1f", "ms") + f' <span class="sub">(batch {html.escape(bs)})</span>',
                         _fmt(m.get("texts_s"), ",.0f"), _mb(m.get("peak_rss_bytes")), _na("-"),
                         _fmt(q.get("cosine_mean"), ".5f")])
            rows.append([f"<b>{_e(a['name'])}</b>", "this host (predicted)", "cpu", _na("same calls"),
                         _fmt(ph.get("single_latency_ms"), ",.2f", "ms", missing="not predicted") + " "
                         + _err_cell(ph.get("single_latency_ms"), m.get("single_latency_ms")),
                         _fmt(ph.get("batch_latency_ms"), ",.1f", "ms", missing="not predicted") + " "
                         + _err_cell(ph.get("batch_latency_ms"), m.get("batch_latency_ms")),
                         _na("-"), _na("-"), _na("-"), _na("-")])
        for t, rec in _d(a.get("targets")).items():
            rec = _d(rec)
            b = _d(rec.get("batches"))
            rows.append([f"<b>{_e(a['name'])}</b>", _e(t), _e(rec.get("kind"), "?"), tokens,
                         _fmt(_d(b.get("1")).get("latency_ms"), ",.2f", "ms", missing="not predicted"),
                         _fmt(_d(b.get("32")).get("latency_ms"), ",.1f", "ms", missing="not predicted"),
                         _fmt(rec.get("texts_s"), ",.0f", missing="not predicted"),
                         _mb(rec.get("peak_memory_bytes"), missing="not predicted"), _bool(rec.get("fits")),
                         _fmt(q.get("cosine_mean"), ".5f")])
    if not rows:
        return '<p class="nodata">no data: no encoder in the report.</p>'
    return _table(["artifact", "where", "kind", "tokens/text", "latency, 1 text", "latency, batch of 32",
                   "texts/s (batch 32)", "memory", "fits", "cosine vs float"], rows, "num")


def _notes_list(arts: list[dict]) -> str:
    """Why an artifact has no measurement or no prediction, and which calibration each rests on."""
    items = []
    for a in arts:
        for key in ("measured_note", "predictions_note", "calibration"):
            if a.get(key):
                label = {"measured_note": "measurement", "predictions_note": "predictions", "calibration": "calibration"}[key]
                items.append(f"<li><b>{_e(a['name'])}</b> ({_e(a.get('format'), '?')}"
                             f"{' encoder' if _is_encoder(a) else ''}) {label}: {_e(a.get(key))}</li>")
    return f"<ul class=\"notes\">{''.join(items)}</ul>" if items else ""


def _cards(data: dict, arts: list[dict], cloud: dict) -> str:
    host = _d(data.get("host"))
    items = [(str(len(arts)), "artifacts"), (str(len(_target_names(arts))), "target devices"),
             (str(len(cloud)), "cloud baselines")]
    sized = [(a, _num(a.get("size_bytes"))) for a in arts if _num(a.get("size_bytes")) is not None]
    if sized:
        a, s = min(sized, key=lambda t: t[1])
        items.append((f"{s / 1e6:,.1f} MB", f"smallest: {a['name']}"))
    q = [(a, _num(_d(a.get("quality")).get("kld_mean"))) for a in arts]
    q = [(a, v) for a, v in q if v is not None]
    if q:
        a, v = min(q, key=lambda t: t[1])
        items.append((f"{v:.4f}", f"lowest mean KLD: {a['name']}"))
    sp = [(a, _num(_d(a.get("measured")).get("decode_tok_s"))) for a in arts]
    sp = [(a, v) for a, v in sp if v is not None]
    if sp:
        a, v = max(sp, key=lambda t: t[1])
        items.append((f"{v:,.0f} tok/s", f"fastest on this host: {a['name']}"))
    if _num(host.get("cores_logical")) is not None or host.get("machine"):
        items.append((_s(host.get("machine"), "?"), f"host, {_s(host.get('cores_logical'), '?')} logical cores"))
    return '<div class="cards">' + "".join(
        f'<div class="card"><div class="v">{html.escape(v)}</div><div class="k">{html.escape(k)}</div></div>'
        for v, k in items) + "</div>"


def render_html(data: dict) -> str:
    """The report page as a string (see :func:`render_report`)."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        from edgekit.errors import MissingDependencyError

        raise MissingDependencyError("the report's plots need matplotlib", "pip install 'edgekit-ml[report]'")
    data = data if isinstance(data, dict) else {}
    title = _s(data.get("title"), "edgekit report") or "edgekit report"
    created = _s(data.get("created"))
    arts = _artifacts(data)
    cloud = _cloud(data)
    host = _d(data.get("host"))
    meta = " &middot; ".join(x for x in [f"created {_e(created)}" if created else "",
                                          f"host {_e(host.get('machine'))}" if host.get("machine") else "",
                                          f"{len(arts)} artifact{'s' if len(arts) != 1 else ''}"] if x)
    parts = [f"<header><h1>{html.escape(title)}</h1><div class=\"meta\">{meta}</div></header>"]
    if not arts:
        parts.append('<div class="nodata" id="no-artifacts">No artifacts in this report: nothing was converted '
                     "or profiled yet. Run <code>edgekit convert</code> and <code>edgekit profile</code>, then "
                     "<code>edgekit report</code> again.</div>")
        if cloud:
            parts.append("<h2>Cloud baselines</h2>")
            parts.append(f'<div class="tablewrap">{_edge_cloud_table(arts, cloud)}</div>')
        if host:
            parts.append("<h2>Host</h2>")
            parts.append(f'<div class="tablewrap narrow">{_host_table(host)}</div>')
    else:
        parts.append(_cards(data, arts, cloud))
        if data.get("sweep"):
            parts.append("<h2>Sweep: fronts per device</h2>")
            parts.append(_sweep_section(_d(data["sweep"])))
        encoders = [a for a in arts if _is_encoder(a)]
        arts = [a for a in arts if not _is_encoder(a)]  # the plots and tables below are of decoders
        parts.append("<h2>Plots</h2>")
        parts.append(_safe_plot("size-quality-latency", "Size, quality and predicted speed",
                                lambda: _plot_size_quality_latency(arts)))
        parts.append(_safe_plot("pareto", "Pareto frontier: size vs quality", lambda: _plot_pareto(arts)))
        parts.append(_safe_plot("measured-vs-predicted", "Measured vs predicted on this host",
                                lambda: _plot_measured_vs_predicted(arts)))
        parts.append(_safe_plot("edge-vs-cloud", "Edge vs cloud: latency and speed",
                                lambda: _plot_edge_vs_cloud(arts, cloud)))
        parts.append("<h2>Edge vs cloud</h2>")
        parts.append(f'<div class="tablewrap">{_edge_cloud_table(arts, cloud)}</div>')
        parts.append("<h2>Artifacts and quality</h2>")
        parts.append(f'<div class="tablewrap">{_artifact_table(arts + encoders)}</div>')
        parts.append("<h2>This host: measured vs predicted</h2>")
        parts.append(f'<div class="tablewrap">{_host_perf_table(arts)}</div>')
        devices = _devices_table(arts)
        if devices:
            parts.append("<h2>Measured on devices (edgekit agent)</h2>")
            parts.append(f'<div class="tablewrap">{devices}</div>')
        parts.append("<h2>Target devices (predicted)</h2>")
        parts.append(f'<div class="tablewrap">{_targets_table(arts)}</div>')
        if encoders:
            parts.append("<h2>Sentence encoders: texts/s and latency per batch</h2>")
            parts.append(f'<div class="tablewrap">{_encoder_table(encoders)}</div>')
        notes = _notes_list(arts + encoders)
        if notes:
            parts.append("<h2>Notes</h2>")
            parts.append(notes)
        parts.append("<h2>Host</h2>")
        parts.append(f'<div class="tablewrap narrow">{_host_table(host)}</div>' if host else
                     '<p class="nodata">no data: host not described.</p>')
    parts.append("<footer>Generated by edgekit. Self-contained: this page loads nothing from the network. "
                 "&ldquo;not measured&rdquo; marks numbers the report does not have.</footer>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{html.escape(title)}</title><style>{CSS}</style></head>"
            f"<body><main>{''.join(parts)}</main></body></html>\n")


def render_report(data: dict, out_path: str | Path) -> Path:
    """Render ``data`` (the ``edgekit report`` schema) to a self-contained HTML file.

    Written atomically: a temporary file next to ``out_path`` is replaced into place, so a reader
    never sees half a page. Returns the path written.
    """
    out = Path(out_path)
    page = render_html(data)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(page)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        raise
    return out
