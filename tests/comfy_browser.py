"""Load UI-format workflows in ComfyUI's real frontend (headless Chromium via Playwright) and
report, per workflow, the node types the frontend does not know and the console/page errors.

    python comfy_browser.py URL WORKFLOW.json [...] [--screenshots DIR]

Prints one JSON object: {workflow path: {"missing": [...], "errors": [...], "nodes": N}}.
Runs under the python of the ComfyUI environment (needs `playwright` and a system Chromium,
$CHROMIUM or chromium on PATH). Requests to other hosts are blocked.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import urllib.parse
import urllib.request
from pathlib import Path

# benign messages of a stock install: optional user files answering 404, blocked external calls,
# and frontend 1.27's own settings start-up (a TypeError inside addSetting, with or without packs)
BENIGN = re.compile(r"/user\.css|/api/userdata|status of 404|net::ERR_FAILED|net::ERR_ABORTED|"
                    r"reading 'id'\)[\s\S]*addSetting")

LOAD = """
async (wf) => {
  await app.loadGraphData(wf, true, true, null);
  await new Promise(r => setTimeout(r, 300));
  const known = LiteGraph.registered_node_types;
  const unknown = wf.nodes.map(n => n.type).filter(t => !known[t]);
  const dialogs = Array.from(document.querySelectorAll('.p-dialog')).map(d => d.innerText).join(' ');
  return {unknown, missingDialog: /missing/i.test(dialogs), nodes: app.graph.nodes.length,
          broken: app.graph.nodes.filter(n => n.has_errors).map(n => n.type)};
}
"""


def settle(url: str) -> None:
    """Skip the first-run template dialog of a fresh user directory."""
    req = urllib.request.Request(url + "/api/settings/Comfy.TutorialCompleted", data=b"true",
                                 headers={"Content-Type": "application/json"})
    urllib.request.urlopen(req, timeout=30).read()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("workflows", nargs="+")
    ap.add_argument("--screenshots")
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    url = args.url.rstrip("/")
    host = urllib.parse.urlparse(url).netloc
    chromium = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    settle(url)
    report = {}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True,
                                    args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        for path in args.workflows:
            errors: list[str] = []
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(f"page error: {e} {e.stack}"))
            page.route("**/*", lambda r: r.continue_() if urllib.parse.urlparse(r.request.url).netloc in ("", host)
                       else r.abort())
            page.goto(url + "/", timeout=120_000)
            page.wait_for_function("() => window.app && app.graph && window.LiteGraph && "
                                   "Object.keys(LiteGraph.registered_node_types).length > 0", timeout=120_000)
            result = page.evaluate(LOAD, json.loads(Path(path).read_text()))
            page.wait_for_timeout(500)
            if args.screenshots:
                page.screenshot(path=str(Path(args.screenshots) / (Path(path).stem + ".png")))
            report[path] = {"missing": sorted(set(result["unknown"])), "missing_dialog": result["missingDialog"],
                            "broken": result["broken"], "nodes": result["nodes"],
                            "errors": [e for e in errors if not BENIGN.search(e)]}
            page.close()
        browser.close()
    print(json.dumps(report))


if __name__ == "__main__":
    main()
