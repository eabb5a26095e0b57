"""The inspect report as a user sees it: `gptlab inspect --pretrained` writes report.html for a small GPT-2-shaped
folder, and headless Chromium (driven as in test_browser.py) opens it from disk in a fresh profile. The test reads
what is on the page: its title, every figure decoded and drawn, a layer's figure after opening it, the tokens table,
the logit-lens table and the coloured passage; and that the page fetched nothing (its only resources are the images
inside it). The screenshot lands in the test's tmp dir (its path is printed).

Needs `.ci/browser-up.sh` (Chromium and chromedriver); without them this test fails, it never skips.
"""

from __future__ import annotations

import json

import pytest
from helpers import gpt2_folder, make_corpus
from test_browser import chromium_driver, require_browser
from typer.testing import CliRunner

from workflows.cli import app

pytestmark = [pytest.mark.browser, pytest.mark.slow]

# True when an image has been decoded and drawn at a size: what "the figure shows" means to a user.
RENDERED_JS = """const img = arguments[0];
return img.complete && img.naturalWidth > 0 && img.getBoundingClientRect().width > 0;"""
RESOURCES_JS = "return performance.getEntriesByType('resource').map(e => e.name.slice(0, 40));"


def test_the_report_opens_from_disk_with_its_figures_and_tables(tmp_path):
    require_browser()
    corpus = make_corpus(tmp_path / "corpus", n_docs=4)
    folder = gpt2_folder(tmp_path / "gpt2", corpus)
    (tmp_path / "passage.txt").write_text((corpus / "doc001.txt").read_text())
    out = tmp_path / "report"
    result = CliRunner().invoke(app, ["inspect", "--pretrained", str(folder), "--prompt", "The cat sat on",
                                      "--text", str(tmp_path / "passage.txt"), "--out", str(out)])  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "inspect.json").read_text())
    tokens = summary["prompts"][0]["tokens"]
    from selenium.webdriver.common.by import By

    driver = chromium_driver(tmp_path / "chromium-fresh-profile")
    try:
        driver.get((out / "report.html").as_uri())
        assert driver.title == f"Inside the model: {folder}"
        assert driver.find_element(By.TAG_NAME, "h1").text == f"Inside the model: {folder}"
        shown = [img for img in driver.find_elements(By.TAG_NAME, "img") if img.is_displayed()]
        names = [img.get_attribute("data-file") for img in shown]
        assert names == ["prompt0_attention.png", "prompt0_logit_lens.png", "positions.png", "token_loss.png"]
        for img in shown:
            driver.execute_script("arguments[0].scrollIntoView()", img)
            assert driver.execute_script(RENDERED_JS, img), img.get_attribute("data-file")
        layer = driver.find_elements(By.CSS_SELECTOR, "details")[1]
        assert not layer.find_element(By.TAG_NAME, "img").is_displayed()
        layer.find_element(By.TAG_NAME, "summary").click()  # a user opens "layer 1"
        assert driver.execute_script(RENDERED_JS, layer.find_element(By.TAG_NAME, "img"))
        rows = driver.find_elements(By.CSS_SELECTOR, "table.tokens tr")[1:]
        cells = [[td.text for td in row.find_elements(By.TAG_NAME, "td")] for row in rows]
        assert [c[0] for c in cells] == [str(i) for i in range(len(tokens))]
        assert [c[1] for c in cells] == [t.replace(" ", "·") for t in tokens]  # spaces shown as middle dots
        assert [c[2] for c in cells] == [str(i) for i in summary["prompts"][0]["ids"]]
        lens = driver.find_elements(By.CSS_SELECTOR, "table.lens tr")
        assert [r.find_element(By.TAG_NAME, "th").text for r in lens] == ["embed", "block 0", "block 1"]
        spans = driver.find_elements(By.CSS_SELECTOR, "pre.passage span.tok")
        assert len(spans) == summary["passage"]["tokens"] + 1
        assert spans[1].get_attribute("title").startswith("loss ")
        passage = driver.find_element(By.CSS_SELECTOR, "pre.passage").text  # as laid out: newlines and all
        assert passage.strip() == (tmp_path / "passage.txt").read_text()[:2000].strip()
        fetched = driver.execute_script(RESOURCES_JS)
        assert all(name.startswith("data:image/png") for name in fetched), fetched  # nothing from a network
        driver.execute_script("window.scrollTo(0, 0)")
        shot = tmp_path / "report.png"
        assert driver.save_screenshot(str(shot))
        print(f"screenshot: {shot}")
    finally:
        driver.quit()
