"""Self-contained HTML pages: PNGs embedded as base64, inline CSS, no external resources.

The page's inline script sets ``data-images-ok="true"`` on ``<body>`` once every ``<img>`` has decoded
(``naturalWidth > 0``), so a headless browser's dumped DOM tells whether the page rendered.
"""

from __future__ import annotations

import base64
import html
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from cervspine.report import SYNTHETIC_LABEL

CSS = """
body{font-family:-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:0 auto;max-width:1200px;
padding:0 20px 40px;color:#222;line-height:1.4}
h1{font-size:1.5em;margin:18px 0 4px}h2{font-size:1.15em;margin:26px 0 8px;border-bottom:1px solid #ddd}
.banner{background:#c0392b;color:#fff;font-weight:700;padding:10px 14px;margin:0 -20px 10px;font-size:1.05em}
.meta{color:#555;font-size:.9em}.note{color:#555;font-size:.9em;margin:4px 0 10px}
img{max-width:100%;height:auto;display:block;margin:8px 0;border:1px solid #eee}
table{border-collapse:collapse;font-size:.88em;margin:8px 0}
th,td{border:1px solid #ddd;padding:4px 8px;text-align:right}th{background:#f3f5f8}
td:first-child,th:first-child{text-align:left}
.ci{color:#777;font-size:.85em}
.warning{background:#fff4d6;border-left:4px solid #e67e22;padding:6px 10px;margin:8px 0}
"""

IMAGES_OK_SCRIPT = """
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.length > 0 && imgs.every(function (i) { return i.complete && i.naturalWidth > 0; });
  document.body.setAttribute("data-images-count", String(imgs.length));
  document.body.setAttribute("data-images-ok", ok ? "true" : "false");
});
"""


def esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def img_tag(png: bytes | str | Path, alt: str) -> str:
    """An ``<img>`` with the PNG (bytes or a file) inlined as a data URI."""
    data = png if isinstance(png, bytes) else Path(png).read_bytes()
    if not data.startswith(b"\x89PNG"):
        raise ValueError(f"{alt}: not PNG data")
    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A plain table; cells are escaped unless they are :class:`Raw`."""

    def cell(v: object, tag: str) -> str:
        return f"<{tag}>{v if isinstance(v, Raw) else esc(v)}</{tag}>"

    head = "".join(cell(h, "th") for h in header)
    body = "".join("<tr>" + "".join(cell(v, "td") for v in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


class Raw(str):
    """Already-safe HTML for :func:`table` cells."""


def page(title: str, sections: Sequence[str], *, synthetic: bool, subtitle: str = "") -> str:
    """The whole document: a SYNTHETIC DATA banner when ``synthetic``, then the sections (HTML)."""
    banner = (
        f'<div class="banner" id="synthetic-banner">{SYNTHETIC_LABEL}: these results come from generated '
        "volumes and say nothing about real CT.</div>"
        if synthetic
        else ""
    )
    sub = f'<p class="meta">{esc(subtitle)}</p>' if subtitle else ""
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
        f"<style>{CSS}</style><script>{IMAGES_OK_SCRIPT}</script></head>\n"
        f'<body data-synthetic="{str(synthetic).lower()}">{banner}<h1>{esc(title)}</h1>{sub}\n'
        + "\n".join(sections)
        + "\n</body></html>\n"
    )


def write_page(path: str | Path, document: str) -> Path:
    """Write the page atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(document, encoding="utf-8")
    tmp.replace(path)
    return path
