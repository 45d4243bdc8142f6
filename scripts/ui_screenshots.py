"""Screenshots of the MLflow UI as `lrexp ui` opens it (docs/ui.md), taken in headless Chromium.

    python scripts/ui_screenshots.py [--store sqlite:///PATH/mlflow.db] [--out docs/ui] [--port 5079]

Without --store, first trains a small grid into a store of its own under a temporary folder (`lrexp grid
table` at the smoke scale: Slide:13L, Rec:fixed:skip and XL, two seeds each, 40 steps). Then runs `lrexp ui`
over the store, takes the link it prints (the latest invocation's comparison, tracking/view.py) and saves:

- comparison.png: the link as printed, the table of the invocation's cells;
- charts.png: the same view's chart view (the validation curves first);
- run.png: the first cell's run page, opened by clicking its name in the table as a user would;
- report.png: the parent run's report artifact (report/table.md).

Chromium is driven over its DevTools protocol with aiohttp (an MLflow dependency). Before the link the
browser visits the UI once to close MLflow's assistant panel, which otherwise opens on a first visit and
covers a third of the page; nothing else is set in the browser.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
WIDTH, HEIGHT = 1440, 900
SMOKE_GRID = ["table", "scale=smoke", "row=[slide13,rec_fixed_skip,xl512]", "train.seed=[0,1]", "train.max_steps=40"]
WAIT_S = 90.0  # a page's data; the UI's first load on a busy 2-core machine takes tens of seconds


def lrexp(*args: str, env=None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lrexp.cli", *args], cwd=ROOT, env=env, check=True, **kw)


def smoke_store(folder: Path) -> str:
    uri = f"sqlite:///{folder}/mlflow.db"
    lrexp("data", "prepare", "scale=smoke")
    lrexp("grid", *SMOKE_GRID, f"log.tracking_uri={uri}", "--runs-dir", str(folder / "runs"),
          "--out", str(folder / "report"))
    return uri


class Page:
    """One Chromium tab over the DevTools protocol: navigate, evaluate, wait for a condition, screenshot."""

    def __init__(self, ws) -> None:
        self.ws, self.n, self.pending = ws, 0, {}

    async def read(self) -> None:
        async for msg in self.ws:
            data = json.loads(msg.data)
            if data.get("id") in self.pending:
                self.pending.pop(data["id"]).set_result(data.get("result", data.get("error")))

    async def send(self, method: str, **params):
        self.n += 1
        self.pending[self.n] = asyncio.get_running_loop().create_future()
        await self.ws.send_json({"id": self.n, "method": method, "params": params})
        return await self.pending[self.n]

    async def js(self, expression: str):
        result = await self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        return result.get("result", {}).get("value")

    async def goto(self, url: str) -> None:
        await self.send("Page.navigate", url=url)

    async def wait_for(self, condition: str, what: str, settle_s: float = 3.0) -> None:
        deadline = time.monotonic() + WAIT_S
        while not await self.js(f"Boolean({condition})"):
            if time.monotonic() > deadline:
                raise SystemExit(f"ui_screenshots: the UI did not show {what} within {WAIT_S:.0f} s")
            await asyncio.sleep(0.5)
        await asyncio.sleep(settle_s)  # charts and column widths settle after the data arrives

    async def shot(self, path: Path) -> None:
        result = await self.send("Page.captureScreenshot", format="png")
        path.write_bytes(base64.b64decode(result["data"]))
        print(f"{path} ({path.stat().st_size // 1024} KB)", flush=True)


def text_has(text: str) -> str:
    return f"document.body && document.body.innerText.includes({json.dumps(text)})"


async def capture(base: str, link: str, charts_link: str, parent_run: str, experiment: str, out: Path) -> None:
    port = 9400 + os.getpid() % 500
    profile = tempfile.mkdtemp(prefix="lrexp-chromium-")
    browser = subprocess.Popen(
        ["chromium", "--headless=new", "--no-sandbox", "--disable-gpu", f"--remote-debugging-port={port}",
         f"--user-data-dir={profile}", f"--window-size={WIDTH},{HEIGHT}", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(100):
                try:
                    async with session.get(f"http://127.0.0.1:{port}/json/list") as r:
                        tab = next(t for t in await r.json() if t["type"] == "page")
                    break
                except (aiohttp.ClientError, StopIteration):
                    await asyncio.sleep(0.3)
            else:
                raise SystemExit("ui_screenshots: headless Chromium did not start")
            async with session.ws_connect(tab["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                page = Page(ws)
                reader = asyncio.create_task(page.read())
                await page.send("Page.enable")
                await page.send("Emulation.setDeviceMetricsOverride", width=WIDTH, height=HEIGHT,
                                deviceScaleFactor=1, mobile=False)
                await page.goto(f"{base}/health")
                await page.wait_for(text_has("OK"), "the health page", settle_s=0)
                await page.js("localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');"
                              "localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true')")

                await page.goto(link)
                await page.wait_for(text_has("final/val_bits_per_token_minus_ref"), "the comparison's columns")
                await page.shot(out / "comparison.png")

                await page.js("[...document.querySelectorAll('a')].find(a => /\\/runs\\/[0-9a-f]{32}$/"
                              ".test(a.getAttribute('href') || '')).click()")
                await page.wait_for(text_has("Parent run") + " && " + text_has("lrexp.cell"), "a cell's run page")
                await page.shot(out / "run.png")

                await page.goto(charts_link)
                await page.wait_for("document.querySelectorAll('.js-plotly-plot, canvas, svg.main-svg').length > 2",
                                    "the charts", settle_s=5)
                await page.shot(out / "charts.png")

                await page.goto(f"{base}/#/experiments/{experiment}/runs/{parent_run}/artifacts/report/table.md")
                await page.wait_for(text_has("bits/token"), "the report's table")
                await page.shot(out / "report.png")
                reader.cancel()
    finally:
        browser.terminate()
        browser.wait()
        shutil.rmtree(profile, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", help="an MLflow store with a grid invocation (default: train a smoke grid)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "ui")
    parser.add_argument("--port", type=int, default=5079)
    args = parser.parse_args()
    if shutil.which("chromium") is None:
        raise SystemExit("ui_screenshots: no `chromium` on PATH (Debian: apt-get install chromium)")
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="lrexp-ui-") as tmp:
        uri = args.store or smoke_store(Path(tmp))
        env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
        ui = subprocess.Popen([sys.executable, "-m", "lrexp.cli", "ui", "--port", str(args.port)], cwd=ROOT,
                              env=env, stdout=subprocess.PIPE, text=True, start_new_session=True)
        try:
            line = ui.stdout.readline()
            found = re.search(r"its comparison: (\S+)", line)
            if not found:
                raise SystemExit(f"ui_screenshots: lrexp ui printed no comparison link: {line.strip()}")
            link = found.group(1)
            base = f"http://127.0.0.1:{args.port}"
            deadline = time.monotonic() + 180
            while True:  # the link may come before the server answers (an older `lrexp ui`)
                try:
                    with urllib.request.urlopen(f"{base}/health", timeout=2):
                        break
                except OSError:
                    if ui.poll() is not None or time.monotonic() > deadline:
                        raise SystemExit("ui_screenshots: the MLflow UI did not start") from None
                    time.sleep(0.5)
            to = urllib.parse.unquote(link.split("to=", 1)[1])
            experiment = to.split("/")[2]
            parent_run = re.search(r"viewStateShareKey=lrexp-([0-9a-f]+)", to).group(1)
            charts_link = link.replace("compareRunsMode%3DTABLE", "compareRunsMode%3DCHART")
            asyncio.run(capture(base, link, charts_link, parent_run, experiment, args.out))
        finally:
            os.killpg(ui.pid, signal.SIGTERM)
            ui.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
