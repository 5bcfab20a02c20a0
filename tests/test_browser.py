"""A student's first session, in a real browser: JupyterLab on 127.0.0.1, notebook 02 run through the UI.

Headless Debian Chromium (``apt-get install chromium``; ``make test`` and ``.ci/run`` install it when missing
and they can: ``make browser``),
driven by Playwright from pip through ``executable_path`` (Playwright's own browser downloads are not
possible on the project's machines). Checks: the notebook opens without the news pop-up, Run All Cells
finishes with no error output, a figure is rendered, the similarity explorer's controls are displayed and
moving one redraws its figure; then the HTML report of that run renders with its embedded figure.
Screenshots go to ``results/browser/`` (``MATU_RESULTS_DIR`` overrides ``results``).

A machine without Chromium fails this test with a message saying how to install it: skipping would hide
that nobody has checked the notebooks in a browser.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from matu_lib.notebook import default_results_dir
from matu_lib.workbook import NOTEBOOK_DIR

pytestmark = pytest.mark.slow  # JupyterLab + Chromium + notebook 02 on smoke (one round): a few minutes on 2 cores
ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = "02_task_similarity"
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-sync",
    "--disable-background-networking",
    "--disable-component-update",
]


def chromium_path() -> str:
    """Debian's Chromium, or a failure that says how to get it."""
    for candidate in (
        os.environ.get("CHROMIUM"),
        shutil.which("chromium"),
        shutil.which("chromium-browser"),
        "/usr/bin/chromium",
    ):
        if candidate and Path(candidate).exists():
            return candidate
    pytest.fail(
        "Chromium is not installed: run `apt-get install -y chromium` (as root; `make test` does it "
        "when it can) or set CHROMIUM=/path/to/chromium",
        pytrace=False,
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _notebook_on_smoke(src: Path, dst: Path, output_dir: Path, shared_dir: Path) -> None:
    """A copy of the notebook whose parameters cell says smoke (one round), writing into temporary folders."""
    nb = json.loads(src.read_text())
    cell = next(c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", []))
    lines = "".join(cell["source"]).splitlines()
    values = {
        "PRESET": '"smoke"',
        "OVERRIDES": '{"rounds": 1}',
        "OUTPUT_DIR": repr(str(output_dir)),
        "SHARED_DIR": repr(str(shared_dir)),
    }
    for i, line in enumerate(lines):
        name = line.split("=")[0].strip()
        if name in values:
            lines[i] = f"{name} = {values.pop(name)}"
    assert not values, f"the parameters cell of {src.name} lacks {sorted(values)}"
    cell["source"] = "\n".join(lines)
    dst.write_text(json.dumps(nb, indent=1))


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """JupyterLab on 127.0.0.1 with a token, a fresh workspace and the project's labconfig; yields its URL."""
    tmp = tmp_path_factory.mktemp("lab")
    root, out = tmp / "notebooks", tmp / "report" / NOTEBOOK
    root.mkdir()
    _notebook_on_smoke(NOTEBOOK_DIR / f"{NOTEBOOK}.ipynb", root / f"{NOTEBOOK}.ipynb", out, tmp / "shared")
    port, token = _free_port(), secrets.token_hex(16)
    env = os.environ | {
        "JUPYTER_CONFIG_DIR": str(tmp / "config"),  # no user settings from this machine
        "JUPYTER_CONFIG_PATH": str(ROOT / "jupyter_config"),  # the project's: no news pop-up
        "JUPYTER_RUNTIME_DIR": str(tmp / "runtime"),
        "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
        "HF_HUB_OFFLINE": "1",
        "MATU_PROGRESS": "0",
        "MPLBACKEND": "module://matplotlib_inline.backend_inline",
    }
    cmd = [
        sys.executable,
        "-m",
        "jupyterlab",
        "--no-browser",
        "--ServerApp.ip=127.0.0.1",
        f"--ServerApp.port={port}",
        "--ServerApp.port_retries=0",
        f"--IdentityProvider.token={token}",
        f"--ServerApp.root_dir={root}",
        f"--LabApp.workspaces_dir={tmp / 'workspaces'}",
        f"--LabApp.user_settings_dir={tmp / 'settings'}",
    ]
    if os.geteuid() == 0:  # CI and the project's machines run as root
        cmd.append("--allow-root")
    log = (tmp / "lab.log").open("w")
    server = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600  # seconds when idle; minutes on a loaded 2-core machine
        while True:
            try:
                with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
            if server.poll() is not None:
                pytest.fail(f"JupyterLab exited with {server.returncode}: {(tmp / 'lab.log').read_text()[-600:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"JupyterLab did not answer on {base} within 600 s: {(tmp / 'lab.log').read_text()[-600:]}")
        yield {"url": base, "token": token, "root": root, "out": out, "tmp": tmp}
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)  # the server and the kernels it started (its own session)
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
        log.close()


@pytest.fixture(scope="module")
def browser():
    executable = chromium_path()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is not installed: pip install -r requirements.txt", pytrace=False)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_FLAGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def shots():
    folder = default_results_dir() / "browser"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


ALL_CELLS_RAN = """() => {
  const prompts = [...document.querySelectorAll('.jp-Notebook .jp-CodeCell .jp-InputPrompt')];
  return prompts.length > 0 && prompts.every(p => /\\[\\d+\\]/.test(p.textContent));
}"""


KERNEL_IDLE = "() => /\\|\\s*Idle/.test(document.querySelector('#jp-main-statusbar')?.textContent ?? '')"


def test_notebook_runs_in_jupyterlab(lab, browser, shots):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    try:
        _run_notebook_in_lab(page, lab, shots)
    except Exception:
        page.screenshot(path=str(shots / "lab_failure.png"))
        raise
    finally:
        page.close()


def _run_notebook_in_lab(page, lab, shots):
    n_code = sum(c["cell_type"] == "code" for c in json.loads((lab["root"] / f"{NOTEBOOK}.ipynb").read_text())["cells"])
    page.goto(f"{lab['url']}/lab/tree/{NOTEBOOK}.ipynb?token={lab['token']}")
    page.wait_for_function(
        f"() => document.querySelectorAll('.jp-Notebook .jp-CodeCell').length === {n_code}", timeout=120_000
    )
    page.wait_for_function(KERNEL_IDLE, timeout=120_000)
    # a clean workspace: no news / update notification over the notebook
    assert page.locator(".jp-Notification-Toast").count() == 0, "a notification toast covers the notebook"
    page.screenshot(path=str(shots / "lab_opened.png"))

    page.locator("#jp-MainMenu").get_by_text("Run", exact=True).click()
    page.get_by_role("menuitem", name="Run All Cells", exact=True).click()
    page.wait_for_function(ALL_CELLS_RAN, timeout=900_000, polling=1000)  # over 8 min seen at load ~15 on 2 cores
    page.wait_for_function(KERNEL_IDLE, timeout=60_000)
    page.screenshot(path=str(shots / "lab_ran.png"))

    errors = page.locator(
        ".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']", has_text="Traceback"
    )
    assert errors.count() == 0, errors.first.inner_text()[:2000]
    assert (lab["out"] / "metrics.json").exists(), "the notebook did not reach its last cell"
    images = page.locator(".jp-RenderedImage img")
    assert images.count() >= 3
    assert page.evaluate(
        "() => [...document.querySelectorAll('.jp-RenderedImage img')].every(i => i.complete && i.naturalWidth > 100)"
    )

    # the explorer: its controls are live widgets, and moving one redraws the figure in its output
    sign = page.locator("button.widget-toggle-button", has_text="sign")
    sign.wait_for(timeout=30_000)
    explorer = page.locator(".widget-output img").first
    explorer.scroll_into_view_if_needed()
    before = explorer.get_attribute("src")
    page.screenshot(path=str(shots / "explorer_before.png"))
    sign.click()
    page.wait_for_function(
        "(old) => { const i = document.querySelector('.widget-output img');"
        " return i && i.getAttribute('src') !== old && i.naturalWidth > 100; }",
        arg=before,
        timeout=60_000,
    )
    assert "mod-active" in (sign.get_attribute("class") or "")
    page.screenshot(path=str(shots / "explorer_after.png"))

    # the notebook as saved by the UI holds no error output either
    page.keyboard.press("Control+s")
    time.sleep(2)
    nb = json.loads((lab["root"] / f"{NOTEBOOK}.ipynb").read_text())
    kinds = [o["output_type"] for c in nb["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])]
    assert "error" not in kinds and "display_data" in kinds


def test_report_renders(lab, browser, shots):
    """The HTML index of the run above: headline sections, the embedded key figure, timings, versions."""
    from matu_lib.report import write_index

    metrics_file = lab["out"] / "metrics.json"
    if not metrics_file.exists():
        pytest.fail("the notebook run in JupyterLab wrote no metrics.json (see test_notebook_runs_in_jupyterlab)")
    result = {
        "metrics": {NOTEBOOK: json.loads(metrics_file.read_text())},
        "timings_s": {NOTEBOOK: 0.0},
        "total_s": 0.0,
        "out": lab["out"].parent,
    }
    index = write_index(lab["out"].parent, result, preset="smoke", seed=0, parameters={})
    page = browser.new_page(viewport={"width": 1200, "height": 1600})
    page.goto(index.as_uri())
    assert page.locator("h1").inner_text().startswith("MaTU workbook report")
    for heading in ("Regression check", "Notebooks", "Configuration", "Package versions"):
        assert page.get_by_role("heading", name=heading).count() == 1, heading
    assert page.evaluate("() => { const i = document.querySelector('figure img'); return i && i.naturalWidth > 100; }")
    page.screenshot(path=str(shots / "report.png"), full_page=True)
    page.close()
