"""Screenshot the real TensorBoard dashboard: a real run, a real ``tensorboard`` server, headless Chromium.

Without ``--logdir``, runs the default demo (``lightning-clip fit``: the mnist1d MLP with a gradient spike x100
every 100 steps, 10 epochs, about 30 s) into a temporary folder; with ``--logdir DIR`` shows the runs already
there (any folder ``tensorboard --logdir`` takes). Then starts ``tensorboard`` on 127.0.0.1 on a free port, opens
its CUSTOM SCALARS tab in headless Chromium with smoothing 0 (the URL's ``#custom_scalars&_smoothingWeight=0``),
"Ignore outliers in chart scaling" off and the log-scale button of the norm charts pressed, waits until every chart
of the run's layout is drawn (polling the page, not sleeping), widens the key chart (its full-width button), opens
the "Matches" list (the legend) of the charts with several series and saves the whole tab as a PNG, by default
``docs/dashboard.png``.

The browser is driven over the Chrome DevTools protocol on a pipe (``--remote-debugging-pipe``: JSON messages,
NUL-terminated, on the browser's file descriptors 3 and 4), the channel Playwright itself uses, so the script needs
nothing beyond the standard library, TensorBoard and a Chromium binary: Debian's ``chromium`` package (``apt-get
install --no-install-recommends chromium``), or any Chromium/Chrome given with ``--chromium`` or ``$CHROMIUM``.
Linux and macOS (the pipe is set up through ``sh``).

Run: ``python examples/screenshot_dashboard.py`` (about 40 s on 2 cores: 30 s of training, then the browser), or
``python examples/screenshot_dashboard.py --logdir runs/demo --out shot.png``.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from types import TracebackType
from typing import Any

#: Executable names tried, in order, on ``$PATH`` (after ``$CHROMIUM``).
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chromium-headless-shell")

#: Flags for a headless Chromium on a closed machine: no sandbox (root in a container has none), no GPU, no network
#: of its own (updates, sync, first-run pages), a fresh profile per launch.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--mute-audio",
)

# Reads the CUSTOM SCALARS tab from the page: its sections and charts as the browser shows them (the DOM text of the
# section headers, chart headings and "Matches" entries, through the Polymer components' shadow roots), and per
# chart whether its data loader is done and how many lines/areas it has drawn. Returns null before the tab exists.
_STATE_JS = r"""
(() => {
  const deepAll = (selector, root) => {
    let found = [...root.querySelectorAll(selector)];
    for (const el of root.querySelectorAll('*')) {
      if (el.shadowRoot) found = found.concat(deepAll(selector, el.shadowRoot));
    }
    return found;
  };
  const text = (el) => (el ? el.innerText || el.textContent || '' : '').replace(/\s+/g, ' ').trim();
  const dash = deepAll('tf-custom-scalar-dashboard', document)[0];
  if (!dash || !dash.shadowRoot) return null;
  const root = dash.shadowRoot;
  const outliers = deepAll('paper-checkbox', root).find((c) => /outliers/i.test(text(c)));
  const smoothing = deepAll('tf-smoothing-input', root)[0];
  const cards = deepAll('tf-custom-scalar-multi-line-chart-card, tf-custom-scalar-margin-chart-card', root);
  return {
    sections: deepAll('tf-category-paginated-view', root).map(
      (v) => text(v.shadowRoot.querySelector('.category-name'))),
    smoothing: smoothing ? Number(smoothing.weight) : null,
    ignore_outliers: outliers ? outliers.checked : null,
    cards: cards.map((card) => {
      const r = card.shadowRoot;
      const loader = r.querySelector('tf-line-chart-data-loader');
      const drawn = deepAll('path.line, path.area', r).filter((p) => (p.getAttribute('d') || '').length > 20);
      return {
        kind: card.localName === 'tf-custom-scalar-margin-chart-card' ? 'margin' : 'multiline',
        title: text(r.querySelector('tf-card-heading').shadowRoot.querySelector('figcaption')),
        matches: text(r.querySelector('#matches-container .matches-text, #matches-container .collapsible-title-text')),
        series: [...r.querySelectorAll('.match-list-entry')].map(text),
        errors: [...r.querySelectorAll('.error-content')].map(text),
        loading: loader ? !!loader.dataLoading : true,
        log_scale: loader ? !!loader.logScaleActive : false,
        drawn: drawn.length,
        signature: drawn.map((p) => p.getAttribute('d').length).join(','),
      };
    }),
  };
})()
"""

# Presses a button of the cards whose title is in the list (a real click event on the component).
_CLICK_JS = r"""
((titles, selector) => {
  const deepAll = (s, root) => {
    let found = [...root.querySelectorAll(s)];
    for (const el of root.querySelectorAll('*')) if (el.shadowRoot) found = found.concat(deepAll(s, el.shadowRoot));
    return found;
  };
  let n = 0;
  for (const card of deepAll('tf-custom-scalar-multi-line-chart-card, tf-custom-scalar-margin-chart-card', document)) {
    const r = card.shadowRoot;
    const heading = r.querySelector('tf-card-heading').shadowRoot.querySelector('figcaption');
    const title = heading.innerText.replace(/\s+/g, ' ').trim();
    const button = r.querySelector(selector);
    if (titles.includes(title) && button) { button.click(); n += 1; }
  }
  return n;
})
"""

# The height the page needs to show every section without scrolling (the charts scroll inside their own pane).
_HEIGHT_JS = r"""
(() => {
  const deepAll = (s, root) => {
    let found = [...root.querySelectorAll(s)];
    for (const el of root.querySelectorAll('*')) if (el.shadowRoot) found = found.concat(deepAll(s, el.shadowRoot));
    return found;
  };
  const pane = deepAll('#categories-container', document)[0];
  if (!pane) return document.documentElement.scrollHeight;
  return Math.ceil(pane.getBoundingClientRect().top + pane.scrollHeight + 16);
})()
"""


class BrowserError(RuntimeError):
    """Chromium failed, closed its pipe, or a page script raised."""


def find_chromium(explicit: str | None = None) -> str | None:
    """The Chromium executable: ``explicit``, else ``$CHROMIUM``, else the first of :data:`CHROMIUM_NAMES` on PATH."""
    for candidate in (explicit, os.environ.get("CHROMIUM")):
        if candidate:
            return shutil.which(candidate) or (candidate if os.access(candidate, os.X_OK) else None)
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


class Chromium:
    """One headless Chromium page, driven over the DevTools protocol on a pipe.

    A context manager: entering launches the browser with a fresh profile and opens a blank page of
    ``width`` x ``height`` CSS pixels; leaving closes the browser and removes the profile.

    Args:
        executable: the Chromium binary.
        width: viewport width in CSS pixels.
        height: viewport height in CSS pixels.
        scale: device pixels per CSS pixel of the screenshots.
        timeout: seconds one protocol call may take.
    """

    def __init__(self, executable: str, width: int = 1200, height: int = 900, scale: float = 1.0, timeout: float = 60):
        self.executable = executable
        self.width, self.height, self.scale = width, height, scale
        self.timeout = timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._profile = ""
        self._buffer = b""
        self._next_id = 0
        self._events: list[dict[str, Any]] = []
        self._session = ""

    def __enter__(self) -> Chromium:
        self._profile = tempfile.mkdtemp(prefix="lightning-clip-chromium-")
        args = [
            self.executable,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={self._profile}",
            f"--window-size={self.width},{self.height}",
            "--remote-debugging-pipe",
            "about:blank",
        ]
        # the browser reads commands on its fd 3 and writes replies on fd 4: our stdin/stdout pipes, moved there
        self._stderr = open(os.path.join(self._profile, "chromium.log"), "wb")
        self._proc = subprocess.Popen(
            ["sh", "-c", 'exec "$0" "$@" 3<&0 4>&1 </dev/null >/dev/null', *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
        )
        try:
            target = self.call("Target.createTarget", {"url": "about:blank"}, session=False)["targetId"]
            self._session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True}, session=False)[
                "sessionId"
            ]
            self.call("Page.enable")
            self.resize(self.height)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            try:
                if proc.stdin:
                    proc.stdin.write(json.dumps({"id": 0, "method": "Browser.close"}).encode() + b"\0")
                    proc.stdin.close()
                proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                proc.kill()
                proc.wait()
            if proc.stdout:
                proc.stdout.close()
        if getattr(self, "_stderr", None):
            self._stderr.close()
        shutil.rmtree(self._profile, ignore_errors=True)

    # ------------------------------------------------------------------ protocol
    def call(self, method: str, params: dict[str, Any] | None = None, *, session: bool = True) -> dict[str, Any]:
        """Send one DevTools command (to the page unless ``session=False``) and return its result."""
        if self._proc is None or self._proc.stdin is None:
            raise BrowserError("Chromium is not running")
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = self._session
        try:
            self._proc.stdin.write(json.dumps(message).encode() + b"\0")
            self._proc.stdin.flush()
        except BrokenPipeError as err:
            raise BrowserError(f"Chromium closed its pipe{self._log_tail()}") from err
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._receive(deadline, method)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise BrowserError(f"{method}: {reply['error'].get('message', reply['error'])}")
                return reply.get("result", {})
            if "method" in reply:
                self._events.append(reply)

    def _receive(self, deadline: float, waiting_for: str) -> dict[str, Any]:
        assert self._proc is not None and self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise BrowserError(f"no reply to {waiting_for} from Chromium within {self.timeout:.0f} s")
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                raise BrowserError(f"Chromium exited while waiting for {waiting_for}{self._log_tail()}")
            self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    def _log_tail(self) -> str:
        try:
            with open(os.path.join(self._profile, "chromium.log"), "rb") as f:
                lines = f.read().decode(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return (":\n" + "\n".join(lines[-15:])) if lines else ""

    # ------------------------------------------------------------------- page
    def resize(self, height: int) -> None:
        """Set the viewport to ``self.width`` x ``height`` CSS pixels."""
        self.height = height
        metrics = {"width": self.width, "height": height, "deviceScaleFactor": self.scale, "mobile": False}
        self.call("Emulation.setDeviceMetricsOverride", metrics)

    def before_load(self, source: str) -> None:
        """Run the script ``source`` in every page this tab loads from now on, before the page's own scripts."""
        self.call("Page.addScriptToEvaluateOnNewDocument", {"source": source})

    def navigate(self, url: str, timeout: float = 60) -> None:
        """Load ``url`` and wait for its load event."""
        self._events.clear()
        result = self.call("Page.navigate", {"url": url})
        if result.get("errorText"):
            raise BrowserError(f"cannot open {url}: {result['errorText']}")
        self.wait_for("document.readyState === 'complete'", timeout, f"the load of {url}")

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (promises awaited); raises :class:`BrowserError`."""
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            message = details.get("exception", {}).get("description") or details.get("text")
            raise BrowserError(f"page script failed: {message}")
        return result.get("result", {}).get("value")

    def wait_for(self, expression: str, timeout: float, what: str, interval: float = 0.25) -> Any:
        """Poll ``expression`` until it is truthy and return its value; ``TimeoutError`` naming ``what`` after."""
        deadline = time.monotonic() + timeout
        value: Any = None
        while True:
            try:
                value = self.evaluate(expression)
            except BrowserError as err:  # a page that is navigating has no context for a moment
                value = f"<{err}>"
            else:
                if value:
                    return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"waited {timeout:.0f} s for {what}; last value: {str(value)[:2000]}")
            time.sleep(interval)

    def screenshot(self, path: str) -> int:
        """Save the viewport as a PNG at ``path``; returns its size in bytes."""
        data = base64.b64decode(self.call("Page.captureScreenshot", {"format": "png"})["data"])
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
        return len(data)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 at the time of the call."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str, timeout: float = 5) -> Any:
    """GET ``url`` (loopback) and decode its JSON body."""
    with urllib.request.urlopen(url, timeout=timeout) as reply:  # noqa: S310 - 127.0.0.1 only
        return json.loads(reply.read().decode())


class TensorBoard:
    """A real ``tensorboard`` server on 127.0.0.1, on a free port, for ``logdir``; a context manager.

    Entering starts it (in the folder ``cwd``, when given: a relative ``logdir`` is shown as such in the page) and
    waits until it serves the custom-scalars layout of a run (``ready_timeout`` seconds at most); leaving stops it.
    """

    def __init__(self, logdir: str, ready_timeout: float = 90, cwd: str | None = None):
        self.logdir = logdir
        self.ready_timeout = ready_timeout
        self.cwd = cwd
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.layout: dict[str, Any] = {}
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    def __enter__(self) -> TensorBoard:
        for attempt in range(5):  # another process may take the free port between the check and the bind
            self._log = tempfile.TemporaryFile()
            cmd = [sys.executable, "-m", "tensorboard.main", "--logdir", self.logdir, "--host", "127.0.0.1"]
            cmd += ["--port", str(self.port), "--reload_interval", "1"]
            self._proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, cwd=self.cwd)
            try:
                self.layout = self._wait_ready()
                return self
            except RuntimeError:
                taken = "could not bind" in self.log_tail()
                self.__exit__(None, None, None)
                if not taken or attempt == 4:
                    raise
                self.port = free_port()
                self.url = f"http://127.0.0.1:{self.port}"
            except BaseException:
                self.__exit__(None, None, None)
                raise
        return self

    def _wait_ready(self) -> dict[str, Any]:
        assert self._proc is not None
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"tensorboard exited with code {self._proc.returncode}:\n{self.log_tail()}")
            try:
                layout = get_json(f"{self.url}/data/plugin/custom_scalars/layout")
                if layout.get("category"):
                    return layout
            except (OSError, ValueError):
                pass
            time.sleep(0.3)
        raise TimeoutError(f"tensorboard served no custom-scalars layout within {self.ready_timeout:.0f} s")

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of the server's output."""
        if self._log is None:
            return ""
        self._log.seek(0)
        return "\n".join(self._log.read().decode(errors="replace").splitlines()[-lines:])

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None


