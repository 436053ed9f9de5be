"""The HTML report: self-contained, four plots as inline SVG, copes with missing numbers, and renders
in headless Chromium (screenshot kept under tests/artifacts/report.png for a person to look at)."""

from __future__ import annotations

import copy
import os
import re
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from edgekit.report_html import pareto_front, render_report

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / "tests" / "artifacts"
CHROMIUM = os.environ.get("EDGEKIT_CHROMIUM", "/usr/bin/chromium")
FIGURE_IDS = ["size-quality-latency", "pareto", "measured-vs-predicted", "edge-vs-cloud"]


def _targets(scale: float, mem: float, fits_pi_zero: bool = True) -> dict:
    return {
        "raspberry-pi-5": {"kind": "cpu", "decode_tok_s": 30.0 * scale, "ttft_ms": 900.0 / scale,
                           "peak_memory_bytes": mem, "load_s": 1.1, "fits": True, "memory_budget_bytes": 6.4e9},
        "iphone-15-pro": {"kind": "gpu", "decode_tok_s": 85.0 * scale, "ttft_ms": 210.0 / scale,
                          "peak_memory_bytes": mem * 1.05, "load_s": 0.4, "fits": True,
                          "memory_budget_bytes": 3.0e9},
        "pi-zero-2w": {"kind": "cpu", "decode_tok_s": 4.0 * scale, "ttft_ms": 6500.0 / scale,
                       "peak_memory_bytes": mem, "load_s": 6.0, "fits": fits_pi_zero,
                       "memory_budget_bytes": 0.3e9},
    }


def sample_data() -> dict:
    """Four SmolLM2-135M artifacts, three targets, two cloud baselines; q8_0 was never profiled."""
    return {
        "title": "edgekit report",
        "created": "2026-11-29T16:00:00Z",
        "host": {"machine": "x86_64", "cores_logical": 2, "ram_bytes": 25e9, "copy_bandwidth_gbs": 17.8,
                 "compute_f32_gflops": 90.0},
        "artifacts": [
            {"name": "smollm2-f16", "dir": "out/f16", "format": "gguf", "recipe": "f16", "size_bytes": 271e6,
             "bits_per_weight": 16.0,
             "quality": {"ppl": 15.12, "ref_ppl": 15.1, "kld_mean": 0.0004, "kld_p99": 0.003,
                         "top1_agreement": 0.995},
             "measured": {"decode_tok_s": 41.0, "ttft_ms": 520.0, "prefill_tok_s": 230.0,
                          "peak_rss_bytes": 470e6, "load_s": 0.41},
             "predicted_host": {"decode_tok_s": 44.0, "ttft_ms": 480.0, "peak_memory_bytes": 455e6, "load_s": 0.35},
             "targets": _targets(0.35, 460e6, fits_pi_zero=False)},
            {"name": "smollm2-q8_0", "dir": "out/q8_0", "format": "gguf", "recipe": "q8_0", "size_bytes": 145e6,
             "bits_per_weight": 8.5,
             "quality": {"ppl": 15.2, "ref_ppl": 15.1, "kld_mean": 0.0031, "kld_p99": 0.021,
                         "top1_agreement": 0.97},
             "measured": None,
             "predicted_host": {"decode_tok_s": 72.0, "ttft_ms": 330.0, "peak_memory_bytes": 340e6, "load_s": 0.25},
             "targets": _targets(0.65, 330e6, fits_pi_zero=False)},
            {"name": "smollm2-int4", "dir": "out/int4", "format": "gguf", "recipe": "int4", "size_bytes": 91.7e6,
             "bits_per_weight": 5.35,
             "quality": {"ppl": 16.8, "ref_ppl": 15.1, "kld_mean": 0.107, "kld_p99": 0.57, "top1_agreement": 0.82},
             "measured": {"decode_tok_s": 100.0, "ttft_ms": 240.0, "prefill_tok_s": 480.0,
                          "peak_rss_bytes": 295e6, "load_s": 0.17},
             "predicted_host": {"decode_tok_s": 97.0, "ttft_ms": 250.0, "peak_memory_bytes": 290e6, "load_s": 0.2},
             "targets": _targets(1.0, 290e6)},
            {"name": "smollm2-q4_0", "dir": "out/q4_0", "format": "gguf", "recipe": "q4_0", "size_bytes": 95.0e6,
             "bits_per_weight": 5.5,
             "quality": {"ppl": 18.4, "ref_ppl": 15.1, "kld_mean": 0.19, "kld_p99": 0.93, "top1_agreement": 0.76},
             "measured": {"decode_tok_s": 92.0, "ttft_ms": 265.0, "prefill_tok_s": 450.0,
                          "peak_rss_bytes": 300e6, "load_s": 0.18},
             "predicted_host": {"decode_tok_s": 105.0, "ttft_ms": 240.0, "peak_memory_bytes": 292e6,
                                "load_s": 0.2},
             "targets": _targets(0.95, 293e6)},
        ],
        "cloud": {
            "cloud-h100": {"ttft_ms": 180.0, "decode_tok_s": 150.0, "usd_per_1k_tokens": 0.0006, "rtt_ms": 60.0,
                           "source": "simulated"},
            "measured-endpoint": {"ttft_ms": 95.0, "decode_tok_s": 61.0, "usd_per_1k_tokens": None,
                                  "rtt_ms": None, "source": "measured http://127.0.0.1:8000"},
        },
    }


