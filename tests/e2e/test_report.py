"""`steadytrain report` on a real run with a restart and a skipped step, viewed in Chromium."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import matplotlib.image
import pytest

from tests.helpers import run_steadytrain

PLOTS = ("loss_lr", "throughput", "phases", "health", "ranks")


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if found := shutil.which(name):
            return found
    return None


def test_report_writes_every_plot_and_a_self_contained_page(restarted_run: Path) -> None:
    result = run_steadytrain("report", restarted_run)
    assert result.returncode == 0, result.output
    report = restarted_run / "report"
    for name in PLOTS:
        image = matplotlib.image.imread(report / f"{name}.png")
        assert image.shape[0] > 100 and image.shape[1] > 100, name
    page = (report / "index.html").read_text()
    assert page.count('src="data:image/png;base64,') == len(PLOTS)
    assert not re.search(r'src="(?!data:)', page), "the page must not load anything"
    assert "finished" in page and "<th>restarts</th><td>1</td>" in page


def test_the_page_opens_in_headless_chromium_with_every_image_and_no_console_message(
    restarted_run: Path, tmp_path: Path
) -> None:
    browser = chromium()
    if browser is None:
        pytest.skip("Chromium is not installed (make test installs it where apt-get can)")
    assert run_steadytrain("report", restarted_run).returncode == 0
    page = (restarted_run / "report" / "index.html").as_uri()
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000"]
    dom = subprocess.run(
        [browser, *flags, "--enable-logging=stderr", "--v=0", "--dump-dom", page],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert dom.returncode == 0, dom.stderr
    assert f'<p id="images-loaded">{len(PLOTS)} of {len(PLOTS)} images loaded</p>' in dom.stdout
    console = [line for line in dom.stderr.splitlines() if ":CONSOLE" in line]
    assert console == [], console
    screenshot = tmp_path / "report.png"  # the test's artefact: what a reader sees
    subprocess.run(
        [browser, *flags, "--window-size=1000,1600", f"--screenshot={screenshot}", page],
        capture_output=True,
        timeout=120,
        check=True,
    )
    assert matplotlib.image.imread(screenshot).shape[:2] == (1600, 1000)
    print(f"screenshot of the report page: {screenshot}")


def test_report_of_a_directory_without_steps_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "events.jsonl").write_text("")
    result = run_steadytrain("report", tmp_path)
    assert result.returncode == 2, result.output
    assert "Traceback" not in result.output
    [line] = result.stderr.splitlines()
    assert "no logged step" in line
