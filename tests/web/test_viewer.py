"""The OHIF viewer, served by `appliance serve` at /viewer, opens a stored CT study in Debian's
headless chromium (driven by playwright-core: viewer_screenshot.js) and draws it.

With PACS_VAULT_SCREENSHOTS=1 the screenshot also goes to tests/screenshots/ohif-viewer.png,
the picture in the README."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pydicom
from PIL import Image, ImageStat

from conftest import REPO, set_config

from support.dicomweb import WebServer, add_token

from appliance.web.viewer import VIEWER_DIR

HERE = Path(__file__).parent


def test_the_viewer_draws_a_stored_ct_study(home, tmp_path, ct_files):
    assert (VIEWER_DIR / "index.html").is_file(), "make test fetches the viewer (make viewer)"
    assert (HERE / "node" / "node_modules" / "playwright-core").is_dir(), "make test installs playwright-core"
    assert shutil.which("node") and Path("/usr/bin/chromium").exists()
    set_config(home, "  viewer: false", "  viewer: true")
    store = add_token(home, "modality", "store")
    view = add_token(home, "viewer", "query,retrieve")
    server = WebServer(home).start()
    try:
        server.client(store).store_instances([pydicom.dcmread(p) for p in ct_files])
        study = pydicom.dcmread(ct_files[0]).StudyInstanceUID
        assert server.get("/viewer/app-config.js", None).status_code == 200  # the viewer's files need no token
        url = f"http://127.0.0.1:{server.web_port}/viewer/viewer?StudyInstanceUIDs={study}&token={view}"
        shot = tmp_path / "viewer.png"
        result = subprocess.run(["node", str(HERE / "viewer_screenshot.js"), url, str(shot), str(tmp_path / "profile")],
                                capture_output=True, text=True, timeout=240)
        page = json.loads(result.stdout.strip().splitlines()[-1])
    finally:
        assert server.stop() == 0
    assert page["drawn"], result.stderr[-2000:]
    assert "DOE, JANE" in page["text"]  # the patient's name, in the viewer's header
    image = Image.open(shot).convert("L")
    width, height = image.size
    area = image.crop((width // 3, height // 4, width * 5 // 6, height * 3 // 4))  # the viewport's middle
    stats = ImageStat.Stat(area)
    assert stats.stddev[0] > 20 and max(area.getextrema()) > 150, stats.stddev  # an image, not a blank area
    log = server.log.read_text()
    assert view not in log and "DOE" not in log
    if os.environ.get("PACS_VAULT_SCREENSHOTS") == "1":
        shutil.copyfile(shot, REPO / "tests" / "screenshots" / "ohif-viewer.png")