class _Figures(HTMLParser):
    """Counts <figure class="plot"> elements, and which of them contain an <svg> or a no-data note."""

    def __init__(self) -> None:
        super().__init__()
        self.figures: dict[str, dict] = {}
        self._stack: list[str | None] = []  # figure id per open <figure>, None for other figures
        self.external: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        for key in ("src", "href", "xlink:href"):
            v = (a.get(key) or "").strip().lower()
            if v.startswith(("http://", "https://", "//")):
                self.external.append(f"<{tag} {key}={a[key]}>")
        if tag == "link" or (tag == "script" and a.get("src")):
            self.external.append(f"<{tag} {a}>")
        if tag == "figure":
            fid = a.get("id") if "plot" in (a.get("class") or "").split() else None
            if fid is not None:
                self.figures[fid] = {"svg": False, "nodata": False}
            self._stack.append(fid)
        elif self._stack and self._stack[-1] is not None:
            f = self.figures[self._stack[-1]]
            if tag == "svg":
                f["svg"] = True
            if "nodata" in (a.get("class") or "").split():
                f["nodata"] = True

    def handle_endtag(self, tag):
        if tag == "figure" and self._stack:
            self._stack.pop()


def parse(page: str) -> _Figures:
    p = _Figures()
    p.feed(page)
    p.close()
    return p