def expected_charts(layout: dict[str, Any]) -> list[tuple[str, str, int]]:
    """``(section, chart title, number of series)`` of every chart of a layout as the server serves it (JSON)."""
    out = []
    for category in layout.get("category", []):
        for chart in category.get("chart", []):
            if "margin" in chart:
                out.append((category["title"], chart["title"], len(chart["margin"].get("series", []))))
            else:
                out.append((category["title"], chart["title"], len(chart.get("multiline", {}).get("tag", []))))
    return out


def dashboard_state(browser: Chromium) -> dict[str, Any] | None:
    """The CUSTOM SCALARS tab as the page shows it: sections, charts (title, series, drawn), settings."""
    return browser.evaluate(_STATE_JS)


def wait_until_drawn(browser: Chromium, charts: int, timeout: float = 60) -> dict[str, Any]:
    """Poll the page until ``charts`` charts are loaded, each with its series listed and drawn, and the drawing is
    the same on two polls in a row (rendering settled); returns :func:`dashboard_state`."""
    deadline = time.monotonic() + timeout
    last: Any = None
    previous = None
    while True:
        state = dashboard_state(browser)
        last = state
        if state and len(state["cards"]) >= charts:
            cards = state["cards"]
            done = all(not c["loading"] and c["series"] and c["drawn"] for c in cards)
            signature = [(c["title"], c["signature"], c["log_scale"]) for c in cards]
            if done and signature == previous:
                return state
            previous = signature if done else None
        if time.monotonic() > deadline:
            raise TimeoutError(f"the dashboard's {charts} charts were not drawn within {timeout:.0f} s: {last}")
        time.sleep(0.3)


