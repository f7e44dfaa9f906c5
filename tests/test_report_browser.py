"""The report in a real headless Chromium, served by a localhost static server."""

import functools
import http.server
import json
import re
import shutil
import subprocess
import threading
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--enable-logging=stderr", "--v=0", "--virtual-time-budget=8000"]

# Same-origin checker: loads the report in an iframe and writes what it finds into its own DOM.
CHECK_PAGE = """<!DOCTYPE html><html><body><pre id="out">pending</pre>
<iframe id="f" src="report/index.html" width="1200" height="800"></iframe>
<script>
const f = document.getElementById('f');
const errors = [];
f.addEventListener('load', () => {
  const w = f.contentWindow, d = f.contentDocument;
  w.addEventListener('error', e => errors.push(String(e.message)));
  const imgs = Array.from(d.images);
  const wait = imgs.map(i => i.complete ? Promise.resolve() : new Promise(r => { i.onload = i.onerror = r; }));
  Promise.all(wait).then(() => {
    const broken = imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.getAttribute('src'));
    const sections = Array.from(d.querySelectorAll('section[id^="cluster-"]')).map(s => s.id);
    document.getElementById('out').textContent = 'RESULT' + JSON.stringify({images: imgs.length, broken, sections,
      noAlt: imgs.filter(i => !i.alt).length, errors});
  });
});
</script></body></html>"""


@pytest.fixture
def served_report(finished_run, tmp_path):
    _, out, _, _ = finished_run
    root = tmp_path / "site"
    shutil.copytree(out / "report", root / "report")
    (root / "check.html").write_text(CHECK_PAGE)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (make test installs it as root)")
def test_report_in_headless_chromium(served_report, tmp_path):
    profile = ["--user-data-dir=" + str(tmp_path / "chromium-profile")]
    r = subprocess.run([CHROMIUM, *FLAGS, *profile, "--dump-dom", f"{served_report}/check.html"],
                       capture_output=True, text=True, timeout=120)
    m = re.search(r"RESULT(\{.*?\})</pre>", r.stdout)
    assert m, r.stdout[-2000:] + r.stderr[-2000:]
    result = json.loads(m.group(1).replace("&quot;", '"'))
    assert result["broken"] == [] and result["noAlt"] == 0 and result["errors"] == []
    assert result["sections"] == ["cluster-0", "cluster-1", "cluster-2"]
    assert result["images"] == 4 + 2 * 3
    console_errors = [line for line in r.stderr.splitlines() if "CONSOLE" in line and "report/" in line]
    assert console_errors == []
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "report.png"
    subprocess.run([CHROMIUM, *FLAGS, *profile, "--window-size=1200,1800", f"--screenshot={shot}",
                    f"{served_report}/report/index.html"], capture_output=True, timeout=120, check=True)
    assert shot.stat().st_size > 10_000
