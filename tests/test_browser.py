"""The MLflow UI checked in a real browser: headless Chromium (Debian's chromium + chromium-driver, via Selenium)
over `gptlab ui` serving a store that holds a small finished sweep. One test opens, in a fresh browser profile, the
experiment URL `gptlab ui` prints and reads what a user sees on that first page: the runs table (not the GenAI
traces view), the run names in full, the swept fields and `val/bpb` as columns, the sweep points under their parent.
The other goes to the experiment from the home page, selects the sweep points, opens the comparison view and reads
the run names, the swept param and `val/bpb` off the page as a user sees them.

Needs `.ci/browser-up.sh` (installs /usr/bin/chromium and /usr/bin/chromedriver); selenium comes from the `test`
extra. Without them this test fails, it never skips. Screenshots land in the test's tmp dir (paths are printed).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml
from helpers import free_port, make_corpus, stop_group, tiny_spec, wait_for, write_spec
from mlflow.tracking import MlflowClient

from workflows import submit
from workflows.lifecycle import RUNS_VIEW_NAME

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
WAIT_S = 45  # bound on any single wait for the UI (page loads on a busy 2-core machine take a few seconds)
RUN_NAME_CELL = '[col-id="attributes.`Run Name`"]'  # the runs table's "Run Name" column (ag-grid col-id)

# Chromium on a machine with no outside network: without the background-networking flags it keeps retrying
# (component updates, sync, QUIC probes) and floods the log with refused connections.
CHROMIUM_FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1600,1600",
]

# True when `el` is on screen and is what a click at its centre would hit: not clipped away by a scroll
# container, not covered, not outside the viewport. This is "visible" as a user means it.
USER_VISIBLE_JS = """
const el = arguments[0];
const r = el.getBoundingClientRect();
if (r.width === 0 || r.height === 0) return false;
const x = r.left + r.width / 2, y = r.top + r.height / 2;
if (x < 0 || y < 0 || x >= window.innerWidth || y >= window.innerHeight) return false;
const hit = document.elementFromPoint(x, y);
return hit !== null && el.contains(hit);
"""

# True when all of the text of `el` is drawn: the text as laid out on one line (a Range over it) lies inside every
# box that clips it (inside its table cell: their content box, where an ellipsis starts; beyond it, such as the
# grid's scrolled viewport: their padding box) and inside the window. The DOM holds a clipped run name in full (the
# page shows `n_layer=2,po...` for `n_layer=2,pos_encoding=learned`): only the geometry tells.
TEXT_FITS_JS = """
const el = arguments[0];
const range = document.createRange();
range.selectNodeContents(el);
const text = range.getBoundingClientRect();
let inCell = true;
for (let box = el; box; box = box.parentElement) {
  const style = getComputedStyle(box), r = box.getBoundingClientRect();
  const inset = (side) => parseFloat(style[`border${side}Width`]) + (inCell ? parseFloat(style[`padding${side}`]) : 0);
  if (style.overflowX !== "visible" || box.hasAttribute("col-id")) {
    if (text.left < r.left + inset("Left") - 0.5 || text.right > r.right - inset("Right") + 0.5) return false;
  }
  if (box.hasAttribute("col-id")) inCell = false;
}
return text.left >= 0 && text.right <= window.innerWidth;
"""


def require_browser() -> None:
    """Fail (never skip) when the browser or Selenium is missing, before any minute is spent on the sweep."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.is_file()]
    if missing:
        pytest.fail(f"{' and '.join(missing)} missing: run .ci/browser-up.sh (Debian's chromium and chromium-driver)")
    try:
        import selenium  # noqa: F401
    except ImportError:
        pytest.fail("selenium is missing: pip install -e '.[test]' (and run .ci/browser-up.sh for the browser)")