def open_dashboard(
    browser: Chromium,
    server: TensorBoard,
    *,
    smoothing: float = 0.0,
    ignore_outliers: bool = False,
    log_scale: Sequence[str] = (),
    expand: Sequence[str] = (),
    open_matches: bool = True,
    timeout: float = 60,
) -> dict[str, Any]:
    """Open the CUSTOM SCALARS tab of ``server`` and wait until every chart of its layout is drawn.

    Args:
        browser: the page to use.
        server: the running TensorBoard.
        smoothing: the smoothing slider's value, set through the URL (``#custom_scalars&_smoothingWeight=0``).
        ignore_outliers: the "Ignore outliers in chart scaling" checkbox (kept in the browser's localStorage).
        log_scale: titles of the charts whose log-scale button is pressed.
        expand: titles of the charts whose full-width button is pressed.
        open_matches: open the "Matches" list (the legend) of the charts with several series.
        timeout: seconds to wait for the charts.

    Returns:
        :func:`dashboard_state` once drawn.
    """
    browser.before_load(f"localStorage.setItem('_ignoreYOutliers', '{str(ignore_outliers).lower()}');")
    browser.navigate(f"{server.url}/#custom_scalars&_smoothingWeight={smoothing:g}", timeout)
    charts = len(expected_charts(server.layout))
    state = wait_until_drawn(browser, charts, timeout)
    clicks = []
    if log_scale:
        clicks.append((list(log_scale), 'paper-icon-button[icon="line-weight"]'))
    if expand:
        clicks.append((list(expand), 'paper-icon-button[icon="fullscreen"]'))
    if open_matches:
        several = [c["title"] for c in state["cards"] if len(c["series"]) > 1]
        clicks.append((several, ".toggle-matches-button"))
    for titles, selector in clicks:
        browser.evaluate(f"{_CLICK_JS}({json.dumps(titles)}, {json.dumps(selector)})")
    if log_scale:
        pressed = len(set(log_scale) & {c["title"] for c in state["cards"]})
        expression = f"{_STATE_JS}.cards.filter((c) => c.log_scale).length >= {pressed}"
        browser.wait_for(expression, timeout, "the log-scale buttons")
    return wait_until_drawn(browser, charts, timeout)


