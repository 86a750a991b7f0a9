"""A real JupyterLab server and a headless chromium driven by Playwright (session scope).

Recipe: ../shared/notes/browser-testing.md. Everything the server writes goes to a temp
HOME; the checkout is put on PYTHONPATH so the kernel imports this nbcompress. Tests skip
when chromium or Playwright is missing, unless ``REQUIRE_BROWSER=1`` (CI), which turns the
skip into a failure so a broken CI image cannot pass silently.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
NOTEBOOKS = Path(__file__).parent / "notebooks"
ARTIFACTS = Path(__file__).parent / "artifacts"
CHROMIUM = os.environ.get("NBCOMPRESS_CHROMIUM", "/usr/bin/chromium")
# Without the networking flags chromium keeps trying to reach Google services, which this
# closed network refuses; root needs --no-sandbox.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _unavailable(reason: str) -> None:
    if os.environ.get("REQUIRE_BROWSER") == "1":
        pytest.fail(f"REQUIRE_BROWSER=1 but the browser test cannot run: {reason}")
    pytest.skip(reason)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class Lab:
    """A running JupyterLab: where it is and how to open a notebook in it."""

    url: str
    token: str
    root: Path

    def notebook_url(self, name: str) -> str:
        return f"{self.url}/lab/tree/{name}?reset&token={self.token}"


def _lab_env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    dirs = {
        "HOME": home,
        "JUPYTER_CONFIG_DIR": home / "config",
        "JUPYTER_DATA_DIR": home / "data",
        "JUPYTER_RUNTIME_DIR": home / "runtime",
        "IPYTHONDIR": home / "ipython",
        "MPLCONFIGDIR": home / "mpl",
        "JUPYTERLAB_SETTINGS_DIR": home / "settings",
    }
    for key, path in dirs.items():
        path.mkdir(parents=True, exist_ok=True)
        env[key] = str(path)
    # No "news" toast covering the notebook, and no "Select Kernel" dialog: the notebook
    # names its kernel, so start it.
    settings = {
        "apputils-extension/notification": {"fetchNews": "false"},
        "notebook-extension/tracker": {"autoStartDefaultKernel": True},
    }
    for plugin, values in settings.items():
        path = home / "settings" / "@jupyterlab" / f"{plugin}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    # tests/conftest.py sets MPLBACKEND=Agg for pytest; the kernel should use its own inline one.
    env.pop("MPLBACKEND", None)
    env["OMP_NUM_THREADS"] = "1"
    # A cold numba cache, as on a first install: the kernels compile in this session, so a
    # test sees the notices a new user sees (the default cache sits in the checkout).
    cache = home / "numba-cache"
    cache.mkdir(parents=True, exist_ok=True)
    env["NUMBA_CACHE_DIR"] = str(cache)
    return env


def _wait_ready(proc: subprocess.Popen, url: str, token: str, log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"JupyterLab exited ({proc.returncode}):\n{log.read_text()}")
        try:
            with urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2):
                return
        except OSError:
            time.sleep(0.25)
    raise RuntimeError(f"JupyterLab did not answer within 60 s:\n{log.read_text()}")


@pytest.fixture(scope="session")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """A JupyterLab server on a free port serving a temp copy of ``notebooks/``."""
    try:
        import jupyterlab  # noqa: F401
    except ImportError:
        _unavailable("jupyterlab is not installed (pip install jupyterlab)")
    base = tmp_path_factory.mktemp("lab")
    root = base / "root"
    shutil.copytree(NOTEBOOKS, root)
    token, port = secrets.token_hex(16), _free_port()
    url = f"http://127.0.0.1:{port}"
    log = base / "server.log"
    cmd = [
        sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
        f"--ServerApp.token={token}", "--ServerApp.allow_root=True",
        f"--ServerApp.root_dir={root}",
    ]  # fmt: skip
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, env=_lab_env(base / "home"), stdout=out, stderr=out)
    try:
        _wait_ready(proc, url, token, log)
        yield Lab(url, token, root)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def browser() -> Iterator[object]:
    """Headless Debian chromium driven by Playwright's sync API."""
    if not Path(CHROMIUM).exists():
        _unavailable(f"chromium not found at {CHROMIUM} (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("playwright is not installed (pip install playwright)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    # Lets the page fixture know whether the test failed, to keep a screenshot of it.
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"report_{report.when}", report)


@pytest.fixture
def page(browser: object, lab: Lab, request: pytest.FixtureRequest) -> Iterator[object]:
    """A fresh page (1400×1000) in its own context; a failing test leaves a screenshot."""
    ARTIFACTS.mkdir(exist_ok=True)
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    pg = context.new_page()
    pg.set_default_timeout(30_000)
    try:
        yield pg
    finally:
        report = getattr(request.node, "report_call", None)
        if report is not None and report.failed:
            pg.screenshot(path=str(ARTIFACTS / f"FAILED-{request.node.name}.png"), full_page=True)
        context.close()


@pytest.fixture
def shot(page: object) -> Callable[..., Path]:
    """``shot(name, locator=None)``: screenshot of the page (or one element) to ``artifacts/``."""

    def take(name: str, locator: object = None) -> Path:
        path = ARTIFACTS / name
        (locator or page).screenshot(path=str(path))
        return path

    return take