def chromium_driver(profile: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    # An explicit driver path: Selenium Manager (which would try to download a driver) is never consulted.
    return webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    """A finished two-point sweep over two fields (run names such as `n_layer=1,lr=0.003`, longer than MLflow's
    Run Name column shows), `gptlab ui` serving its store on loopback and the experiment URL it printed, and a
    headless Chromium."""
    require_browser()
    tmp = tmp_path_factory.mktemp("browser")
    corpus = make_corpus(tmp / "corpus")
    sweep = {"model.n_layer": [1, 2], "train.lr": [3e-3]}
    spec = write_spec(tmp / "tiny.yaml", tiny_spec(corpus, tmp / "runs", sweep=sweep))
    result = submit(spec, quiet=True, poll_interval=0.5)
    assert result.ok, [r.error for r in result.runs]
    client = MlflowClient(result.tracking_uri)
    children = client.search_runs([result.experiment_id], f"tags.`mlflow.parentRunId` = '{result.parent_run_id}'")
    runs = {r.info.run_name: r for r in children}
    assert set(runs) == {"n_layer=1,lr=0.003", "n_layer=2,lr=0.003"}

    port = free_port()
    # One uvicorn worker (MLflow's default is 4): on a 2-core machine four workers importing MLflow at once
    # take two to three times longer to answer, and one browser needs one.
    env = dict(os.environ, MLFLOW_WORKERS="1")
    log = (tmp / "ui.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "workflows.cli", "ui", "--runs-root", str(tmp / "runs"), "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    driver = None
    try:
        driver = chromium_driver(tmp / "chromium-profile")  # starts while the UI is still importing
        # The UI is for its owner only: `gptlab ui` prints the owner's login link (user name and password in it).
        log_text = lambda: (tmp / "ui.log").read_text()
        lines = wait_for(lambda: [ln for ln in log_text().splitlines() if ln.startswith("  tiny: ")], 90, "links")
        printed = [line.split(": ", 1)[1] for line in lines]  # the experiment's URL
        assert len(printed) == 1, lines
        login = re.search(r" open (\S+) first\.", log_text()).group(1)
        creds = urlsplit(login)
        assert creds.username and creds.password, login
        url = f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/get-by-name?experiment_name=tiny"

        def up() -> bool:
            assert proc.poll() is None, log_text()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as resp:
                    return resp.status == 200
            except OSError:
                return False

        wait_for(up, 90, "gptlab ui to answer", every=0.5)
        with pytest.raises(urllib.error.HTTPError) as refused:  # without them: refused
            urllib.request.urlopen(url, timeout=30)
        assert refused.value.code == 401, refused.value
        os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"] = creds.username, creds.password
        try:
            body = MlflowClient(f"http://127.0.0.1:{port}").get_experiment_by_name("tiny")
        finally:
            del os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]
        assert body.experiment_id == result.experiment_id
        driver.get(login)  # the shared browser logs in once, as a user would
        yield {"driver": driver, "base": f"http://127.0.0.1:{port}/", "result": result, "runs": runs, "dir": tmp,
               "client": client, "url": printed[0], "login": login}  # fmt: skip
    finally:
        if driver is not None:
            driver.quit()
        stop_group(proc)
        log.close()


def shot(ui, name: str, driver=None) -> Path:
    """Save what `driver` (the shared browser unless given) shows to the test's tmp dir."""
    path = ui["dir"] / name
    assert (driver or ui["driver"]).save_screenshot(str(path)), path
    print(f"screenshot: {path}")
    return path


def test_printed_url_opens_the_runs_table_with_the_sweep_in_chromium(ui):
    """A fresh browser (no view state of its own) opens the URL `gptlab ui` printed: the runs table in the view
    the submit saved, every run name in full, the swept fields and val/bpb as columns, each on screen."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    result, runs, url = ui["result"], ui["runs"], ui["url"]
    assert url.startswith(ui["base"]) and "workflowType=machine_learning" in url and "viewStateShareKey=" in url, url
    parent = ui["client"].get_run(result.parent_run_id)
    swept = yaml.safe_load(parent.data.params["swept"])
    assert swept == ["model.n_layer", "train.lr"]

    d = chromium_driver(ui["dir"] / "chromium-fresh-profile")
    try:
        wait = WebDriverWait(d, WAIT_S, ignored_exceptions=[StaleElementReferenceException])
        user_visible = lambda el: bool(d.execute_script(USER_VISIBLE_JS, el))
        text_fits = lambda el: bool(d.execute_script(TEXT_FITS_JS, el))

        def name_link(run_id: str):
            """The run-name link of a run's row in the runs table."""
            return d.find_element(By.CSS_SELECTOR, f'[role="row"][row-id="{run_id}"] {RUN_NAME_CELL} a')

        def cell(run_id: str, column: str):
            """A run's cell in a column of the runs table (its row is split in parts; one holds the column)."""
            return d.find_element(By.CSS_SELECTOR, f'[role="row"][row-id="{run_id}"] [col-id="{column}"]')

        # A fresh profile logs in with the link `gptlab ui` printed (a browser keeps basic-auth credentials for
        # the server; the UI's own pages must not carry them in their URL), then opens the experiment's URL.
        d.get(ui["login"])
        assert "experiments" in d.execute_script("return document.body.innerText"), "the login was refused"
        d.get(url)
        # The runs table, in the saved view: not the GenAI traces view, no "Detect Issues" popup, no dialog.
        wait.until(EC.url_contains(f"/experiments/{result.experiment_id}/runs"))
        views = wait.until(EC.visibility_of_element_located((By.CSS_SELECTOR, '[data-testid="saved-views-trigger"]')))
        wait.until(lambda _: views.text.strip() == RUNS_VIEW_NAME, f"view not applied: {views.text!r}")
        wait.until(lambda _: user_visible(name_link(result.parent_run_id)), "the parent run is not on screen")
        popups = d.find_elements(By.XPATH, "//*[contains(text(), 'Detect Issues')] | //*[@role='dialog']")
        assert not [p for p in popups if p.is_displayed()], [p.text for p in popups if p.is_displayed()]
        assert d.title.startswith("Runs"), d.title

        # The sweep points under their parent. MLflow 3.17 shows a parent run collapsed on a first visit and keeps
        # expanded parents only in the browser (a saved view drops them): one click, as a user would.
        assert not d.find_elements(By.CSS_SELECTOR, f'[role="row"][row-id="{next(iter(runs.values())).info.run_id}"]')
        d.find_element(By.CSS_SELECTOR, f'[role="row"][row-id="{result.parent_run_id}"] {RUN_NAME_CELL} button').click()
        for run in runs.values():
            wait.until(lambda _: user_visible(name_link(run.info.run_id)), f"{run.info.run_name} not on screen")
        top = lambda run_id: name_link(run_id).rect["y"]
        rows = sorted([result.parent_run_id, *(r.info.run_id for r in runs.values())], key=top)
        assert rows[0] == result.parent_run_id, "the sweep points are not under their parent"
        parent_x = name_link(result.parent_run_id).rect["x"]
        assert all(name_link(r.info.run_id).rect["x"] > parent_x for r in runs.values()), "sweep points not nested"

        # Run names in full.
        names = {result.parent_run_id: parent.info.run_name} | {r.info.run_id: n for n, r in runs.items()}
        for run_id, name in names.items():
            link = name_link(run_id)
            assert link.text.strip() == name and user_visible(link), name
            assert text_fits(link), f"run name {name!r} is cut short in the Run Name column"

        # The swept fields and val/bpb: column headers and each sweep point's values, on screen and in full.
        columns = {f"params.`{k}`": k for k in swept} | {"metrics.`val/bpb`": "val/bpb"}
        for column, title in columns.items():
            found = (By.CSS_SELECTOR, f'.ag-header-cell[col-id="{column}"] [data-testid^="sort-header-"]')
            header = wait.until(EC.presence_of_element_located(found))
            assert header.text.strip() == title and user_visible(header), (column, header.text)
            assert text_fits(header), f"column header {title!r} is cut short"
            for run in runs.values():
                value = cell(run.info.run_id, column)
                assert user_visible(value) and text_fits(value), (column, run.info.run_name, value.text)
                if column.startswith("params."):
                    assert value.text.strip() == run.data.params[title], (column, run.info.run_name, value.text)
                else:
                    assert float(value.text) == pytest.approx(run.data.metrics[title], rel=1e-6), value.text
        shot(ui, "mlflow-runs-table.png", d)
    finally:
        d.quit()


def test_compare_view_shows_the_sweep_in_chromium(ui):
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver import ActionChains
    from selenium.webdriver.common.actions.wheel_input import ScrollOrigin
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    d = ui["driver"]
    # The UI re-renders (React): an element found a moment ago may have been replaced; a wait then looks again.
    wait = WebDriverWait(d, WAIT_S, ignored_exceptions=[StaleElementReferenceException])
    runs = ui["runs"]
    parent_id = ui["result"].parent_run_id

    def user_visible(el) -> bool:
        return bool(d.execute_script(USER_VISIBLE_JS, el))

    def run_row(name: str):
        """The runs-table row (its pinned-left part, which holds the checkbox) whose run-name link reads `name`."""
        return wait.until(
            EC.presence_of_element_located(
                (
                    By.XPATH,
                    f"//div[@role='row'][.//a[normalize-space()='{name}']][.//input[contains(@class,'ag-checkbox-input')]]",
                )
            )
        )

    # Home page: the experiment list. MLflow 3 opens in its GenAI mode (traces); sweeps are model training.
    d.get(ui["base"])
    wait.until(
        EC.element_to_be_clickable((By.XPATH, "//div[@role='button'][normalize-space()='Model training']"))
    ).click()
    wait.until(EC.element_to_be_clickable((By.LINK_TEXT, "tiny"))).click()
    wait.until(EC.url_contains(f"/experiments/{ui['result'].experiment_id}/runs"))

    # The runs table shows the parent run; the sweep points are nested under it: expand it.
    parent = run_row("tiny")
    assert parent.get_attribute("row-id") == parent_id
    wait.until(EC.element_to_be_clickable(parent.find_element(By.CSS_SELECTOR, f"{RUN_NAME_CELL} button"))).click()

    # Select both sweep points by their checkboxes.
    for name, run in runs.items():
        row = run_row(name)
        assert row.get_attribute("row-id") == run.info.run_id, name
        box = row.find_element(By.CSS_SELECTOR, "input.ag-checkbox-input")
        box.click()
        wait.until(lambda _: box.is_selected(), f"{name} did not get selected")
    assert not run_row("tiny").find_element(By.CSS_SELECTOR, "input.ag-checkbox-input").is_selected()

    compare = wait.until(EC.element_to_be_clickable((By.CSS_SELECTOR, '[data-testid="runs-compare-button"]')))
    assert compare.text.strip() == "Compare"
    shot(ui, "mlflow-experiment-selected.png")
    compare.click()

    # The comparison view.
    wait.until(EC.url_contains("compare-runs"))
    wait.until(EC.text_to_be_present_in_element((By.TAG_NAME, "h2"), "Comparing 2 Runs"))

    def cells(header: str) -> list:
        """The value cells of the comparison-table row whose row header reads `header`, in column order."""
        row = wait.until(EC.presence_of_element_located((By.XPATH, f"//tr[th[normalize-space()='{header}']]")))
        found = row.find_elements(By.XPATH, "./*[contains(concat(' ', @class, ' '), ' data-value ')]")
        assert len(found) == 2, (header, row.text)
        return found

    # Column order of the runs, from the Run ID header row; everything below is checked against it.
    run_ids = [c.text.strip() for c in cells("Run ID:")]
    assert sorted(run_ids) == sorted(r.info.run_id for r in runs.values()), run_ids
    by_id = {r.info.run_id: r for r in runs.values()}
    columns = [by_id[i] for i in run_ids]

    # The swept param, in the Parameters table (scrolled to it like a user would).
    param_cells = cells("model.n_layer")
    d.execute_script("arguments[0].scrollIntoView({block: 'center'})", param_cells[0])
    shown_layers = [c.text.strip() for c in param_cells]
    assert shown_layers == [r.data.params["model.n_layer"] for r in columns] and sorted(shown_layers) == ["1", "2"]
    wait.until(lambda _: all(user_visible(c) for c in param_cells), "model.n_layer values not visible")

    # val/bpb in the Metrics table: a virtualized grid whose names column follows the values column's scrolling.
    # Scroll the values column with the mouse wheel until the val/bpb row is in view.
    name = wait.until(EC.presence_of_element_located((By.XPATH, "//a[normalize-space()='val/bpb']")))
    name_cell = name.find_element(By.XPATH, "./..")
    names_grid = name.find_element(
        By.XPATH, "./ancestor::div[contains(@class,'ReactVirtualized__Grid')][@role='grid'][1]"
    )
    grids = names_grid.find_elements(By.XPATH, "./ancestor::div[count(.//div[@role='grid']) = 2][1]//div[@role='grid']")
    assert len(grids) == 2 and grids[0] == names_grid, "metrics table layout changed"
    values_grid = grids[1]
    d.execute_script("arguments[0].scrollIntoView({block: 'center'})", values_grid)
    if not user_visible(name_cell):
        scroll_top = lambda grid: d.execute_script("return arguments[0].scrollTop", grid)
        target = d.execute_script(
            "const [cell, names, values] = arguments;"
            "const row = cell.getBoundingClientRect().top - names.getBoundingClientRect().top + names.scrollTop;"
            "const want = row - (values.clientHeight - cell.offsetHeight) / 2;"
            "return Math.round(Math.max(1, Math.min(want, values.scrollHeight - values.clientHeight)));",
            name_cell,
            names_grid,
            values_grid,
        )
        wheel = ScrollOrigin.from_element(values_grid)
        ActionChains(d).scroll_from_origin(wheel, 0, target - scroll_top(values_grid)).perform()
        wait.until(lambda _: abs(scroll_top(values_grid) - target) <= 2, "the metrics table did not scroll")
        # MLflow 3.17's names column follows the values column one scroll event late (it reads the values grid's
        # scrollTop before that grid has stored the new one), so a last 1 px nudge brings it along. (At the very
        # bottom the names stay 15 px behind: the values grid's horizontal scrollbar makes it 15 px shorter.)
        ActionChains(d).scroll_from_origin(wheel, 0, -1).perform()
        wait.until(lambda _: scroll_top(names_grid) > 0, "metric names did not follow the values")
    wait.until(lambda _: user_visible(name_cell), "val/bpb row not scrolled into view")

    def bpb_row_values():
        """The value cells that sit on the val/bpb row on screen, left to right."""
        top, bottom = name_cell.rect["y"], name_cell.rect["y"] + name_cell.rect["height"]
        on_row = [
            c
            for c in values_grid.find_elements(By.XPATH, "./div/div")
            if top <= c.rect["y"] + c.rect["height"] / 2 <= bottom
        ]
        return (
            sorted(on_row, key=lambda c: c.rect["x"]) if len(on_row) == 2 and all(map(user_visible, on_row)) else False
        )

    bpb_cells = wait.until(lambda _: bpb_row_values(), "val/bpb values not visible on its row")
    shown = [c.text.strip() for c in bpb_cells]
    for text, run in zip(shown, columns):
        # MLflow shows metrics below 10 rounded to 3 decimals (4.527382... -> "4.527").
        assert float(text) == pytest.approx(run.data.metrics["val/bpb"], abs=5e-4 + 1e-9), (shown, run.info.run_name)

    # Run names last: scroll the page back to "Run details", so one screenshot holds all three checks.
    name_cells = cells("Run Name:")
    d.execute_script(
        "arguments[0].scrollIntoView({block: 'start'})",
        d.find_element(By.XPATH, "//div[@role='button'][normalize-space()='Run details']"),
    )
    assert [c.text.strip() for c in name_cells] == [r.info.run_name for r in columns]
    wait.until(lambda _: all(user_visible(c) for c in name_cells), "run names not visible")
    # The window is tall enough for run names, the swept param and val/bpb to share one screen: the screenshot
    # then shows everything this test asserted.
    assert all(user_visible(c) for c in param_cells + bpb_cells + [name_cell]), "not all on one screen any more"
    shot(ui, "mlflow-compare.png")