def take_screenshot(
    logdir: str,
    out: str,
    *,
    chromium: str,
    cwd: str | None = None,
    width: int = 1180,
    scale: float = 1.5,
    smoothing: float = 0.0,
    ignore_outliers: bool = False,
    log_scale_norm: bool = True,
    timeout: float = 90,
) -> dict[str, Any]:
    """Serve ``logdir`` (relative to ``cwd``) with TensorBoard, open the dashboard in headless Chromium, save it.

    The log scale goes on the charts whose title starts with ``grad_norm`` (the norm charts), and the margin charts
    (the key chart of each clipping section) are widened to the page's width. Returns :func:`dashboard_state` of the
    saved page.
    """
    with (
        TensorBoard(logdir, ready_timeout=timeout, cwd=cwd) as server,
        Chromium(chromium, width, 900, scale) as browser,
    ):
        titles = [title for _, title, _ in expected_charts(server.layout)]
        norm_charts = [t for t in titles if t.startswith("grad_norm")] if log_scale_norm else []
        margin = [ch["title"] for cat in server.layout["category"] for ch in cat["chart"] if "margin" in ch]
        state = open_dashboard(
            browser,
            server,
            smoothing=smoothing,
            ignore_outliers=ignore_outliers,
            log_scale=norm_charts,
            expand=margin,
            timeout=timeout,
        )
        browser.resize(int(browser.evaluate(_HEIGHT_JS)))
        state = wait_until_drawn(browser, len(titles), timeout)
        size = browser.screenshot(out)
    print(f"wrote {out} ({size // 1024} KiB, {width}x{browser.height} CSS px) from {logdir}")
    return state


