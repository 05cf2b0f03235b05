"""Render the built book's pages in headless Chromium: clipped content, MathJax errors, screenshots.

For every HTML page of a built book, :func:`check_site` loads the page at a fixed window
width (1280 px, a laptop) with no network, waits for MathJax to typeset, and measures in
the browser:

* elements that stick out of the content column (``article.bd-article``) on either side;
* scroll containers inside the column whose content is wider than the box (a code block,
  table or drawing the reader has to scroll sideways to see: in a screenshot it is cut off);
* MathJax errors (``mjx-merror`` / ``merror`` elements, e.g. "\\tag not allowed in split
  environment") and the number of typeset formulas;

then takes a screenshot of the whole page (up to ``max_height`` pixels). The measuring
script is added to a temporary copy of each page, next to it (so that relative links
resolve), and removed afterwards. Chromium is driven through its command line only
(``--dump-dom`` and ``--screenshot``), so no Python browser driver is needed.

``python -m gimplib.book.render_check _build/html --out _build/screenshots`` prints one
line per page and exits 1 when a page has a problem.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

__all__ = ["PageReport", "check_page", "check_site", "find_chromium", "headless_command", "main"]

#: Marker of the temporary copies (never a page of the book itself).
_PROBE_PREFIX = "_gimp_probe_"

_PROBE_JS = r"""
<script>
(function () {
  function describe(el) {
    var name = el.tagName.toLowerCase();
    if (el.id) name += "#" + el.id;
    if (typeof el.className === "string" && el.className.trim())
      name += "." + el.className.trim().split(/\s+/).slice(0, 3).join(".");
    var text = (el.textContent || "").replace(/\s+/g, " ").trim().slice(0, 80);
    return name + (text ? " '" + text + "'" : "");
  }
  function visible(el) {
    var r = el.getBoundingClientRect();
    if (r.width === 0 && r.height === 0) return false;
    var cs = getComputedStyle(el);
    return cs.visibility !== "hidden" && cs.display !== "none";
  }
  function clips(cs) {
    return ["auto", "scroll", "hidden", "clip"].indexOf(cs.overflowX) >= 0;
  }
  function probe() {
    // MathJax's copy for screen readers is clipped to 1 px on purpose; it would count as overflow
    var hide = document.createElement("style");
    hide.textContent = "mjx-assistive-mml { display: none !important; }";
    document.head.appendChild(hide);
    var col = document.querySelector("article.bd-article") || document.querySelector("main") || document.body;
    var box = col.getBoundingClientRect();
    var outside = [], scrolled = [];
    var all = col.querySelectorAll("*");
    for (var i = 0; i < all.length; i++) {
      var el = all[i];
      if (!visible(el)) continue;
      var cs = getComputedStyle(el);
      // a box the reader must scroll sideways to see all of (MathJax's own equation boxes
      // included: an equation wider than the column is clipped as well)
      if (clips(cs) && el.scrollWidth > el.clientWidth + 2) scrolled.push(describe(el) + " [" + el.scrollWidth + " px in " + el.clientWidth + " px]");
      var r = el.getBoundingClientRect();
      if (r.right > box.right + 2 || r.left < box.left - 2) {
        // only the outermost element outside the column, and not when a clipping box holds it
        var p = el.parentElement, hidden = false, reported = false;
        while (p && p !== col) {
          var pr = p.getBoundingClientRect();
          if (clips(getComputedStyle(p))) { hidden = true; break; }
          if (pr.right > box.right + 2 || pr.left < box.left - 2) { reported = true; break; }
          p = p.parentElement;
        }
        if (!hidden && !reported) outside.push(describe(el) + " [" + Math.round(r.left - box.left) + ".." + Math.round(r.right - box.left) + " px in a " + Math.round(box.width) + " px column]");
      }
    }
    var errors = [];
    var merr = document.querySelectorAll("mjx-merror, merror");
    for (var j = 0; j < merr.length; j++) errors.push((merr[j].getAttribute("data-mjx-error") || merr[j].textContent || "").trim().slice(0, 120));
    var out = {
      column_width: Math.round(box.width),
      page_height: Math.ceil(Math.max(document.documentElement.scrollHeight, document.body.scrollHeight)),
      outside: outside, scrolled: scrolled, math_errors: errors,
      formulas: document.querySelectorAll("mjx-container").length,
      mathjax: typeof window.MathJax === "object" && !!window.MathJax.startup
    };
    var pre = document.createElement("pre");
    pre.id = "gimp-probe-result";
    pre.style.display = "none";
    pre.textContent = JSON.stringify(out);
    document.body.appendChild(pre);
  }
  window.addEventListener("load", function () {
    var mj = window.MathJax;
    var ready = mj && mj.startup && mj.startup.promise ? mj.startup.promise : Promise.resolve();
    ready.then(function () { setTimeout(probe, 200); }, function () { setTimeout(probe, 200); });
  });
})();
</script>
"""


@dataclass
class PageReport:
    """What the browser found on one page.

    Attributes:
        page: the page, relative to the site root (``book/intro.html``).
        column_width: width of the content column in CSS pixels.
        outside: elements sticking out of the column (outermost only), described.
        scrolled: boxes inside the column whose content is wider than the box.
        math_errors: text of every MathJax error element.
        formulas: typeset formulas (``mjx-container`` elements).
        page_height: the page's full height in CSS pixels (the screenshot's, up to a cap).
        screenshot: the PNG written, or None.
        error: why the page could not be measured (Chromium failed), else None.
    """

    page: str
    column_width: int = 0
    outside: list[str] = field(default_factory=list)
    scrolled: list[str] = field(default_factory=list)
    math_errors: list[str] = field(default_factory=list)
    formulas: int = 0
    page_height: int = 0
    screenshot: Path | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        """True when nothing is clipped, no formula failed and the page was measured."""
        return not (self.outside or self.scrolled or self.math_errors or self.error)

    def problems(self) -> list[str]:
        """One line per problem, naming the page."""
        lines = [f"{self.page}: {self.error}"] if self.error else []
        lines += [f"{self.page}: outside the content column: {d}" for d in self.outside]
        lines += [f"{self.page}: wider than its box (scrolls sideways): {d}" for d in self.scrolled]
        lines += [f"{self.page}: MathJax error: {e}" for e in self.math_errors]
        return lines


def find_chromium() -> str | None:
    """The Chromium (or Chrome) executable on PATH, or None."""
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if path := shutil.which(name):
            return path
    return None


def headless_command(chromium: str, profile: str | Path, *args: str) -> list[str]:
    """A headless Chromium command line that reaches no network of its own accord."""
    return [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--no-first-run", "--disable-sync", "--hide-scrollbars",
            f"--user-data-dir={profile}", *args]


def _probe_copy(page: Path) -> Path:
    html = page.read_text(encoding="utf-8")
    at = html.lower().rfind("</body>")
    html = html[:at] + _PROBE_JS + html[at:] if at >= 0 else html + _PROBE_JS
    copy = page.with_name(_PROBE_PREFIX + page.name)
    copy.write_text(html, encoding="utf-8")
    return copy


def check_page(chromium: str, page: Path, *, site: Path, width: int = 1280, screenshot: Path | None = None,
               max_height: int = 12000, budget_ms: int = 8000, timeout: float = 120.0) -> PageReport:
    """Load one page at ``width`` px, measure it and (optionally) screenshot the whole page.

    Args:
        chromium: the browser executable (:func:`find_chromium`).
        page: an HTML file of the built site.
        site: the site root (reports name pages relative to it).
        width: window width in CSS pixels.
        screenshot: PNG to write (None: no screenshot).
        max_height: the screenshot's height is the page's, capped here.
        budget_ms: Chromium's virtual-time budget per load (MathJax must finish within it).
        timeout: wall-clock limit per Chromium call, in seconds.
    """
    report = PageReport(page=page.relative_to(site).as_posix())
    copy = _probe_copy(page)
    try:
        with tempfile.TemporaryDirectory(prefix="gimp_chromium_") as profile:
            cmd = headless_command(chromium, profile, f"--window-size={width},900",
                                   f"--virtual-time-budget={budget_ms}", "--dump-dom", copy.as_uri())
            try:
                dom = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout).stdout
            except subprocess.TimeoutExpired:
                report.error = f"chromium did not finish within {timeout:.0f} s"
                return report
        match = re.search(r'<pre id="gimp-probe-result"[^>]*>(.*?)</pre>', dom, re.S)
        if match is None:
            report.error = "the measuring script did not run (no result in the page's DOM)"
            return report
        found = json.loads(match.group(1).replace("&lt;", "<").replace("&gt;", ">").replace("&quot;", '"')
                           .replace("&#39;", "'").replace("&amp;", "&"))
        report.column_width = int(found["column_width"])
        report.page_height = int(found["page_height"])
        report.outside, report.scrolled = list(found["outside"]), list(found["scrolled"])
        report.math_errors, report.formulas = list(found["math_errors"]), int(found["formulas"])
    finally:
        copy.unlink(missing_ok=True)
    if screenshot is not None:
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        height = max(600, min(max_height, report.page_height))
        with tempfile.TemporaryDirectory(prefix="gimp_chromium_") as profile:
            cmd = headless_command(chromium, profile, f"--window-size={width},{height}",
                                   f"--virtual-time-budget={budget_ms}", f"--screenshot={screenshot}", page.as_uri())
            try:
                subprocess.run(cmd, capture_output=True, timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        report.screenshot = screenshot if screenshot.is_file() else None
        if report.screenshot is None:
            report.error = "chromium wrote no screenshot"
    return report


def site_pages(site: Path) -> list[Path]:
    """Every page of a built book (no search page, redirects or temporary pages)."""
    skip = {"search.html", "py-modindex.html"}
    pages = []
    for p in sorted(Path(site).rglob("*.html")):
        if p.name in skip or p.name.startswith(_PROBE_PREFIX) or \
                any(part.startswith("_") for part in p.relative_to(site).parts[:-1]):
            continue
        if 'http-equiv="refresh"' in p.read_text(encoding="utf-8", errors="replace")[:2000].lower():
            continue  # the root index.html only redirects to the first page
        pages.append(p)
    return pages


def check_site(site: str | Path, *, out: str | Path | None = None, width: int = 1280, chromium: str | None = None,
               pages: Sequence[Path] | None = None) -> list[PageReport]:
    """Measure (and screenshot into ``out``) every page of a built book.

    Args:
        site: the built HTML folder (``_build/html``).
        out: folder for the screenshots, ``<page path with / as __>.png`` (None: none).
        width: window width in CSS pixels.
        chromium: the browser (None: :func:`find_chromium`).
        pages: a subset of the pages (default: :func:`site_pages`).

    Raises:
        FileNotFoundError: no Chromium on PATH, or no page under ``site``.
    """
    site = Path(site).resolve()  # file URIs need an absolute path
    chromium = chromium or find_chromium()
    if chromium is None:
        raise FileNotFoundError("no chromium on PATH (Debian: apt-get install chromium)")
    pages = list(pages) if pages is not None else site_pages(site)
    if not pages:
        raise FileNotFoundError(f"no HTML pages under {site}")
    reports = []
    for page in pages:
        shot = None
        if out is not None:
            shot = Path(out) / (page.relative_to(site).with_suffix("").as_posix().replace("/", "__") + ".png")
        reports.append(check_page(chromium, page, site=site, width=width, screenshot=shot))
    return reports


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m gimplib.book.render_check SITE [--out DIR] [--width PX]``."""
    parser = argparse.ArgumentParser(prog="python -m gimplib.book.render_check", description=__doc__.split("\n")[0])
    parser.add_argument("site", type=Path, help="the built book (_build/html)")
    parser.add_argument("--out", type=Path, default=None, help="folder for full-page screenshots")
    parser.add_argument("--width", type=int, default=1280, help="window width in CSS pixels (1280)")
    args = parser.parse_args(argv)
    try:
        reports = check_site(args.site, out=args.out, width=args.width)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for r in reports:
        print(f"{'ok  ' if r.ok else 'FAIL'} {r.page} (column {r.column_width} px, {r.formulas} formulas)")
        for line in r.problems():
            print(f"     {line}")
    return 0 if all(r.ok for r in reports) else 1


if __name__ == "__main__":
    raise SystemExit(main())
