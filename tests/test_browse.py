"""browse.html: the page the job writes per split, checked as a file and in real headless Chromium inside the
MLflow UI's own artifact view of the session's real `mlflow server`."""

from __future__ import annotations

import base64
import json
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.conftest import ROOT, run_command
from tracking import contract
from tracking.errors import ActionScoresError
from tracking.record.media import encode_png
from tracking.report.browse import BROWSE_FILE, write_browse_page
from tracking.report.views import SplitView, decode_png

SHOTS = ROOT / "bench" / "results" / "browse"


def _page_data(path: Path) -> dict:
    """The JSON the page embeds."""
    found = re.search(r'<script id="data" type="application/json">(.*?)</script>', path.read_text(), re.S)
    return json.loads(found.group(1).replace("<\\/", "</"))


def _view() -> SplitView:
    return SplitView(lambda i: np.full((4, 4), i % 256, np.uint8), lambda row: f"class {int(row['target'])}")


def _scores(n: int) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    return pd.DataFrame({"sample_id": np.arange(n), "action": rng.random(n) * 10, "aum": rng.random(n) - 0.5,
                         "target": rng.integers(0, 3, n), "epochs": 3})


def test_small_split_embeds_every_sample_with_its_picture_and_scores(tmp_path: Path) -> None:
    scores = _scores(20)
    page = write_browse_page(scores, _view(), tmp_path / BROWSE_FILE, "test: browse")
    data = _page_data(page)
    assert data["note"] == "" and data["total"] == 20
    assert [s["id"] for s in data["samples"]] == list(range(20))
    seven = data["samples"][7]
    assert seven["img"] == "data:image/png;base64," + base64.b64encode(encode_png(np.full((4, 4), 7, np.uint8))).decode()
    assert seven["s"]["action"] == pytest.approx(scores["action"][7]) and seven["label"] == f"class {scores['target'][7]}"
    assert [(s["name"], s["harder"]) for s in data["scores"]] == [("action", True), ("aum", False)]
    assert data["map"]["x"] == "rank"  # no dynamics: action against rank
    assert seven["s"]["rank"] == int((scores["action"] > scores["action"][7]).sum()) + 1
    assert "http" not in page.read_text().replace("http://www.w3.org/2000/svg", "")  # nothing to fetch


def test_a_split_over_the_limit_keeps_the_hardest_and_easiest_of_each_score_and_says_so(tmp_path: Path) -> None:
    scores = _scores(200)
    data = _page_data(write_browse_page(scores, _view(), tmp_path / BROWSE_FILE, "t", max_samples=40))
    per_score = 40 // 4
    expected = set()
    for column, harder in (("action", True), ("aum", False)):
        ordered = scores.sort_values(column, ascending=not harder)["sample_id"]
        expected |= set(ordered[:per_score]) | set(ordered[-per_score:])
    assert {s["id"] for s in data["samples"]} == expected
    assert data["note"].startswith(f"{len(expected)} of 200 samples: the {per_score} hardest and {per_score} easiest")


def test_recorded_thumbnails_are_embedded_as_recorded_and_other_pictures_encoded(tmp_path: Path) -> None:
    from tracking.record import record_media
    from tracking.report.views import media_view, read_media

    rng = np.random.default_rng(1)
    digits = rng.integers(0, 256, (6, 8, 8), dtype=np.uint8)
    recorded = read_media(record_media(None, "test", np.arange(6), labels=list("abcdef"), images=digits,
                                       local_dir=tmp_path / "media").path, "test")
    large = rng.integers(0, 256, (100, 80, 3), dtype=np.uint8)  # a table written by hand: a PNG over 64 px
    media = pd.concat([recorded, pd.DataFrame({contract.MEDIA_KIND: ["image"], contract.LABEL_NAME: ["g"],
                                               contract.IMAGE_PNG: [encode_png(large, side=1000)]},
                                              index=pd.Index([6], name=contract.SAMPLE_ID))])
    scores = _scores(7)
    view = media_view(scores, media)
    data = _page_data(write_browse_page(view.frame(scores), view, tmp_path / BROWSE_FILE, "t"))
    shown = {s["id"]: base64.b64decode(s["img"].split(",", 1)[1]) for s in data["samples"]}
    assert [shown[i] for i in range(6)] == list(recorded["image_png"])  # the table's own bytes, not re-encoded
    assert [s["label"] for s in data["samples"]] == list("abcdefg")
    assert shown[6] == encode_png(large) and decode_png(shown[6]).shape == (64, 51, 3)  # thumbnailed, as before


