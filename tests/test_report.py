"""Tests for the self-contained HTML report (mediff.report)."""

from __future__ import annotations

import base64
import html
import io
import re

import numpy as np
import pytest
from PIL import Image

from mediff.errors import MediffError
from mediff.report import Panel, render_panel, save_png, write_report

PNG_URI = '<img src="data:image/png;base64,'
_B64_RE = re.compile(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


def _phantom(n: int = 48) -> np.ndarray:
    y, x = np.mgrid[:n, :n] / n - 0.5
    return ((x**2 + y**2) < 0.16).astype(np.float64) + 0.3 * ((x - 0.1) ** 2 + y**2 < 0.01)


def _panels() -> list[Panel]:
    ref = _phantom()
    rng = np.random.default_rng(0)
    rec = ref + 0.05 * rng.standard_normal(ref.shape)
    mask = np.zeros_like(ref)
    mask[:, ::4] = 1
    return [
        Panel("reference", ref, vmin=0.0, vmax=1.3, caption="ground truth"),
        Panel("DDS <x> & y", rec, vmin=0.0, vmax=1.3, caption="50 NFE \"fast\""),
        Panel("|error|", np.abs(rec - ref), kind="error"),
        Panel("posterior std", rng.random(ref.shape), kind="uncertainty"),
        Panel("mask R=4", mask, kind="mask"),
    ]


ROWS = [
    {"method": "zero-filled", "PSNR": 24.123, "SSIM": 0.71234, "NMSE": 0.08, "NFE": 1,
     "seconds": 0.01},
    {"method": "dds", "PSNR": 31.456, "SSIM": 0.91, "NMSE": 0.0123, "NFE": 50, "seconds": 3.1},
    {"method": "dps", "PSNR": 29.9, "SSIM": 0.93, "NMSE": 0.02, "NFE": 1000, "seconds": 60.0},
]


def _rgb(png: bytes) -> np.ndarray:
    im = Image.open(io.BytesIO(png))
    im.load()
    return np.asarray(im.convert("RGB")).astype(int)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("rep") / "sub" / "report.html"
    panels = _panels()
    path = write_report(
        out,
        "Recon <b>report</b> & co",
        panels,
        metrics=ROWS,
        notes=[
            "k-space simulated from a magnitude image",
            "image resampled from 256x256 to 128x128",
        ],
        meta={"command": "mediff recon --x <y>", "seed": 1234, "model": "unet-small"},
    )
    return path, path.read_text(encoding="utf-8"), panels


def test_report_contains_title_panels_and_valid_pngs(report):
    path, text, panels = report
    assert path.is_file()
    assert "Recon &lt;b&gt;report&lt;/b&gt; &amp; co" in text
    assert "<b>report</b>" not in text  # the title was escaped, not injected
    for p in panels:
        assert f">{html.escape(p.title)}<" in text
        if p.caption:
            assert html.escape(p.caption) in text
    assert text.count(PNG_URI) == len(panels)
    blobs = _B64_RE.findall(text)
    assert len(blobs) == len(panels)
    for b in blobs:
        png = base64.b64decode(b, validate=True)
        assert png.startswith(b"\x89PNG\r\n\x1a\n")
        im = Image.open(io.BytesIO(png))
        im.verify()
        w, h = Image.open(io.BytesIO(png)).size
        assert 150 <= w <= 1200 and 150 <= h <= 1200


def test_special_characters_escaped(report):
    _, text, _ = report
    assert "DDS &lt;x&gt; &amp; y" in text
    assert "DDS <x>" not in text
    assert "50 NFE &quot;fast&quot;" in text
    assert "mediff recon --x &lt;y&gt;" in text


def test_metrics_table_formatting_and_best(report):
    _, text, _ = report
    table = text[text.index('<table class="metrics"'):]
    table = table[: table.index("</table>")]
    # Formatting: 2 decimals for PSNR, 4 for SSIM/NMSE, ints stay ints.
    for s in ["24.12", "29.90", "0.7123", "0.9100", "0.0800", "0.0123", ">1000<"]:
        assert s in table, s
    assert "24.123" not in table
    # Best per column: PSNR highest (dds), SSIM highest (dps), NMSE lowest (dds), seconds lowest.
    assert "<b>31.46</b>" in table
    assert "<b>0.9300</b>" in table and "<b>0.9100</b>" not in table
    assert "<b>0.0123</b>" in table and "<b>0.0800</b>" not in table
    assert "<b>0.01</b>" in table and "<b>60.00</b>" not in table
    assert "<b>29.90</b>" not in table and "<b>24.12</b>" not in table
    # NFE has no direction: nothing bolded there.
    assert "<b>1000</b>" not in table and "<b>1</b>" not in table
    # Exactly one bold cell per ranked column.
    assert table.count("<b>") == 4


def test_notes_and_meta(report):
    _, text, _ = report
    assert "<li>k-space simulated from a magnitude image</li>" in text
    assert "<li>image resampled from 256x256 to 128x128</li>" in text
    assert "<td>seed</td><td>1234</td>" in text
    assert "<td>model</td><td>unet-small</td>" in text


def test_offline_no_external_urls_no_temp_files(report):
    path, text, _ = report
    stripped = _B64_RE.sub('src=""', text)  # base64 may contain "http" by chance
    assert "http" not in stripped.lower()
    assert "<script" not in text.lower()
    assert "url(" not in stripped and "<link" not in stripped
    assert [p.name for p in path.parent.iterdir()] == ["report.html"]


def test_single_dict_metrics_and_small_values(tmp_path):
    text = write_report(
        tmp_path / "r.html", "one", [], metrics={"method": "x", "PSNR": 30.0, "NMSE": 2e-5}
    ).read_text()
    assert "30.00" in text and "2.00e-05" in text
    assert "<b>" not in text  # a single row has nothing to compare against


@pytest.mark.parametrize("kind", ["image", "error", "uncertainty", "mask"])
def test_render_panel_kinds(kind):
    png = render_panel(Panel("t", _phantom(), kind=kind))
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    rgb = _rgb(png)
    colour = (rgb.max(axis=-1) - rgb.min(axis=-1)) > 30
    if kind in ("error", "uncertainty"):
        assert colour.sum() > 500, "colormapped panel should contain coloured pixels"
    else:
        assert colour.sum() == 0, "gray panel should have R == G == B everywhere"


def test_error_and_uncertainty_use_different_colormaps():
    a = _phantom()
    err = _rgb(render_panel(Panel("t", a, kind="error")))
    unc = _rgb(render_panel(Panel("t", a, kind="uncertainty")))
    assert np.abs(err - unc).mean() > 5


def test_window_respected():
    a = _phantom()
    dark = _rgb(render_panel(Panel("t", a, vmin=0.0, vmax=100.0)))
    auto = _rgb(render_panel(Panel("t", a)))
    assert auto.mean() > dark.mean() + 20  # auto window stretches the phantom to white


def test_constant_and_nan_images_render():
    render_panel(Panel("const", np.full((16, 16), 3.0)))
    a = _phantom()
    a[0, 0] = np.nan
    render_panel(Panel("nan", a, kind="error"))


def test_invalid_panels():
    with pytest.raises(ValueError):
        Panel("bad", _phantom(), kind="rainbow")
    with pytest.raises(ValueError):
        render_panel(Panel("3d", np.zeros((4, 4, 4))))


def test_overwrite_and_failure_keeps_old_file(tmp_path):
    out = tmp_path / "r.html"
    write_report(out, "first", [Panel("a", _phantom())])
    before = out.read_bytes()
    with pytest.raises(MediffError):
        write_report(out, "second", [], overwrite=False)
    with pytest.raises(ValueError):
        write_report(out, "third", [Panel("bad", np.zeros((2, 2, 2)))])
    assert out.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["r.html"]
    write_report(out, "fourth", [])
    assert "fourth" in out.read_text()


def test_save_png(tmp_path):
    out = save_png(tmp_path / "figs" / "err.png", Panel("e", _phantom(), kind="error"))
    assert Image.open(out).format == "PNG"
    assert [p.name for p in out.parent.iterdir()] == ["err.png"]
