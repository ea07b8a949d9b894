"""The documentation site (docs/conf.py) builds strictly and works in a browser.

The site is built once, as CI builds it (`sphinx -W --keep-going -n`: a warning, a broken link or an
unresolved reference fails it), served on the loopback address, and read in headless Chromium through Selenium:
the landing page, the generated reference's equations as MathJax typesets them (from the site's own copy of
MathJax: the site is read offline), every figure of every page, and links between pages. The browser tests skip
only where no Chromium or chromedriver is installed (Debian: `apt-get install chromium chromium-driver`).
"""

from __future__ import annotations

import functools
import http.server
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, List

import pytest

import unroll

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
BUILD_TIMEOUT_S = 180
MATHJAX_TIMEOUT_S = 30
IMAGE = re.compile(r"!\[[^\]]*\]\(([^)\s]+)")
LINK = re.compile(r"\]\(([^)\s]+)\)")
REPOSITORY_FILES = "https://github.com/unroll-dev/unroll/blob/main/"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The site, built strictly into a temporary folder."""
    for module in ("sphinx", "myst_parser", "furo"):
        pytest.importorskip(module, reason="building the site needs the docs extra: pip install -e '.[docs]'")
    out = tmp_path_factory.mktemp("site")
    build = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-n", "-q", "-b", "html", str(DOCS), str(out)],
        capture_output=True, text=True, timeout=BUILD_TIMEOUT_S, cwd=ROOT,
    )
    assert build.returncode == 0, f"the strict docs build failed:\n{build.stdout}\n{build.stderr}"
    return out


def test_reference_documents_every_public_name(site: Path) -> None:
    from sphinx.util.inventory import InventoryFile

    with open(site / "objects.inv", "rb") as stream:
        inventory = InventoryFile.load(stream, "", lambda base, uri: uri)
    documented = {name for kind, objects in inventory.items() if kind.startswith("py:") for name in objects}
    public = {f"unroll.{name}" for name in unroll.__all__}
    public |= {f"unroll.distributed.{name}" for name in unroll.distributed.__all__}
    assert public - documented == set(), "docs/reference.md lacks these names"
    pages = {item.uri.partition("#")[0] for objects in inventory.values() for name, item in objects.items()
             if name in public}
    assert pages == {"reference.html"}


def test_every_page_is_built_and_the_folder_opens_the_index(site: Path) -> None:
    pages = {page.relative_to(DOCS).with_suffix(".html") for page in DOCS.rglob("*.md")}
    assert pages and all((site / page).is_file() for page in pages)
    assert (site / "index.html").read_text(encoding="utf-8").count('url=README.html"') == 1


def test_links_out_of_docs_are_repository_links_to_files_of_this_checkout() -> None:
    """The site serves docs/ only: a page links to the rest of the repository by its address, and the file must
    exist (the build does not check addresses)."""
    repository_links = 0
    for page in DOCS.rglob("*.md"):
        for target in LINK.findall(page.read_text(encoding="utf-8")):
            if target.startswith(REPOSITORY_FILES):
                repository_links += 1
                path = target[len(REPOSITORY_FILES):].partition("#")[0]
                assert (ROOT / path).is_file(), f"{page.name} links to {target}: no such file in this checkout"
            elif "://" not in target and not target.startswith(("#", "mailto:")):
                path = (page.parent / target.partition("#")[0]).resolve()
                assert DOCS in path.parents, f"{page.name} links to {target}, outside docs/: the site lacks it"
    assert repository_links >= 10


# --- in a browser ---------------------------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
CHROMEDRIVER = shutil.which("chromedriver")
needs_browser = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="no headless Chromium and chromedriver on this machine (Debian: apt-get install chromium chromium-driver)",
)


@pytest.fixture(scope="module")
def served(site: Path) -> Iterator[str]:
    """The site's address on the loopback interface, as a web server would serve it."""
    handler = functools.partial(QuietHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    webdriver = pytest.importorskip("selenium.webdriver", reason="the browser tests need selenium (docs extra)")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1280,1024"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=str(CHROMEDRIVER)))
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def open_page(driver: Any, url: str) -> List[str]:
    """Load ``url`` and return the browser's errors on the way (failed loads, script errors); the favicon that
    the site does not have is no error."""
    driver.get_log("browser")  # drop what earlier pages logged
    driver.get(url)
    return [entry["message"] for entry in driver.get_log("browser")
            if entry["level"] == "SEVERE" and "favicon.ico" not in entry["message"]]


def wait_for(condition: Callable[[], Any], timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}"
        time.sleep(0.1)


@needs_browser
def test_landing_page_loads_with_its_title(browser: Any, served: str) -> None:
    errors = open_page(browser, served)  # the folder: index.html sends the browser to the index
    wait_for(lambda: browser.current_url.endswith("/README.html"), 10, "the redirect to README.html")
    assert errors == []
    assert browser.title == f"unroll {unroll.__version__}"  # the theme titles the landing page with the site's name
    heading = browser.find_element("css selector", "article h1")
    assert heading.text.strip().rstrip("#¶ ").strip() == "Documentation index"


@needs_browser
def test_reference_maths_is_typeset_by_the_local_mathjax(browser: Any, served: str, site: Path) -> None:
    # The formulas Sphinx wrote: TeX between \( \) or \[ \], for MathJax to typeset in the browser.
    formulas = (site / "reference.html").read_text(encoding="utf-8").count('class="math notranslate nohighlight"')
    assert formulas >= 50  # the docstrings' :math: roles and math directives
    errors = open_page(browser, served + "reference.html")
    scripts = browser.execute_script(
        "return Array.from(document.scripts, s => s.src.split('?')[0]).filter(s => /mathjax/i.test(s))")
    assert served + "_static/mathjax/tex-chtml.js" in scripts
    assert all(src.startswith(served + "_static/mathjax/") for src in scripts), f"MathJax from elsewhere: {scripts}"
    wait_for(lambda: browser.execute_script(
        "return window.MathJax && MathJax.startup && MathJax.startup.promise"
        " && document.querySelectorAll('mjx-container').length"), MATHJAX_TIMEOUT_S, "MathJax's first formula")
    browser.execute_async_script("MathJax.startup.promise.then(arguments[arguments.length - 1])")
    typeset = browser.execute_script(
        "return Array.from(document.querySelectorAll('.math'), m => m.querySelectorAll('mjx-container').length)")
    assert typeset == [1] * formulas, "every formula typeset once"
    assert browser.execute_script("return document.querySelectorAll('mjx-merror').length") == 0, "a TeX error"
    # No TeX source is left on the page: the docstrings have no backslash outside their maths.
    assert "\\" not in browser.execute_script("return document.querySelector('article').innerText")
    # unrolled_params' update rule, a displayed equation, is laid out as maths: a block of some height.
    entry = browser.find_element("id", "unroll.unrolled_params").find_element("xpath", "..")
    assert entry.find_element("css selector", "div.math mjx-container").size["height"] > 10
    assert errors == []


@needs_browser
def test_every_figure_of_every_page_loads(browser: Any, served: str) -> None:
    pages = {page: len(IMAGE.findall(page.read_text(encoding="utf-8"))) for page in sorted(DOCS.rglob("*.md"))}
    shown = {page: count for page, count in pages.items() if count}
    assert any("results" in page.parts for page in shown), "no results page shows a figure"
    for page, count in shown.items():
        errors = open_page(browser, served + page.relative_to(DOCS).with_suffix(".html").as_posix())
        loaded = browser.execute_script(
            "return Array.from(document.querySelectorAll('article img'),"
            " img => img.complete && img.naturalWidth > 0 && img.getAttribute('src'))")
        assert len(loaded) == count and all(loaded), f"{page.name}: figures {loaded}, expected {count} loaded"
        assert errors == [], page.name


@needs_browser
def test_internal_links_lead_to_pages_that_load(browser: Any, served: str) -> None:
    open_page(browser, served + "README.html")
    follow(browser, "api.html")
    wait_for(lambda: browser.current_url == served + "api.html", 10, "api.html")
    assert browser.title.startswith("API reference")
    # The guide links to the generated reference, and a link into another page lands on its heading.
    follow(browser, "reference.html")
    wait_for(lambda: browser.current_url == served + "reference.html", 10, "reference.html")
    assert browser.title.startswith("API reference (generated)")
    errors = open_page(browser, served + "reproducibility.html")
    follow(browser, "results/mixture.html#the-main-job")
    wait_for(lambda: browser.current_url == served + "results/mixture.html#the-main-job", 10, "results/mixture.html")
    heading = browser.find_element("css selector", "#the-main-job > h2")  # docutils puts the id on the section
    assert heading.text.strip().rstrip("#¶ ").strip() == "The main job"
    assert heading.location["y"] > 1000  # far down the page, so the browser went to the heading, not the top
    assert errors == []


def follow(driver: Any, href: str) -> None:
    """Click the first link of the page's text to ``href``, as a reader would: scrolled into view first (at once:
    the theme scrolls smoothly, and a click during the scroll lands elsewhere)."""
    link = driver.find_element("css selector", f"article a[href='{href}']")
    driver.execute_script("arguments[0].scrollIntoView({block: 'center', behavior: 'instant'})", link)
    link.click()