def test_a_table_without_scores_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ActionScoresError, match="no samples or no registered score columns to browse"):
        write_browse_page(pd.DataFrame({"sample_id": [0, 1]}), _view(), tmp_path / BROWSE_FILE, "t")


def _browser():
    """Debian's chromium through selenium and Debian's chromedriver, logging every network request."""
    webdriver = pytest.importorskip("selenium.webdriver")
    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if binary is None or driver is None:
        pytest.skip("no chromium/chromedriver: apt-get install -y chromium chromium-driver (scripts/setup.sh test)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1600,1100"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    return webdriver.Chrome(service=Service(driver), options=options)


def test_page_inside_the_mlflow_ui_shows_the_clicked_sample_and_fetches_nothing(
        mlflow_server: str, tracking_env: dict[str, str], client) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import WebDriverWait

    from experiments.datasets import load_split

    experiment = "browse-ui"
    run_command([sys.executable, "-m", "experiments.classify", "--epochs", "2", "--experiment", experiment],
                tracking_env)
    run_command([sys.executable, "-m", "tracking.cli", "analyze", "--experiment", experiment], tracking_env)
    found = client.get_experiment_by_name(experiment)
    run_id = client.search_runs([found.experiment_id])[0].info.run_id
    url = f"{mlflow_server}/#/experiments/{found.experiment_id}/runs/{run_id}/artifacts/action_scores/test/{BROWSE_FILE}"
    browser = _browser()
    try:
        browser.get(url)
        wait = WebDriverWait(browser, 120)
        wait.until(ready.frame_to_be_available_and_switch_to_it((By.CSS_SELECTOR, "iframe")))
        tile = wait.until(ready.element_to_be_clickable((By.CSS_SELECTOR, ".tile[data-sample-id]")))
        tiles = browser.find_elements(By.CSS_SELECTOR, ".tile[data-sample-id]")
        clicked = tiles[3]
        sample_id = int(clicked.get_attribute("data-sample-id"))
        clicked.click()
        detail = browser.find_element(By.ID, "detail")
        assert int(detail.get_attribute("data-sample-id")) == sample_id
        assert detail.find_element(By.CSS_SELECTOR, ".sid").text == str(sample_id)
        picture = load_split("digits", "test").picture(sample_id)
        shown = detail.find_element(By.TAG_NAME, "img").get_attribute("src")
        assert shown.startswith("data:image/png;base64,")  # the recorded thumbnail, embedded as it is
        assert np.array_equal(decode_png(base64.b64decode(shown.split(",", 1)[1])), picture)
        point = browser.find_element(By.CSS_SELECTOR, f'#map circle[data-sample-id="{sample_id}"]')
        assert "sel" in point.get_attribute("class")  # the scatter marks the same sample
        assert tile.get_attribute("data-sample-id")  # every grid element names its sample
        browser.switch_to.default_content()
        time.sleep(1)
        SHOTS.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(SHOTS / "browse-in-mlflow-ui.png"))
        requests = [json.loads(entry["message"])["message"] for entry in browser.get_log("performance")]
    finally:
        browser.quit()
    urls = [m["params"]["request"]["url"] for m in requests if m["method"] == "Network.requestWillBeSent"]
    assert any(BROWSE_FILE in u for u in urls)  # the UI fetched the artifact from its own server
    outside = [u for u in urls if not u.startswith((mlflow_server, "data:", "blob:", "about:"))]
    assert outside == []
