"""The HTML report (issue 16, items 3 and 4).

Unit tests build journals with the journal's own writer (synthetic tasks and attempts):
size for 10,000 attempts, escaping of hostile task data, stderr files read only inside
the run directory and cut to the page's budget, no reference to anything outside the
page. The browser test renders the report of a real mixed run in headless Chromium."""

from __future__ import annotations

import ast
import base64
import contextlib
import hashlib
import html.parser
import json
import os
import re
import shutil
import signal
import struct
import sys
import time
import zlib
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import pilotfish
import pilotfish.digest
from pilotfish.errors import Category, FailureRecord
from pilotfish.store.journal import Journal
from pilotfish.store.reader import JournalReader
from pilotfish.tools import cli, report, report_parts

HOSTILE_KEY = "<script>window.pwned=1</script>&amp;\x1b[31m"
HOSTILE_SHOWN = "<script>window.pwned=1</script>&amp;\\x1b[31m"  # as text, the escape visible
HOSTILE_MSG = '<img src=x onerror="window.pwned=2"> </pre></details></script><!-- & "'


# --------------------------------------------------------------------------- helpers


class _Options:
    def to_dict(self) -> dict[str, Any]:
        return {"retries": 0}


_OPTS = _Options()


def _task(key: str, deps: tuple[str, ...] = ()) -> SimpleNamespace:
    return SimpleNamespace(
        key=key,
        name=key.split("-")[0],
        _kind="call",
        _output_of=None,
        _deps=[SimpleNamespace(key=d) for d in deps],
        options=_OPTS,
    )


def _attempt(
    number: int, worker: str, start: float, end: float, outcome: str, failure: Any = None
) -> SimpleNamespace:
    return SimpleNamespace(
        number=number,
        id=number,
        dispatched=start,
        worker=worker,
        host="node1",
        pid=1000 + int(worker[1:]),
        started=start,
        ended=end,
        outcome=outcome,
        failure=failure,
    )


def _write(
    journal: Journal,
    key: str,
    state: str,
    attempts: list[Any],
    failure: Any = None,
    deps: tuple[str, ...] = (),
) -> None:
    t0 = attempts[0].started if attempts else 0.0
    journal.record(
        _task(key, deps),
        state,
        [(t0, "PENDING", "READY"), (t0, "READY", "RUNNING"), (t0 + 1, "RUNNING", state)],
        attempts,
        failure,
        b"\x80\x04K\x01." if state == "DONE" else None,
    )


def _page_of(rundir: Path) -> str:
    reader = JournalReader(rundir / "journal.db")
    try:
        return report.build_report(reader)
    finally:
        reader.close()


class _Tags(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))


def _tags(page: str) -> list[tuple[str, dict[str, str | None]]]:
    p = _Tags()
    p.feed(page)
    return p.tags


# --------------------------------------------------------------------------- unit


@pytest.mark.timeout(120)
def test_10000_attempts_stay_under_5_mb(tmp_path: Path) -> None:
    """A 10,000-task run (10,600 attempts on 64 workers: successes, 1,500 user errors with
    long tracebacks, 300 lost workers, 500 dependency failures) makes a page under 5 MB,
    with every lane and bar in its data and the failed tasks listed up to ROWS_MAX."""
    rundir = tmp_path / "run"
    journal = Journal(rundir / "journal.db")
    t0 = 1_700_000_000.0
    tb = "Traceback (most recent call last):\n" + '  File "sim.py", line 9, in f\n' * 400
    for i in range(10_000):
        w = f"w{i % 64 + 1}"
        start = t0 + i * 0.05
        key = f"member-{i:05d}"
        if i % 20 == 3:  # 500 dependency failures: no attempt
            root = f"member-{i - 1:05d}"
            f = FailureRecord(
                key,
                Category.DEPENDENCY_FAILED,
                f"task {key!r} did not run",
                upstream=root,
                root=root,
            )
            _write(journal, key, "FAILED", [], f, deps=(root,))
        elif i % 20 in (2, 5, 8):  # 1,500 user errors
            word = "".join(chr(97 + int(d)) for d in str(i))  # 1,500 distinct signatures
            f = FailureRecord(
                key,
                Category.USER_ERROR,
                f"ValueError: {word} diverged " + "x" * 200,
                exc_type="ValueError",
                traceback=tb + f"ValueError: seed {i}\n",
            )
            _write(journal, key, "FAILED", [_attempt(1, w, start, start + 0.5, "user_error", f)], f)
        elif i % 20 == 7 and i % 40 == 7:  # 250 lost then retried: two attempts
            lost = FailureRecord(
                key,
                Category.WORKER_LOST,
                f"worker {w} was killed by signal SIGKILL (-9)",
                returncode=-9,
                signal="SIGKILL",
                worker=w,
            )
            a1 = _attempt(1, w, start, start + 0.2, "worker_lost", lost)
            a2 = _attempt(2, f"w{65 + i % 7}", start + 0.3, start + 0.9, "done")
            _write(journal, key, "DONE", [a1, a2])
        else:
            _write(journal, key, "DONE", [_attempt(1, w, start, start + 0.8, "done")])
    journal.close()
    t = time.perf_counter()
    page = _page_of(rundir)
    took = time.perf_counter() - t
    size = len(page.encode())
    assert size < 5 * 1024 * 1024, f"{size / 1e6:.1f} MB"
    data = json.loads(
        re.search(r'<script type="application/json" id="pf-data">(.*?)</script>', page, re.S).group(
            1
        )
    )  # type: ignore[union-attr]
    assert len(data["bars"]) == 9_500 + 250  # every started attempt is a bar
    assert len(data["lanes"]) == 71
    assert len(data["markers"]) == 250  # each loss marks its lane
    rows = page.count('<details class="failure"')
    assert rows == min(report.ROWS_MAX, 2_000)
    assert "more failed task(s) are not listed" not in page
    assert "smaller group(s)" in page  # 1,502 groups: the largest GROUPS_MAX are listed
    assert took < 60, took