def assert_self_contained(page: str) -> None:
    p = parse(page)
    assert not p.external, f"external resources referenced: {p.external}"
    # belt and braces, on the raw text: any tag attribute ending in src/href (xlink:href too), CSS url()
    assert not re.search(r"""<[^>]*(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", page, re.I)
    assert not re.search(r"url\(\s*['\"]?\s*(?:https?:)?//", page, re.I)
    assert not re.search(r"@import", page, re.I)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> Path:
    return render_report(sample_data(), tmp_path_factory.mktemp("report") / "report.html")


def test_self_contained_with_four_svg_plots(rendered):
    page = rendered.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>")
    assert_self_contained(page)
    figs = parse(page).figures
    assert list(figs) == FIGURE_IDS
    for fid, f in figs.items():
        assert f["svg"] and not f["nodata"], fid
    assert page.count("<svg") == 4
    assert "<?xml" not in page
    # ids inside the inline SVGs do not collide across plots
    ids = re.findall(r'\bid="([^"]+)"', page)
    dupes = {i for i in ids if ids.count(i) > 1}
    assert not dupes, sorted(dupes)[:10]
    # numbers and names made it to the tables; the artifact without a measurement says so
    for name in ("smollm2-f16", "smollm2-q8_0", "smollm2-int4", "smollm2-q4_0", "cloud-h100", "raspberry-pi-5"):
        assert name in page
    assert "not measured" in page
    assert "-3.0%" in page  # int4: predicted 97 vs measured 100 tok/s
    assert "http://127.0.0.1:8000" in page  # the cloud source is text, not a link
    assert 'href="http' not in page


def test_writes_atomically(tmp_path):
    out = tmp_path / "sub" / "r.html"
    assert render_report(sample_data(), out) == out
    first = out.read_text()
    render_report(sample_data(), str(out))
    assert out.read_text() == first  # deterministic
    assert sorted(p.name for p in out.parent.iterdir()) == ["r.html"]  # no temporary file left behind


def test_no_artifacts(tmp_path):
    for data in ({"title": "edgekit report", "artifacts": [], "cloud": {}}, {}):
        page = render_report(data, tmp_path / "empty.html").read_text()
        assert "No artifacts" in page
        assert "<svg" not in page
        assert_self_contained(page)


def test_missing_numbers_and_missing_sections(tmp_path):
    data = sample_data()
    for a in data["artifacts"]:
        a["targets"] = {}
        a["measured"] = None
    data["cloud"] = {}
    data["artifacts"][1]["quality"] = None
    data["artifacts"][2]["size_bytes"] = None
    data["artifacts"][0]["predicted_host"] = {"decode_tok_s": None, "ttft_ms": float("nan")}
    data["host"] = {"machine": None, "cores_logical": None}
    page = render_report(data, tmp_path / "r.html").read_text()
    figs = parse(page).figures
    assert list(figs) == FIGURE_IDS
    assert figs["measured-vs-predicted"]["nodata"] and not figs["measured-vs-predicted"]["svg"]
    assert figs["pareto"]["svg"] and figs["size-quality-latency"]["svg"]
    assert figs["edge-vs-cloud"]["nodata"]  # no measurement, no target, no cloud
    assert "not measured" in page

    data = sample_data()
    data["cloud"] = {}
    page = render_report(data, tmp_path / "nocloud.html").read_text()
    figs = parse(page).figures
    assert figs["edge-vs-cloud"]["svg"] and "No cloud baselines" in page

    # nothing at all: every plot says "no data", nothing crashes
    bare = {"artifacts": [{"name": None}, {"name": "x", "quality": {}, "measured": {}, "targets": None}],
            "cloud": None, "host": None}
    figs = parse(render_report(bare, tmp_path / "bare.html").read_text()).figures
    assert list(figs) == FIGURE_IDS
    assert all(f["nodata"] and not f["svg"] for f in figs.values())


def test_single_artifact_and_zero_kld(tmp_path):
    data = sample_data()
    one = copy.deepcopy(data["artifacts"][2])
    data["artifacts"] = [one]
    figs = parse(render_report(data, tmp_path / "one.html").read_text()).figures
    assert all(f["svg"] and not f["nodata"] for f in figs.values()), figs
    # a lossless artifact (KLD exactly 0) next to lossy ones: no log-of-zero failure
    data = sample_data()
    data["artifacts"][0]["quality"]["kld_mean"] = 0.0
    page = render_report(data, tmp_path / "zero.html").read_text()
    figs = parse(page).figures
    assert all(f["svg"] and not f["nodata"] for f in figs.values()), figs
    assert "could not be drawn" not in page


def test_strings_are_escaped(tmp_path):
    data = sample_data()
    evil = '<script>alert("x")</script> $\\frac{a}{b $ & co'
    data["artifacts"][0]["name"] = evil
    data["artifacts"][0]["recipe"] = "<b>r</b>"
    data["artifacts"][0]["targets"] = {'<img src="http://x/y.png">': {"kind": "<i>", "decode_tok_s": 5.0}}
    data["cloud"] = {"<svg onload=x>": {"ttft_ms": 1.0, "source": "<a href='https://example.com'>"}}
    data["title"] = "</title><script>"
    page = render_report(data, tmp_path / "r.html").read_text()
    assert "<script" not in page
    assert "<img" not in page and "<b>r</b>" not in page and "<svg onload" not in page
    assert_self_contained(page)
    figs = parse(page).figures
    assert all(f["svg"] for f in figs.values()), figs  # a "$" in a name does not break matplotlib
    assert "could not be drawn" not in page


def test_pareto_front():
    pts = [(91.7, 0.107), (95.0, 0.19), (145.0, 0.0031), (271.0, 0.0004), (300.0, 0.001)]
    assert pareto_front(pts) == [0, 2, 3]
    assert pareto_front([]) == []
    assert pareto_front([(1.0, 1.0), (1.0, 1.0)]) == [0]


# ------------------------------------------------------------------------------ headless Chromium

def _chromium(args: list[str], tmp_path: Path, name: str) -> subprocess.CompletedProcess:
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        pytest.fail(f"Chromium is not installed ({CHROMIUM} not found): the HTML report test renders the page in "
                    "headless Chromium. Run `make setup` to install it (or set EDGEKIT_CHROMIUM to a chromium "
                    "binary).", pytrace=False)
    profile = tmp_path / f"chromium-profile-{name}"
    profile.mkdir()
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-dev-shm-usage", "--hide-scrollbars", f"--user-data-dir={profile}", *args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"headless Chromium did not finish within 60 s: {' '.join(cmd)}\n{exc.stderr or ''}")
    assert proc.returncode == 0, f"chromium exited {proc.returncode}\n{proc.stderr[-3000:]}"
    return proc


def test_renders_in_headless_chromium(rendered, tmp_path):
    url = rendered.resolve().as_uri()
    dom = _chromium(["--dump-dom", url], tmp_path, "dom").stdout
    figs = parse(dom).figures
    assert list(figs) == FIGURE_IDS, f"figures in Chromium's DOM: {list(figs)}\n{dom[:2000]}"
    assert all(f["svg"] for f in figs.values()), figs

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    png = ARTIFACTS / "report.png"
    png.unlink(missing_ok=True)
    _chromium([f"--screenshot={png}", "--window-size=1280,3000", url], tmp_path, "shot")
    assert png.is_file(), "Chromium wrote no screenshot"
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 20_000, f"screenshot is only {len(data)} bytes: the page is probably blank"


@pytest.fixture(scope="module")
def three_kinds(tmp_path_factory) -> Path:
    """One page from real artifacts of the three kinds: a GGUF, an ONNX decoder and an ONNX encoder
    (tiny models, measured here), with predictions for two devices."""
    from tests.test_targets import _onnx_decoder, build_tiny_encoder

    from edgekit.converters.gguf import GGUFExporter
    from edgekit.passes.rtn import Q4_0Pass
    from edgekit.targets.report_data import collect
    from tests.conftest import tiny_model

    root = tmp_path_factory.mktemp("three")
    (root / "gguf-f32").mkdir()
    GGUFExporter().export(tiny_model(), root / "gguf-f32")
    _onnx_decoder(root / "onnx-q4_0", Q4_0Pass)
    enc = build_tiny_encoder(root / "bert", root / "minilm-like-int8")[1]
    data = collect([root / "gguf-f32", root / "onnx-q4_0", enc], ["raspberry-pi-5", "iphone-15-pro"])
    path = render_report(data, root / "report.html")
    (root / "data.json").write_text(__import__("json").dumps(data, default=str))
    return path


def test_one_page_holds_gguf_onnx_and_encoder(three_kinds, tmp_path):
    import json

    data = json.loads((three_kinds.parent / "data.json").read_text())
    by = {a["name"]: a for a in data["artifacts"]}
    assert {a["format"] for a in by.values()} == {"gguf", "onnx"} and by[list(by)[2]]["kind"] == "encoder"
    for a in by.values():
        assert set(a["targets"]) == {"raspberry-pi-5", "iphone-15-pro"}, (a["name"], a.get("predictions_note"))
        assert a["measured"] and a["predicted_host"]
    enc = by[list(by)[2]]
    assert all(t["batches"]["32"]["texts_s"] > 0 for t in enc["targets"].values())
    assert all(t["decode_tok_s"] > 0 for a in list(by.values())[:2] for t in a["targets"].values())
    page = three_kinds.read_text(encoding="utf-8")
    assert_self_contained(page)
    assert "Sentence encoders" in page and page.count("texts/s") >= 1
    dom = _chromium(["--dump-dom", three_kinds.resolve().as_uri()], tmp_path, "dom3").stdout
    assert list(parse(dom).figures) == FIGURE_IDS and "Sentence encoders" in dom
    for name in by:
        assert name in dom
