"""`cctview report` on a run made by hand: two cameras whose vehicles reappear 20 s
later, real JPEG frames to cut crops from, a link, dead letters. The page must hold the
precision estimate (target-decoy), the control's dt histogram, the links, the score
distributions and the gallery, and render in headless Chromium: no console errors,
every image loaded, a non-blank screenshot."""
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines import report
from pipelines.cli import main

T0 = 1714564800000  # 2024-05-01T12:00Z
LINKS = [{"camera_a": "c1", "camera_b": "c2", "offset_s": 20.0, "spread_s": 5.0,
          "support": 50, "significance": 9.0}]


def _frames(root: Path) -> list:
    """Four frames of coloured boxes; detections point at them (one is missing)."""
    rng = np.random.default_rng(1)
    uris = []
    for k in range(3):
        pixels = rng.integers(0, 255, (120, 160, 3), dtype=np.uint8)
        path = root / "frames" / ("f%d.jpeg" % k)
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path)
        uris.append(str(path))
    return uris + [str(root / "frames" / "moved-away.jpeg")]


def _run(root: Path, with_scores: bool = False) -> Path:
    """A run's folder: detections, matches (mutual NN in the link's band), dead letters,
    match_settings.json."""
    from transforms.match_blocks import match_arrays

    rng = np.random.default_rng(0)
    uris = _frames(root)
    dets, n = [], 0
    for v in range(160):  # a vehicle every 4 s at c1; 70% reach c2 20 +- 1.5 s later
        identity, t = rng.normal(size=16), T0 + v * 4000
        sightings = [("c1", t, identity)]
        if rng.random() < 0.7:
            sightings.append(("c2", t + int(rng.normal(20000, 1500)), identity))
        if rng.random() < 0.5:  # traffic that only c2 sees
            sightings.append(("c2", t + int(rng.uniform(0, 4000)), rng.normal(size=16)))
        for cam, ts, base in sightings:
            n += 1
            dets.append({"camera_id": cam, "frame_ts_ms": ts, "detection_id": "d%04d" % n,
                         "frame_uri": uris[n % 4], "label": "car", "score": 0.9,
                         "box_xyxy": [10.0, 10.0, 60.0, 50.0],
                         "embedding": (base + rng.normal(scale=0.6, size=16)).astype(np.float32)})
    out = root / "run"
    (out / "detections").mkdir(parents=True)
    pq.write_table(pa.table({
        "camera_id": [d["camera_id"] for d in dets],
        "frame_ts": pa.array([d["frame_ts_ms"] for d in dets], pa.timestamp("ms", "UTC")),
        "frame_uri": [d["frame_uri"] for d in dets],
        "detection_id": [d["detection_id"] for d in dets],
        "label": [d["label"] for d in dets],
        "score": pa.array([d["score"] for d in dets], pa.float32()),
        "box_xyxy": pa.array([d["box_xyxy"] for d in dets], pa.list_(pa.float32(), 4)),
        "embedding": pa.array([d["embedding"].tolist() for d in dets], pa.list_(pa.float32())),
    }), out / "detections" / "part-00000.parquet")
    matches = match_arrays([d["camera_id"] for d in dets], [d["frame_ts_ms"] for d in dets],
                           np.stack([d["embedding"] for d in dets]),
                           [d["detection_id"] for d in dets], policy="mutual", links=LINKS)
    assert len(matches) > 50
    columns = {k: [m[k] for m in matches] for k in (
        "detection_id_a", "detection_id_b", "camera_id_a", "camera_id_b", "dt_seconds",
        "distance", "policy")}
    if with_scores:
        columns["score"] = [1.0 / (1.0 + m["distance"]) for m in matches]
        columns["q_value"] = list(np.linspace(0.01, 0.6, len(matches)))
    (out / "matches").mkdir()
    pq.write_table(pa.table(columns), out / "matches" / "part-00000.parquet")
    (out / "dead_letter").mkdir()
    pq.write_table(pa.table({
        "uri": ["/x/a.jpeg", "/x/b.jpeg", "/x/notes.txt"],
        "stage": ["decode", "decode", "parse"],
        "reason": ["corrupt_image", "corrupt_image", "unparseable_path"],
        "error": ["", "", ""], "ts": ["", "", ""]}), out / "dead_letter" / "part-00000.parquet")
    settings = {"policy": "mutual", "metric": "l2", "max_gap_s": 300.0, "window_s": 600.0,
                "threshold": None, "top_k": 1, "links": LINKS}
    (out / "match_settings.json").write_text(json.dumps(settings))
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    run = _run(root, with_scores=True)
    page = Path(report.build_report(str(run), str(root / "report"), gallery=4))
    return run, page