@pytest.mark.timeout(60)
def test_hostile_strings_are_text(tmp_path: Path) -> None:
    """A key like ``<script>...</script>``, a message that closes tags, and stderr full of
    markup render as text: no element or attribute comes from task data, and the JSON
    data block cannot be closed by a key."""
    rundir = tmp_path / "run"
    journal = Journal(rundir / "journal.db")
    sandbox = rundir / "sandboxes" / "evil"
    sandbox.mkdir(parents=True)
    (sandbox / "stderr.txt").write_text("<script>window.pwned=3</script>\n" + HOSTILE_MSG + "\n")
    f = FailureRecord(
        HOSTILE_KEY,
        Category.COMMAND_FAILED,
        HOSTILE_MSG,
        returncode=1,
        stderr_path=str(sandbox / "stderr.txt"),
        worker="w1",
    )
    t0 = 1_700_000_000.0
    _write(journal, HOSTILE_KEY, "FAILED", [_attempt(1, "w1", t0, t0 + 1, "command_failed", f)], f)
    dep = FailureRecord(
        "down", Category.DEPENDENCY_FAILED, "did not run", upstream=HOSTILE_KEY, root=HOSTILE_KEY
    )
    _write(journal, "down", "FAILED", [], dep, deps=(HOSTILE_KEY,))
    journal.close()
    page = _page_of(rundir)
    tags = _tags(page)
    assert [t for t, _a in tags if t == "script"] == ["script", "script"]  # data + ours
    assert not [t for t, _a in tags if t == "img"]
    assert not any(k.startswith("on") for _t, attrs in tags for k in attrs)
    assert "&lt;script&gt;window.pwned=1&lt;/script&gt;&amp;amp;\\x1b[31m" in page
    assert "&lt;img src=x onerror=&quot;window.pwned=2&quot;&gt;" in page
    assert "&lt;script&gt;window.pwned=3&lt;/script&gt;" in page  # the stderr file
    block = re.search(r'id="pf-data">(.*?)</script>', page, re.S).group(1)  # type: ignore[union-attr]
    assert "<" not in block and ">" not in block
    assert list(json.loads(block)["keys"].values()) == [
        "<script>window.pwned=1</script>&amp;\\x1b[31m"
    ]
    assert "\x1b" not in page
    assert "root of <b>1</b> dependency failure(s)" in page


def test_only_inline_content_and_a_strict_policy(tmp_path: Path) -> None:
    """No src/href to anything but the page itself, and a Content-Security-Policy that
    forbids every request, allowing only the page's own script (by its hash)."""
    rundir = tmp_path / "run"
    journal = Journal(rundir / "journal.db")
    t0 = 1_700_000_000.0
    _write(journal, "a", "DONE", [_attempt(1, "w1", t0, t0 + 1, "done")])
    journal.close()
    page = _page_of(rundir)
    for tag, attrs in _tags(page):
        for name in ("src", "href", "action", "data", "poster"):
            value = attrs.get(name)
            if value is not None:
                assert value.startswith(("#", "data:")), (tag, name, value)
        assert tag not in ("iframe", "object", "embed", "img", "video", "audio")
    csp = re.search(r'http-equiv="Content-Security-Policy" content="([^"]+)"', page).group(1)  # type: ignore[union-attr]
    assert "default-src 'none'" in csp
    script = re.search(r"<script>(.*?)</script>", page, re.S).group(1)  # type: ignore[union-attr]
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    assert f"script-src 'sha256-{digest}'" in csp
    assert not re.search(r"@import|url\(\s*['\"]?(?!data:)", page)


def test_stderr_read_only_inside_the_run_directory(tmp_path: Path) -> None:
    """A journal naming a file outside its run directory (a private key, by a malicious
    or moved journal) never gets it into the page; a symlink out is refused too."""
    rundir = tmp_path / "run"
    journal = Journal(rundir / "journal.db")
    secret = tmp_path / "id_rsa"
    secret.write_text("-----BEGIN SECRET KEY-----\n")
    (rundir / "sandboxes").mkdir()
    link = rundir / "sandboxes" / "stderr.txt"
    link.symlink_to(secret)
    t0 = 1_700_000_000.0
    for key, path in (("direct", secret), ("link", link)):
        f = FailureRecord(key, Category.COMMAND_FAILED, "boom", returncode=1, stderr_path=str(path))
        _write(journal, key, "FAILED", [_attempt(1, "w1", t0, t0 + 1, "command_failed", f)], f)
    journal.close()
    page = _page_of(rundir)
    assert "BEGIN SECRET" not in page
    assert page.count("not read: it is outside the run directory") == 2


def test_large_stderr_cut_with_the_path(tmp_path: Path) -> None:
    """A 3 MB stderr file is shown by its last PIECE_MAX bytes at most, from a whole
    line, with its size and where the whole file is; a moved run directory still finds
    it below sandboxes/."""
    rundir = tmp_path / "run"
    journal = Journal(rundir / "journal.db")
    sandbox = rundir / "sandboxes" / "big-1"
    sandbox.mkdir(parents=True)
    lines = [f"line {i:07d} " + "y" * 100 for i in range(30_000)]
    (sandbox / "stderr.txt").write_text("\n".join(lines) + "\nTHE END\n")
    recorded = "/somewhere/else/run/sandboxes/big-1/stderr.txt"  # the run directory moved
    f = FailureRecord("big", Category.COMMAND_FAILED, "exit 3", returncode=3, stderr_path=recorded)
    t0 = 1_700_000_000.0
    _write(journal, "big", "FAILED", [_attempt(1, "w1", t0, t0 + 1, "command_failed", f)], f)
    journal.close()
    page = _page_of(rundir)
    assert "THE END" in page and "line 0000000" not in page
    size = (sandbox / "stderr.txt").stat().st_size
    assert f"the last 256 KiB of {size / 1024:,.0f} KiB; the whole file: {recorded}" in page
    assert len(page) < report.PIECE_MAX + 100_000


