"""imgclust serve in Debian's headless chromium, driven by Playwright (which never downloads a
browser here: it is pointed at the system's). Screenshots go to test-artifacts/."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from imgclust.members import MemberLayout
from imgclust.runstore import RunStore

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (make browser)")


@pytest.fixture
def served(finished_run, tmp_path):
    """``imgclust serve`` on a copy of the finished run, on a free port; yields (root, store, url)."""
    root, out, _, _ = finished_run
    shutil.copytree(out, tmp_path / "run")
    store = RunStore(str(tmp_path / "run"))
    proc = subprocess.Popen([sys.executable, "-m", "imgclust.cli", "serve", store.url, "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    try:
        line = proc.stdout.readline()
        found = re.search(r"at (http://127\.0\.0\.1:\d+/)", line)
        assert found, (line, proc.stderr.read() if proc.poll() is not None else "")
        yield root, store, found.group(1)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_a_person_browses_searches_renames_and_splits_in_a_real_browser(served):
    from playwright.sync_api import sync_playwright

    root, store, url = served
    ARTIFACTS.mkdir(exist_ok=True)
    layout = MemberLayout.open(store)
    largest = max(layout.clusters, key=lambda c: (layout.clusters[c][1], -c))
    first, size = layout.clusters[largest]
    last_path = layout.read(first + size - 1, first + size)["path"].iloc[0]
    manifest = store.read_table("manifest")
    query_path, query_index = manifest["path"].iloc[5], int(manifest["index"].iloc[5])
    problems: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
        page.on("pageerror", lambda e: problems.append(f"page error: {e}"))

        def broken_images() -> list[str]:
            page.wait_for_load_state("networkidle")
            return page.eval_on_selector_all(
                "img", "imgs => imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src)")

        page.goto(url)
        rows = page.locator("tr[data-cluster]")
        assert rows.count() == len(layout.clusters)
        assert broken_images() == []
        page.screenshot(path=str(ARTIFACTS / "serve-overview.png"), full_page=True)

        page.click(f'tr[data-cluster="{largest}"] td a')  # sorted by size: the largest cluster is first
        page.wait_for_url(re.compile(rf"/cluster/{largest}$"))
        assert broken_images() == []
        page.screenshot(path=str(ARTIFACTS / "serve-cluster.png"), full_page=True)
        per = 12  # pages of 12 images, so that this small run has several
        page.goto(f"{url}cluster/{largest}?per={per}")
        page.locator('a[rel="last"]').first.click()
        page.wait_for_url(re.compile(rf"page={-(-size // per)}&per={per}$"))
        assert page.locator("figure.member").last.get_attribute("data-path") == last_path
        assert broken_images() == []
        page.screenshot(path=str(ARTIFACTS / "serve-cluster-last-page.png"), full_page=True)

        page.set_input_files('form.upload input[type="file"]', str(root / query_path))
        page.click("form.upload button")
        page.wait_for_url(re.compile(r"/similar$"))
        assert page.locator("figure.member").first.get_attribute("data-index") == str(query_index)
        assert broken_images() == []
        page.screenshot(path=str(ARTIFACTS / "serve-similar.png"), full_page=True)

        page.goto(f"{url}cluster/{largest}")
        page.fill('form[data-action="rename"] input[name="name"]', "the biggest one")
        with page.expect_navigation():
            page.click('form[data-action="rename"] button')
        page.reload()
        assert page.locator("h1").inner_text() == "the biggest one"
        page.goto(url)
        assert "the biggest one" in page.locator(f'tr[data-cluster="{largest}"]').inner_text()

        page.goto(f"{url}cluster/{largest}")  # split it in two: re-clustered on a worker, then the overview
        page.fill('form[data-action="split"] input[name="parts"]', "2")
        with page.expect_navigation(url=re.compile(r"/$"), timeout=300_000):
            page.click('form[data-action="split"] button')
        assert page.locator("tr[data-cluster]").count() == len(layout.clusters) + 1
        parts = page.locator("tr[data-cluster]", has_text=f"(split of cluster {largest})")
        ids = sorted(int(parts.nth(i).get_attribute("data-cluster")) for i in range(parts.count()))
        assert len(ids) == 2 and largest in ids  # the cluster keeps its id for one part, the other is new
        sizes = [int(page.locator(f'tr[data-cluster="{c}"] td.num').first.inner_text().replace(",", "")) for c in ids]
        assert min(sizes) > 0 and sum(sizes) == size
        assert broken_images() == []
        page.screenshot(path=str(ARTIFACTS / "serve-split.png"), full_page=True)

        page.goto(f"{url}map")
        page.wait_for_selector("canvas[data-points]")
        box = page.locator("#map").bounding_box()
        page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        time.sleep(0.3)
        page.screenshot(path=str(ARTIFACTS / "serve-map.png"))
        assert int(page.locator("#map").get_attribute("data-points")) == min(3000, layout.rows)

        page.goto(f"{url}cluster/99999")
        assert "there is no cluster 99999" in page.locator("main").inner_text()
        browser.close()
    problems = [p for p in problems if "404" not in p]  # the page asked for above is meant to be missing
    assert problems == []