def test_the_page_answers_what_a_user_must_judge(built):
    _, page = built
    text = page.read_text()
    for heading in ("Estimated precision (target-decoy)", "c1 &rarr; c2", "Links",
                    "Score and q-value", "Match gallery", "Dead letters by reason"):
        assert heading in text, heading
    # the estimate found the planted traffic: significant, precision well above zero
    table = text.split("Estimated precision (target-decoy)")[1].split("</table>")[0]
    row = table.split("<tr>")[-1]
    cells = [re.sub(r"<[^>]+>", "", c) for c in row.split("</td>")[:-1]]
    assert cells[0] == "c1" and cells[1] == "c2"
    target, decoy, precision = int(cells[2]), int(cells[3]), float(cells[6])
    assert target > 50 and decoy < target and precision > 0.5, cells
    assert "significant" in cells[8] and "not significant" not in cells[8]
    assert "[+15.0, +25.0]" in text  # the link's band
    assert "corrupt_image</td><td>2</td>" in text.replace(' class=l', "")
    # every image is a file beside the page, nothing from elsewhere
    sources = [s.split('"')[0] for s in text.split('src="')[1:]]
    assert sources and all(s.startswith("images/") for s in sources)
    assert all((page.parent / s).is_file() for s in sources)
    assert "http" not in text.replace("http-equiv", "")


def test_gallery_zero_writes_no_crops_and_missing_settings_say_so(tmp_path):
    run = _run(tmp_path)
    (run / "match_settings.json").unlink()
    page = Path(report.build_report(str(run), str(tmp_path / "r"), gallery=0))
    text = page.read_text()
    assert "Match gallery" not in text and not list((tmp_path / "r" / "images").glob("*crops*"))
    assert "no match_settings.json" in text
    # a 'cctview evaluate' table given instead is shown as it is
    table = tmp_path / "table.json"
    table.write_text(json.dumps([{"camera_a": "c1", "camera_b": "c2", "target_hits": 100,
                                  "decoy_hits": 10, "false": 10.0, "excess": 90.0,
                                  "precision": 0.9}]))
    assert main(["report", "--input", str(run), "--output", str(tmp_path / "r2"),
                 "--evaluation", str(table)]) == 0
    assert "<td>0.90</td>" in (tmp_path / "r2" / "index.html").read_text()


def _browser():
    """A headless Chromium through selenium, or a skip saying what is missing."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium not installed "
                                    "(it is in the [test] extra)")
    from selenium.webdriver.chrome.service import Service

    binary = next(filter(None, map(shutil.which, ("chromium", "chromium-browser",
                                                  "google-chrome"))), None)
    driver = shutil.which("chromedriver")
    if not binary or not driver:
        pytest.skip("no Chromium and chromedriver on PATH (.ci/run installs Debian's "
                    "chromium and chromium-driver)")
    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1100,1400",
                 "--allow-file-access-from-files"):
        options.add_argument(flag)
    options.binary_location = binary
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(driver), options=options)


def test_the_report_renders_in_headless_chromium(built, tmp_path):
    _, page = built
    browser = _browser()
    try:
        browser.get(page.as_uri())
        state = browser.execute_script(
            "return [document.readyState, document.images.length, Array.from("
            "document.images).filter(i => !(i.complete && i.naturalWidth > 0))"
            ".map(i => i.src)]")
        errors = [e for e in browser.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
        shot = tmp_path / "shot.png"
        browser.save_screenshot(str(shot))
    finally:
        browser.quit()
    assert state[0] == "complete" and state[1] > 10
    assert state[2] == [], state[2]  # every image loaded
    assert errors == []
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert pixels.std() > 10  # text, tables and charts, not a blank page
    assert (pixels < 128).mean() > 0.01


def test_the_browser_test_fails_on_a_broken_image(built, tmp_path):
    """The check that every image loads can fail: a page with a missing image."""
    _, page = built
    broken = tmp_path / "index.html"
    broken.write_text(page.read_text().replace('src="images/', 'src="%s/images/' % page.parent)
                      + '<img src="images/missing.png">')
    browser = _browser()
    try:
        browser.get(broken.as_uri())
        missing = browser.execute_script(
            "return Array.from(document.images).filter(i => !(i.complete && "
            "i.naturalWidth > 0)).length")
        errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    finally:
        browser.quit()
    assert missing == 1 and errors