def test_empty_and_unfinished_runs(tmp_path: Path) -> None:
    """A journal with no task, and one whose run was cut short (an attempt still
    running, a task never started), still make a page."""
    rundir = tmp_path / "run"
    Journal(rundir / "journal.db").close()
    page = _page_of(rundir)
    assert "0 tasks, 0 failed" in page and "No failed tasks." in page
    journal = Journal(rundir / "journal.db")
    t0 = time.time() - 5
    running = _attempt(1, "w1", t0, t0, "done")
    running.ended, running.outcome = None, None
    _write(journal, "running", "RUNNING", [running])
    journal.record(_task("queued"), "READY", [], [], None, None)
    journal.flush()  # the run is not closed, as after a SIGKILL of the client
    page = _page_of(rundir)
    data = json.loads(re.search(r'id="pf-data">(.*?)</script>', page, re.S).group(1))  # type: ignore[union-attr]
    (bar,) = data["bars"]
    assert data["outcomes"][bar[3]]["id"] == "running" and bar[2] >= 4000
    assert "run 2 (running): started" in page and "not closed" in page
    journal.close()


def test_outcomes_never_by_colour_alone() -> None:
    """Every outcome a bar can have differs from every other by its pattern or marker
    shape and has a text label (the legend), so readers who cannot tell the colours apart
    can tell the outcomes apart; the failure categories the issue names all have one.
    Every shape is drawn by the stylesheet (not by a character of some font)."""
    outcomes = report.OUTCOMES
    assert {c.value for c in Category} - {"invalid_task"} <= set(outcomes)
    looks = [(pattern, shape) for _label, _colour, pattern, shape in outcomes.values()]
    assert len(set(looks)) == len(looks)
    assert len({shape for *_rest, shape in outcomes.values()}) == len(outcomes)
    assert all(label for label, *_rest in outcomes.values())
    css = report._STYLE
    for *_rest, shape in outcomes.values():
        assert re.fullmatch(r"[a-z-]+", shape) and f".mk-{shape}::before" in css, shape


def _imports(module: Any) -> tuple[set[str], set[str]]:
    """What ``module`` imports: (from pilotfish, from elsewhere)."""
    tree = ast.parse(Path(module.__file__).read_text())
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            imported.add(("." * node.level) + (node.module or ""))
        elif isinstance(node, ast.Import):
            imported.update(a.name for a in node.names)
    ours = {m for m in imported if m.startswith((".", "pilotfish"))}
    return ours, imported - ours


def test_report_imports_only_the_journal_and_the_digest() -> None:
    """The report is a reader of the journal: it imports nothing from the runtime."""
    ours, others = _imports(report)
    # runtime.files: the one rule for reading a task's files (standard library only);
    # store.rundir: what the run directory keeps; store.schema: the journal's errors;
    # report_parts: what each part of the page looks like
    assert ours == {
        "..digest",
        "..store.reader",
        "..store.schema",
        "..runtime.files",
        "..store.rundir",
        ".report_parts",
    }
    assert all(m.split(".")[0] in sys.stdlib_module_names for m in others), others
    ours, others = _imports(report_parts)
    assert ours == {"..digest", "..runtime.files"}
    assert all(m.split(".")[0] in sys.stdlib_module_names for m in others), others
    digest_src = Path(pilotfish.digest.__file__).read_text()
    files_src = Path(report.__file__).parents[1].joinpath("runtime", "files.py").read_text()
    assert not re.search(r"^\s*(from \.|import pilotfish|from pilotfish)", files_src, re.M)
    assert not re.search(r"^\s*(from \.|import pilotfish|from pilotfish)", digest_src, re.M)


# --------------------------------------------------------------------------- browser


def user_error(seed: int) -> float:
    raise ValueError(f"seed {seed}: unstable parameters")


def kill_my_worker() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def ok(x: int) -> int:
    time.sleep(0.05)
    return x


STDERR_LINES = 400


def _chromium() -> tuple[str, str] | None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


@contextlib.contextmanager
def _browser(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: str = "1300,1000") -> Any:
    """Headless Chromium (skips the test if it or chromedriver is missing), logging the
    page's requests and console; closed at the end."""
    found = _chromium()
    if found is None:
        pytest.skip(
            "chromium and chromedriver are not on PATH (apt-get install chromium chromium-driver)"
        )
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    from selenium.webdriver.chrome.service import Service

    browser, driver_path = found
    monkeypatch.setenv("SE_OFFLINE", "true")  # selenium must not look for drivers online
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        f"--window-size={size}",
        "--force-device-scale-factor=1",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    try:
        driver.set_page_load_timeout(30)
        driver.set_script_timeout(30)
        yield driver
    finally:
        driver.quit()


def _open_report(driver: Any, rundir: Path, out: Path) -> None:
    """Write the report of ``rundir`` as the user does and open it."""
    assert cli.main(["--rundir", str(rundir), "report", "--html", "--out", str(out)]) == 0
    driver.get(out.resolve().as_uri())
    assert driver.execute_script("return document.readyState") == "complete"