def run_demo(save_dir: str, epochs: int | None = None) -> str:
    """Run ``lightning-clip fit`` (the default demo config) with its logs under ``save_dir``; returns ``save_dir``."""
    cmd = [sys.executable, "-m", "lightning_clip.cli", "fit", "--trainer.logger.init_args.save_dir", save_dir]
    if epochs is not None:
        cmd += ["--trainer.max_epochs", str(epochs)]
    print("running:", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return save_dir


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: see the module's docstring; returns the exit status."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--logdir", help="a TensorBoard logdir to show; default: run the demo into a temporary one")
    parser.add_argument("--epochs", type=int, help="epochs of the demo run (default: the demo config's 10)")
    parser.add_argument("--out", default="docs/dashboard.png", help="the PNG to write")
    parser.add_argument("--chromium", help="the Chromium binary (default: $CHROMIUM, else chromium on PATH)")
    parser.add_argument("--width", type=int, default=1180, help="viewport width in CSS pixels (2 charts a row)")
    parser.add_argument("--scale", type=float, default=1.5, help="device pixels per CSS pixel")
    parser.add_argument("--smoothing", type=float, default=0.0, help="TensorBoard's smoothing (its default: 0.6)")
    parser.add_argument(
        "--ignore-outliers", action="store_true", help='keep "Ignore outliers in chart scaling" on (its default)'
    )
    parser.add_argument("--linear", action="store_true", help="leave the norm charts on a linear y axis")
    parser.add_argument("--timeout", type=float, default=90, help="seconds to wait for the server and the charts")
    args = parser.parse_args(argv)
    chromium = find_chromium(args.chromium)
    if chromium is None:
        print("no Chromium found: apt-get install chromium (Debian), or pass --chromium PATH", file=sys.stderr)
        return 1

    def shoot(logdir: str, out: str, cwd: str | None = None) -> None:
        """One screenshot with the command line's settings."""
        take_screenshot(
            logdir,
            out,
            chromium=chromium,
            cwd=cwd,
            width=args.width,
            scale=args.scale,
            smoothing=args.smoothing,
            ignore_outliers=args.ignore_outliers,
            log_scale_norm=not args.linear,
            timeout=args.timeout,
        )

    if args.logdir:
        shoot(args.logdir, args.out)
        return 0
    with tempfile.TemporaryDirectory(prefix="lightning-clip-demo-") as tmp:  # the page shows the logdir as "runs"
        run_demo(os.path.join(tmp, "runs"), args.epochs)
        shoot("runs", os.path.abspath(args.out), cwd=tmp)
    return 0


if __name__ == "__main__":
    sys.exit(main())