def _script_errors(driver: Any) -> list[Any]:
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def _pixels(png: bytes) -> list[list[tuple[int, int, int]]]:
    """The RGB pixels of an 8-bit RGB or RGBA PNG (what Chromium's screenshots are)."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, head = 8, b"", b""
    while pos < len(png):
        (n,) = struct.unpack(">I", png[pos : pos + 4])
        kind, body = png[pos + 4 : pos + 8], png[pos + 8 : pos + 8 + n]
        pos += 12 + n
        if kind == b"IHDR":
            head = body
        elif kind == b"IDAT":
            idat += body
    width, height, depth, colour = struct.unpack(">IIBB", head[:10])
    assert depth == 8 and colour in (2, 6), (depth, colour)
    bpp = 3 if colour == 2 else 4
    raw, stride = zlib.decompress(idat), width * bpp
    rows: list[list[tuple[int, int, int]]] = []
    prev = bytearray(stride)
    for y in range(height):
        f, line = (
            raw[y * (stride + 1)],
            bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)]),
        )
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b, c = prev[i], (prev[i - bpp] if i >= bpp else 0)
            if f == 1:
                line[i] = (line[i] + a) & 255
            elif f == 2:
                line[i] = (line[i] + b) & 255
            elif f == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append([tuple(line[i : i + 3]) for i in range(0, stride, bpp)])  # type: ignore[misc]
        prev = line
    return rows


#: characters of the page's text (its elements' text, ::before/::after content, titles)
#: that the browser draws as its missing-glyph box: each is drawn on a canvas in the font
#: of the element that shows it and compared with a private-use character no font has
_MISSING_GLYPHS_JS = """
const seen = new Map();
function add(text, font) {
  for (const ch of text || "") {
    if (ch.codePointAt(0) < 128) continue;
    seen.set(font + "\u0000" + ch, [font, ch]);
  }
}
for (const el of document.querySelectorAll("body, body *")) {
  const cs = getComputedStyle(el);
  for (const n of el.childNodes) if (n.nodeType === 3) add(n.textContent, cs.font);
  add(el.getAttribute("title"), cs.font);
  for (const p of ["::before", "::after"]) {
    const ps = getComputedStyle(el, p), c = ps.content;
    if (c && c !== "none" && c !== "normal") add(c.replace(/^"|"$/g, ""), ps.font);
  }
}
const canvas = document.createElement("canvas");
canvas.width = 64; canvas.height = 64;
const g = canvas.getContext("2d", {willReadFrequently: true});
function ink(ch, font) {
  g.clearRect(0, 0, 64, 64); g.font = font; g.fillStyle = "#000"; g.textBaseline = "top";
  g.fillText(ch, 8, 8);
  return Array.from(g.getImageData(0, 0, 64, 64).data).join(",");
}
const bad = [];
for (const [font, ch] of seen.values()) {
  if (ink(ch, font) === ink("\ue000", font)) bad.push([ch, font]);
}
return [seen.size, bad];
"""


@pytest.mark.timeout(120)
def test_report_in_a_real_browser(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The report of a mixed run (successes, a user exception whose key is a <script>
    tag, a command failure with 400 lines of stderr, a worker SIGKILLed, a dependency
    failure) in headless Chromium: lanes, the lost-worker marker and the failure rows are
    in the DOM; clicking the command's row shows its whole stderr; the hostile key is
    text; no script error; and the page made no network request."""
    rundir = tmp_path / "run"
    script = (
        f"import sys\nfor i in range(1, {STDERR_LINES + 1}):\n"
        f"    print(f'stderr line {{i}} of {STDERR_LINES}', file=sys.stderr)\n"
        "print('FATAL: broken input', file=sys.stderr)\nsys.exit(3)\n"
    )
    with pilotfish.Session(
        workers=2, rundir=str(rundir), backoff=pilotfish.Backoff(base=0.01)
    ) as s:
        lost = s.submit(pilotfish.task(kill_my_worker, retries=0))
        fine = [s.submit(ok, i) for i in range(8)]
        bad = s.submit(pilotfish.task(user_error, key=HOSTILE_KEY, retries=0), 13)
        cmd = s.executable([sys.executable, "-c", script], key="long-stderr", retries=0)
        down = s.submit(sum, [bad, fine[0]])
        pilotfish.wait([lost, *fine, bad, cmd, down], timeout=60)
    states = {t.key: t.state.name for t in (lost, bad, cmd, down)}
    assert set(states.values()) == {"FAILED"}, states
    assert lost.failure is not None and lost.failure.category is Category.WORKER_LOST

    out = tmp_path / "report.html"
    url = out.resolve().as_uri()
    with _browser(tmp_path, monkeypatch) as driver:
        from selenium.webdriver.common.by import By

        _open_report(driver, rundir, out)
        lanes = driver.find_elements(By.CSS_SELECTOR, "#labels .lane")
        workers = {e.get_attribute("data-worker") for e in lanes}
        assert len(lanes) >= 2 and lost.failure.worker in workers, workers
        painted = driver.execute_script(  # the bars are drawn: coloured pixels on the canvas
            "const c = document.getElementById('tl-canvas');"
            "const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
            "let n = 0; for (let i = 0; i < d.length; i += 4)"
            "  if (d[i + 3] && Math.max(d[i], d[i + 1], d[i + 2]) - Math.min(d[i], d[i + 1],"
            "      d[i + 2]) > 60) n++;"
            "return n;"
        )
        assert painted > 500, painted
        markers = driver.find_elements(By.CSS_SELECTOR, ".tl-marker.worker_lost")
        assert len(markers) == 1
        assert f"{lost.failure.worker} lost: signal SIGKILL" in markers[0].text
        assert markers[0].is_displayed()
        rows = {
            e.get_attribute("data-key"): e
            for e in driver.find_elements(By.CSS_SELECTOR, "details.failure")
        }
        assert set(rows) == {lost.key, HOSTILE_SHOWN, cmd.key, down.key}
        hostile = rows[HOSTILE_SHOWN].find_element(By.CSS_SELECTOR, "summary .k")
        assert hostile.text == HOSTILE_SHOWN
        assert driver.execute_script("return window.pwned === undefined")
        assert "root of 1 dependency failure(s)" in rows[HOSTILE_SHOWN].get_attribute("textContent")

        row = rows["long-stderr"]
        stderr = row.find_element(By.CSS_SELECTOR, "pre.stderr")
        assert not stderr.is_displayed()
        row.find_element(By.TAG_NAME, "summary").click()
        assert row.get_attribute("open") is not None and stderr.is_displayed()
        text = stderr.get_attribute("textContent")
        lines = text.splitlines()
        assert lines[0] == f"stderr line 1 of {STDERR_LINES}"
        assert lines[-1] == "FATAL: broken input" and len(lines) == STDERR_LINES + 1
        assert "complete (" in row.text

        dep = rows[down.key]
        dep.find_element(By.TAG_NAME, "summary").click()
        assert "the failure began in the root task" in dep.text and HOSTILE_SHOWN in dep.text
        assert "which took 1 task(s) with it" in dep.text

        assert _script_errors(driver) == []
        requests = []
        for entry in driver.get_log("performance"):
            message = json.loads(entry["message"])["message"]
            if message["method"] == "Network.requestWillBeSent":
                requests.append(message["params"]["request"]["url"])
        assert url in requests
        # what came after the page itself: only the page (and inline data: URLs)
        after = requests[requests.index(url) :]
        assert all(u == url or u.startswith("data:") for u in after), after
        assert not [u for u in requests if re.match(r"(?i)(https?|wss?|ftp):", u)], requests


# outcomes an attempt can end with, and the failure it records (None: no failure)
_ATTEMPT_OUTCOMES: dict[str, tuple[Category | None, str]] = {
    "done": (None, ""),
    "user_error": (Category.USER_ERROR, "ValueError: diverged"),
    "command_failed": (Category.COMMAND_FAILED, "program 'gmx' exited with code 1"),
    "missing_output": (Category.MISSING_OUTPUT, "declared output md.gro is missing"),
    "timeout": (Category.TIMEOUT, "program 'gmx' was killed at its timeout of 2 s"),
    "worker_lost": (Category.WORKER_LOST, "worker w6 was killed by signal SIGKILL (-9)"),
    "runtime_lost": (Category.RUNTIME_LOST, "the master stopped answering"),
    "environment": (Category.ENVIRONMENT, "program 'gmx' is not installed"),
    "cancelled": (Category.CANCELLED, "cancelled"),
    "running": (None, ""),
}


def _every_outcome(rundir: Path) -> dict[str, str]:
    """A journal with one task per attempt outcome, each on its own worker, and a
    dependency failure of the user error; returns outcome -> task key."""
    journal = Journal(rundir / "journal.db")
    t0 = time.time() - 100
    keys: dict[str, str] = {}
    for i, (outcome, (cat, msg)) in enumerate(_ATTEMPT_OUTCOMES.items()):
        key = f"{outcome}-task"
        w = f"w{i + 1}"
        f = None
        if cat is not None:
            f = FailureRecord(
                key,
                cat,
                msg,
                worker=w,
                returncode=-9 if cat.value == "worker_lost" else None,
                signal="SIGKILL" if cat.value == "worker_lost" else None,
            )
        a = _attempt(1, w, t0 + i, t0 + i + 5, outcome, f)
        state = {"done": "DONE", "running": "RUNNING", "cancelled": "CANCELLED"}.get(
            outcome, "FAILED"
        )
        if outcome == "running":
            a.ended, a.outcome = None, None
        _write(journal, key, state, [a], f if state == "FAILED" else None)
        keys[outcome] = key
    dep = FailureRecord(
        "after-user-error",
        Category.DEPENDENCY_FAILED,
        "did not run",
        upstream="user_error-task",
        root="user_error-task",
    )
    _write(journal, "after-user-error", "FAILED", [], dep, deps=("user_error-task",))
    journal.close()
    return keys


@pytest.mark.timeout(120)
def test_each_outcome_has_its_own_marker_in_a_browser(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 25 item 9: every attempt outcome has its own legend entry whose marker looks
    different from every other's (compared as rendered pixels); a program timeout is
    marked on its lane with the timeout marker, not the lost-worker one; every marker is a
    drawn shape; and no character of the page renders as the missing-glyph box in
    headless Chromium's own fonts."""
    rundir = tmp_path / "run"
    _every_outcome(rundir)
    with _browser(tmp_path, monkeypatch) as driver:
        from selenium.webdriver.common.by import By

        _open_report(driver, rundir, tmp_path / "report.html")
        items = {
            e.get_attribute("data-outcome"): e
            for e in driver.find_elements(By.CSS_SELECTOR, ".legend .legend-item")
        }
        assert set(_ATTEMPT_OUTCOMES) <= set(items), sorted(items)
        looks: dict[str, tuple[tuple[int, int, int], ...]] = {}
        for outcome, item in items.items():
            (mk,) = item.find_elements(By.CSS_SELECTOR, ".mk")
            assert mk.size["width"] >= 8 and mk.size["height"] >= 8, (outcome, mk.size)
            assert mk.text == ""  # a shape, not a character
            pixels = tuple(p for row in _pixels(mk.screenshot_as_png) for p in row)
            dark = sum(1 for p in pixels if sum(p) < 3 * 128)
            assert dark >= 6, (outcome, dark)  # something is drawn
            looks[outcome] = pixels
            assert report.OUTCOMES[outcome][0] in item.text
        same = [(a, b) for a in looks for b in looks if a < b and looks[a] == looks[b]]
        assert same == [], same

        # the timeout's lane ends with the timeout marker, the lost worker's with its own
        def marker_class(kind: str) -> str:
            (m,) = driver.find_elements(By.CSS_SELECTOR, f".tl-marker.{kind}")
            assert m.is_displayed()
            return str(m.find_element(By.CSS_SELECTOR, ".mk").get_attribute("class"))

        timeout_mk, lost_mk = marker_class("timeout"), marker_class("worker_lost")
        assert timeout_mk != lost_mk
        assert timeout_mk == items["timeout"].find_element(By.CSS_SELECTOR, ".mk").get_attribute(
            "class"
        )
        assert lost_mk == items["worker_lost"].find_element(By.CSS_SELECTOR, ".mk").get_attribute(
            "class"
        )
        assert "timeout" in driver.find_element(By.CSS_SELECTOR, ".tl-marker.timeout").text
        # the failed-tasks table's badges carry the same markers
        badge = driver.find_element(By.CSS_SELECTOR, 'details[data-key="timeout-task"] .badge .mk')
        assert badge.get_attribute("class") == timeout_mk

        checked, missing = driver.execute_script(_MISSING_GLYPHS_JS)
        assert checked > 0 and missing == [], missing

        # the dependency failure is listed under the line naming its root; filtering the
        # rows to another group hides that line too, showing all brings it back
        (head,) = driver.find_elements(By.CSS_SELECTOR, ".dep-head")
        assert head.is_displayed() and "root task user_error-task failed" in head.text
        driver.find_element(By.ID, "filter").send_keys("timeout-task")
        assert not head.is_displayed()
        shown = [e for e in driver.find_elements(By.CSS_SELECTOR, ".fsection") if e.is_displayed()]
        assert [e.text for e in shown] == [
            e.text for e in driver.find_elements(By.CSS_SELECTOR, ".fsection")
        ][:1]
        driver.find_element(By.ID, "filter").clear()
        driver.execute_script("document.getElementById('filter').dispatchEvent(new Event('input'))")
        assert head.is_displayed()
        assert _script_errors(driver) == []


def _crowded(rundir: Path, lanes: int, per_lane: int, runs: int = 1) -> None:
    """Long keys, long worker and host names, and lanes crowded with lost workers and
    timeouts: several within a few milliseconds, one at the very start and one at the very
    end of the timeline."""
    t0 = time.time()  # the runs begin together, a few ms after the first attempt
    span = 50.0
    for run in range(runs):
        journal = Journal(rundir / "journal.db")
        for lane in range(run, lanes, runs):
            w = f"w{lane + 1}"
            host = f"compute-node-{lane:04d}.partition-long-name.cluster.example.org"
            for j in range(per_lane):
                key = f"member-{lane:04d}-{j:03d}-" + "very-long-parameter-set-name-" * 6
                start = t0 + span * j / per_lane + (lane % 7) * 0.001
                end = start + (0.002 if j % 3 == 1 else span / per_lane * 0.8)
                if lane == 0 and j == per_lane - 1:
                    end = t0 + span  # the last attempt ends at the timeline's end
                outcome = ("worker_lost", "timeout", "timeout", "done")[(lane + j) % 4]
                f = None
                if outcome != "done":
                    cat = Category(outcome)
                    f = FailureRecord(
                        key,
                        cat,
                        f"{outcome} on {w}",
                        worker=w,
                        returncode=-9 if outcome == "worker_lost" else None,
                        signal="SIGKILL" if outcome == "worker_lost" else None,
                    )
                a = _attempt(1, w, start, end, outcome, f)
                a.host = host
                state = "DONE" if f is None else "FAILED"
                _write(journal, key, state, [a], f)
        journal.close()


#: every text of the timeline a user sees (lane names, markers, the axis's times and run
#: names): those that overlap another, leave the part of the page that shows them, or are
#: cut without an ellipsis and a tooltip holding the whole text
_LABEL_PROBLEMS_JS = """
const zoomed = arguments[0];
const view = document.getElementById("scroller").getBoundingClientRect();
const column = document.getElementById("labels").getBoundingClientRect();
const layer = document.getElementById("markers").getBoundingClientRect();
const lanes = document.getElementById("spacer").getBoundingClientRect();
const items = [];
function visible(el) {
  const r = el.getBoundingClientRect();
  return !el.hidden && r.width > 0 && r.height > 0 && getComputedStyle(el).visibility !== "hidden";
}
for (const el of document.querySelectorAll("#labels .lane")) items.push([el, column, el]);
for (const el of document.querySelectorAll(".tl-marker")) {
  const ml = el.querySelector(".ml");
  items.push([el, zoomed ? layer : view, ml && !ml.hidden ? ml : null]);
}
for (const el of document.querySelectorAll(".axis-label")) items.push([el, view, el]);
const problems = [], boxes = [];
let shown = 0;
for (const [el, box, text] of items) {
  if (!visible(el)) continue;
  const r = el.getBoundingClientRect();
  const name = el.className + " " + JSON.stringify((el.title || el.textContent).slice(0, 60));
  boxes.push([r, name]);
  // across: inside its area (the window in view, or when zoomed the whole timeline);
  // down: inside the timeline's lanes (which scroll as one when they are many)
  if (r.left < box.left - 0.5 || r.right > box.right + 0.5 || r.top < lanes.top - 0.5 ||
      r.bottom > lanes.bottom + 0.5)
    problems.push("outside its area: " + name);
  if (text) {
    shown++;
    const cut = text.scrollWidth > text.clientWidth + 0.5;
    const whole = el.title.indexOf(text.textContent.replace(/ \\+\\d+ more$/, "")) >= 0;
    if (cut && (getComputedStyle(text).textOverflow !== "ellipsis" || !whole))
      problems.push("cut without ellipsis and tooltip: " + name);
  } else if (el.classList.contains("tl-marker") && !el.title) {
    problems.push("a marker without its label in a tooltip: " + name);
  }
}
for (let i = 0; i < boxes.length; i++) {
  for (let j = i + 1; j < boxes.length; j++) {
    const a = boxes[i][0], b = boxes[j][0];
    const w = Math.min(a.right, b.right) - Math.max(a.left, b.left);
    const h = Math.min(a.bottom, b.bottom) - Math.max(a.top, b.top);
    if (w > 0.5 && h > 0.5) problems.push("overlap: " + boxes[i][1] + " / " + boxes[j][1]);
  }
}
return [boxes.length, shown, problems.slice(0, 20)];
"""


@pytest.mark.timeout(180)
def test_timeline_labels_never_overlap_or_clip_in_a_browser(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 25 item 9: with long keys, long worker and host names, 480 tasks on 40 lanes
    crowded with lost workers and timeouts (several a few ms apart, one at each end of the
    timeline) and three runs started together, no text of the timeline overlaps another or
    is cut off by the edge of its area, and a text that is shortened ends with an ellipsis
    and has the whole in its tooltip; the same zoomed in and scrolled to the end; and with
    600 lanes (too low for labels) the markers alone do not overlap."""
    from selenium.webdriver.common.by import By

    rundir = tmp_path / "run"
    _crowded(rundir, lanes=40, per_lane=12, runs=3)
    many = tmp_path / "many"
    _crowded(many, lanes=600, per_lane=3)
    with _browser(tmp_path, monkeypatch) as driver:
        _open_report(driver, rundir, tmp_path / "report.html")
        n_markers = len(driver.find_elements(By.CSS_SELECTOR, ".tl-marker"))
        assert n_markers > 40
        boxes, shown, problems = driver.execute_script(_LABEL_PROBLEMS_JS, False)
        assert boxes > 40 + 40 and shown > 40 and problems == [], problems
        assert driver.find_elements(By.CSS_SELECTOR, ".axis-label")  # times are shown
        assert any(  # three runs begun together share one name
            "runs 1, 2, 3" in e.get_attribute("textContent")
            for e in driver.find_elements(By.CSS_SELECTOR, ".axis-label")
        )
        for _ in range(4):
            driver.find_element(By.ID, "zin").click()
        driver.execute_script(
            "const s = document.getElementById('scroller'); s.scrollLeft = s.scrollWidth;"
            "s.dispatchEvent(new Event('scroll'));"
        )
        boxes, shown, problems = driver.execute_script(_LABEL_PROBLEMS_JS, True)
        assert shown > 40 and problems == [], problems
        assert _script_errors(driver) == []

        _open_report(driver, many, tmp_path / "many.html")
        compact = driver.find_elements(By.CSS_SELECTOR, ".tl-marker.compact")
        assert len(compact) > 600
        boxes, _shown, problems = driver.execute_script(_LABEL_PROBLEMS_JS, False)
        assert boxes > 600 and problems == [], problems
        assert _script_errors(driver) == []


def test_failed_tasks_list_root_causes_first(tmp_path: Path) -> None:
    """Issue 25 item 9: 13 dependency failures of one root and 2 of another (the largest
    digest group) come after the tasks that failed on their own, grouped by root in the
    order the roots are listed, each group under a line naming its root."""
    rundir = tmp_path / "run"
    journal = Journal(rundir / "journal.db")
    t0 = 1_700_000_000.0
    roots = {"prep-a": Category.USER_ERROR, "prep-b": Category.COMMAND_FAILED}
    # submission order: a dependent of b first, then the roots, then the rest
    order = ["down-b-0", "prep-a", "prep-b"] + [f"down-a-{i:02d}" for i in range(13)] + ["down-b-1"]
    for i, key in enumerate(order):
        if key in roots:
            f = FailureRecord(key, roots[key], f"{key} broke", returncode=1)
            a = _attempt(1, "w1", t0 + i, t0 + i + 1, roots[key].value, f)
            _write(journal, key, "FAILED", [a], f)
        else:
            root = "prep-" + key.split("-")[1]
            f = FailureRecord(
                key, Category.DEPENDENCY_FAILED, "did not run", upstream=root, root=root
            )
            _write(journal, key, "FAILED", [], f, deps=(root,))
    journal.close()
    page = _page_of(rundir)
    shown = re.findall(r'<details class="failure"[^>]* data-key="([^"]+)"', page)
    # the roots first (in digest order: both are groups of one), then each root's
    # dependency failures in submission order, the roots' groups in the roots' order
    assert sorted(shown[:2]) == ["prep-a", "prep-b"]
    groups = {r: [k for k in order if k.startswith("down-" + r[-1])] for r in shown[:2]}
    assert shown[2:] == groups[shown[0]] + groups[shown[1]]
    heads = re.findall(r'<div class="dep-head" data-root="([^"]+)"[^>]*>(.*?)</div>', page)
    assert [r for r, _t in heads] == shown[:2]
    text = [re.sub(r"<[^>]+>", "", t) for _r, t in heads]
    assert text == [
        f"{len(groups[r])} task(s) did not run because the root task {r} failed:" for r in shown[:2]
    ]
    # each head comes right before its group, and the head links to its root's row
    for root, _t in heads:
        head_at = page.index(f'<div class="dep-head" data-root="{root}"')
        after = page[head_at : page.index("</details>", head_at)]
        assert re.search(rf'<details class="failure"[^>]* data-root="{root}"', after)
    assert re.search(rf'class="dep-head" data-root="{shown[0]}".*?href="#f0"', page)
    assert page.index("failed on their own: 2") < page.index(f'data-key="{shown[0]}"')


def _legend_counts(driver: Any) -> dict[str, tuple[int, int, int]]:
    """outcome -> (attempts, of them the task failed with, retried), as the legend says."""
    from selenium.webdriver.common.by import By

    out = {}
    for item in driver.find_elements(By.CSS_SELECTOR, ".legend .legend-item"):
        outcome = str(item.get_attribute("data-outcome"))
        text = item.find_element(By.CSS_SELECTOR, ".n").text
        m = re.fullmatch(r"\((\d+)(?:: (.*))?\)", text)
        assert m, text
        n = int(m.group(1))
        parts = dict((k, int(v)) for v, k in re.findall(r"(\d+) (\w+)", m.group(2) or ""))
        failed = parts.get("failed", 0) if m.group(2) else n
        out[outcome] = (n, failed, parts.get("retried", 0))
    return out


def _walltime_journal(rundir: Path) -> None:
    """A member that exits 75 at its walltime (retry_exit_codes) and is continued to
    DONE, one whose run ended while it waited to be continued, a node lost then done, a
    bad input (exit 1) and a blow-up (SIGSEGV)."""
    journal = Journal(rundir / "journal.db")
    t0 = time.time()

    def failure(key: str, cat: Category, rc: int | None, sig: str | None = None) -> Any:
        return FailureRecord(key, cat, f"{key}: exit {rc}", returncode=rc, signal=sig, worker="w1")

    f = failure("walltime", Category.COMMAND_FAILED, 75)
    a1 = _attempt(1, "w1", t0, t0 + 2, "command_failed", f)
    _write(journal, "walltime", "DONE", [a1, _attempt(2, "w1", t0 + 2.1, t0 + 4, "done")])
    f = failure("waiting", Category.COMMAND_FAILED, 75)
    a1 = _attempt(1, "w2", t0, t0 + 3, "command_failed", f)
    journal.record(
        _task("waiting"),
        "RETRYING",
        [(t0, "PENDING", "READY"), (t0, "READY", "RUNNING"), (t0 + 3, "RUNNING", "RETRYING")],
        [a1],
        None,
        None,
    )
    f = failure("lost", Category.WORKER_LOST, -9, "SIGKILL")
    a1 = _attempt(1, "w3", t0, t0 + 1, "worker_lost", f)
    _write(journal, "lost", "DONE", [a1, _attempt(2, "w4", t0 + 1.5, t0 + 4, "done")])
    for key, rc, sig, w in (("bad-input", 1, None, "w2"), ("blow-up", -11, "SIGSEGV", "w4")):
        f = failure(key, Category.COMMAND_FAILED, rc, sig)
        _write(journal, key, "FAILED", [_attempt(1, w, t0 + 4, t0 + 5, "command_failed", f)], f)
    journal.close()


def test_continued_attempts_are_not_failures(tmp_path: Path) -> None:
    """Issue 25 item 9: a program exit the task asked to be retried on (75 after -maxh)
    that a later attempt continued, or that the run ended waiting to continue, is shown
    as 'continued', not 'command failed'; a failed task's last attempt stays a failure."""
    rundir = tmp_path / "run"
    _walltime_journal(rundir)
    page = _page_of(rundir)
    data = json.loads(re.search(r'id="pf-data">(.*?)</script>', page, re.S).group(1))  # type: ignore[union-attr]
    ids = [o["id"] for o in data["outcomes"]]
    shown = {}
    for b in data["bars"]:
        shown[(data["keys"][str(b[4])], b[5])] = (ids[b[3]], b[6])
    assert shown[("walltime", 1)] == ("retried", 2)
    assert shown[("walltime", 2)] == ("done", 0)
    assert shown[("waiting", 1)] == ("retried", 2)
    assert shown[("lost", 1)] == ("worker_lost", 2)  # a lost worker is drawn as such
    assert shown[("bad-input", 1)] == ("command_failed", 1)
    assert shown[("blow-up", 1)] == ("command_failed", 1)


@pytest.mark.timeout(120)
def test_legend_counts_agree_with_the_failed_tasks_in_a_browser(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 25 item 9, as a user sees it: the legend counts the continued attempts under
    'continued' (its own entry, its own marker), and for each failure the number of tasks
    that failed with it is the number of rows of that category in the failed-tasks table
    (only tasks whose final state is FAILED); the lost worker that was retried is counted
    as retried, not failed."""
    from selenium.webdriver.common.by import By

    rundir = tmp_path / "run"
    _walltime_journal(rundir)
    with _browser(tmp_path, monkeypatch) as driver:
        _open_report(driver, rundir, tmp_path / "report.html")
        legend = _legend_counts(driver)
        rows = driver.find_elements(By.CSS_SELECTOR, "details.failure")
        per_category: dict[str, int] = {}
        for r in rows:
            badge = r.find_element(By.CSS_SELECTOR, "summary .badge")
            cat = next(c[2:] for c in str(badge.get_attribute("class")).split() if c[:2] == "o-")
            per_category[cat] = per_category.get(cat, 0) + 1
        assert len(rows) == 2 and per_category == {"command_failed": 2}
        assert legend["retried"][0] == 2
        assert (
            "continued"
            in driver.find_element(By.CSS_SELECTOR, '.legend-item[data-outcome="retried"]').text
        )
        for outcome in report_parts.FAILING:
            if outcome in legend:
                assert legend[outcome][1] == per_category.get(outcome, 0), (outcome, legend)
        assert legend["worker_lost"] == (1, 0, 1)
        title = driver.find_element(By.TAG_NAME, "title").get_attribute("textContent")
        assert f"{len(rows)} failed" in title
        assert _script_errors(driver) == []


def test_output_references_are_not_tasks(tmp_path: Path) -> None:
    """Issue 25 item 9: ``.output(name)`` references (journal kind "output") are neither
    rows of the failed-tasks table nor counted nor drawn; a dependency failure through a
    reference names the program as its input and root."""
    rundir = tmp_path / "run"
    journal = Journal(rundir / "journal.db")
    t0 = 1_700_000_000.0

    def ref(program: str, name: str) -> SimpleNamespace:
        t = _task(f"{program}:{name}", (program,))
        t._output_of = program
        return t

    _write(journal, "prep", "DONE", [_attempt(1, "w1", t0, t0 + 1, "done")])
    prep_ref = ref("prep", "em.gro")
    a = _attempt(1, "w1", t0 + 1, t0 + 1.001, "done")
    journal.record(prep_ref, "DONE", [], [a], None, b"\x80\x04K\x01.")
    bad = FailureRecord("grompp", Category.COMMAND_FAILED, "exit 1", returncode=1)
    a = _attempt(1, "w1", t0 + 2, t0 + 3, "command_failed", bad)
    _write(journal, "grompp", "FAILED", [a], bad, deps=("prep:em.gro",))
    f = FailureRecord(
        "grompp:md.tpr", Category.DEPENDENCY_FAILED, "did not run", upstream="grompp", root="grompp"
    )
    journal.record(ref("grompp", "md.tpr"), "FAILED", [], [], f, None)
    f = FailureRecord(
        "mdrun",
        Category.DEPENDENCY_FAILED,
        "did not run: its input 'grompp:md.tpr' failed",
        upstream="grompp:md.tpr",
        root="grompp:md.tpr",  # even a root through a reference names the program
    )
    _write(journal, "mdrun", "FAILED", [], f, deps=("grompp:md.tpr",))
    journal.close()
    reader = JournalReader(rundir / "journal.db")
    try:
        tasks = sum(reader.counts().values())
        page = report.build_report(reader)
    finally:
        reader.close()
    assert tasks == 3
    assert f"<title>pilotfish report — {tasks} tasks, 2 failed</title>" in page
    assert re.findall(r'<details class="failure"[^>]* data-key="([^"]+)"', page) == [
        "grompp",
        "mdrun",
    ]
    assert re.findall(r'class="dep-head" data-root="([^"]+)"', page) == ["grompp"]
    dep = page[page.index('data-key="mdrun"') :]
    dep_text = re.sub(r"<[^>]+>", "", dep[dep.index('<p class="dep">') : dep.index("</p>")])
    assert dep_text == (
        "did not run because its input grompp (its file md.tpr) failed; the failure began in "
        "the root task grompp, which took 1 task(s) with it"
    )
    assert "2 failed task(s) in 2 group(s)" in page
    assert "total</th><td>3</td>" in page
    data = json.loads(re.search(r'id="pf-data">(.*?)</script>', page, re.S).group(1))  # type: ignore[union-attr]
    assert sorted(data["keys"].values()) == ["grompp", "prep"]  # no bar of a reference
    assert len(data["bars"]) == 2
