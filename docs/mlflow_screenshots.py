"""Screenshots of the MLflow UI for docs/mlflow.md, taken from a real store by headless Chromium.

Not part of CI (it trains twice and needs Debian's ``chromium``: ``apt-get install -y chromium``).
Run from the repository root::

    python docs/mlflow_screenshots.py                # defaults: --iterations 10 --port 5077

Steps:

1. In ``--workdir`` (default ``/tmp/deepslicing-screenshots``, emptied first), twice: ``deepslicing
   train`` (seeds 0 and 1, ``--iterations`` each, run directories ``runs/seed0`` and
   ``runs/seed1``) then ``deepslicing register`` of its final checkpoint, the first two steps of
   ``deepslicing run`` (the third, serving, writes nothing to MLflow). The embedded store
   ``mlflow.db`` ends with two training runs and two versions of ``deepslicing-allocator``, the
   second gated against the first.
2. ``mlflow server`` on 127.0.0.1:``--port`` over that store.
3. Headless ``chromium``, driven over its DevTools protocol (1600x1000 pixels), opens each page of
   :data:`PAGES` with MLflow's "Model training" view, waits ``--wait`` seconds of real time for the
   single-page app, closes MLflow's assistant side panel, runs the page's script (the chart view's
   search filled in, the logged model's metrics searched for ``suite``) and saves a PNG to
   ``--out`` (default ``docs/img/mlflow``); then browser and server are stopped.

``--reuse`` skips step 1 and photographs the store already in ``--workdir``.

Every ``deepslicing`` command runs with this checkout on ``PYTHONPATH``, so the pictures show the
code they document.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODEL = "deepslicing-allocator"
WIDTH, HEIGHT = 1600, 1000
# MLflow 3.17's sidebar switch on "Model training" rather than GenAI, as a URL parameter
WORKFLOW = "workflowType=machine_learning"
# the chart view filtered (a regex, as the UI's search box takes) to the training curves and the
# suite score
CHARTS = "^(objective|utility_mean|sla_violation_rate|suite/objective)$"
FILTER_CHARTS = f"""
const box = [...document.querySelectorAll("input")]
  .find((e) => e.placeholder === "Search metric charts");
Object.getOwnPropertyDescriptor(HTMLInputElement.prototype, "value").set.call(box, {CHARTS!r});
box.dispatchEvent(new Event("input", {{ bubbles: true }}));
"""
# MLflow 3.17's assistant side panel opens by itself; its own Close button shuts it
CLOSE_ASSISTANT = """
for (const b of document.querySelectorAll('button[aria-label="Close"]')) {
  let e = b;
  for (let i = 0; i < 6 && e; i++) e = e.parentElement;
  if (e && e.innerText.includes("MLflow Assistant")) b.click();
}
"""
SEARCH_SUITE_METRICS = """
const search = [...document.querySelectorAll("input")]
  .find((e) => e.placeholder === "Search metrics");
Object.getOwnPropertyDescriptor(HTMLInputElement.prototype, "value").set.call(search, "suite");
search.dispatchEvent(new Event("input", { bubbles: true }));
search.scrollIntoView();
"""
# file name -> (route of the UI's hash router, filled from the store's ids; script to run)
PAGES = {
    "01-chart-view.png": ("/experiments/{experiment}/runs?compareRunsMode=CHART", FILTER_CHARTS),
    "02-registered-versions.png": ("/models/{model}", None),
    "03-version.png": ("/models/{model}/versions/{version}", None),
    "04-logged-model.png": ("/experiments/{experiment}/models/{model_id}", SEARCH_SUITE_METRICS),
}


def deepslicing(workdir: Path, *args: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    print("$ deepslicing", " ".join(args), flush=True)
    subprocess.run(
        [sys.executable, "-m", "deepslicing.cli", *args], cwd=workdir, env=env, check=True
    )


def train_and_register_twice(workdir: Path, iterations: int) -> None:
    for seed in (0, 1):
        run_dir = f"runs/seed{seed}"
        deepslicing(
            workdir,
            "train",
            "--iterations", str(iterations),
            "--seed", str(seed),
            "--eval-episodes", "2",
            "--run-dir", run_dir,
        )  # fmt: skip
        checkpoint = json.loads((workdir / run_dir / "state.json").read_text())["checkpoint"]
        deepslicing(
            workdir, "register", "--checkpoint", checkpoint, "--episodes", "1",
            "--out", f"{run_dir}/export",
        )  # fmt: skip


def stop(process: subprocess.Popen) -> None:
    """SIGTERM to the process group (started with its own session); SIGKILL after 30 s."""
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


def start_server(workdir: Path, port: int) -> subprocess.Popen:
    server = subprocess.Popen(
        ["mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{workdir / 'mlflow.db'}"],
        cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return server
        except OSError:
            if server.poll() is not None:
                raise SystemExit("mlflow server exited; is the port free?") from None
            time.sleep(0.5)
    stop(server)
    raise SystemExit("mlflow server did not answer /health within 120 s")


def page_ids(uri: str) -> dict[str, str]:
    """The ids the pages need: the training experiment, both versions' runs, the newer version."""
    from mlflow import MlflowClient

    client = MlflowClient(uri, uri)
    versions = sorted(
        client.search_model_versions(f"name='{MODEL}'"), key=lambda v: int(v.version)
    )[-2:]
    if len(versions) < 2:
        raise SystemExit(f"expected two versions of {MODEL} at {uri}, found {len(versions)}")
    experiment = client.get_run(versions[-1].run_id).info.experiment_id
    return {
        "experiment": experiment,
        "model": MODEL,
        "version": versions[-1].version,
        "model_id": versions[-1].source.removeprefix("models:/"),
    }


class Chromium:
    """Headless Chromium driven over the DevTools protocol (through ``websockets``, which Ray
    Serve's uvicorn already installs)."""

    def __init__(self, executable: str, profile: Path, port: int) -> None:
        from websockets.sync.client import connect

        self.process = subprocess.Popen(
            [executable, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             f"--window-size={WIDTH},{HEIGHT}", f"--remote-debugging-port={port}",
             f"--user-data-dir={profile}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=2) as r:
                    pages = [t for t in json.load(r) if t["type"] == "page"]
                break
            except OSError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise SystemExit("chromium did not open its DevTools port") from None
                time.sleep(0.3)
        self.socket = connect(pages[0]["webSocketDebuggerUrl"], max_size=None, legacy=True)
        self.next_id = 0
        self.call(
            "Emulation.setDeviceMetricsOverride",
            width=WIDTH,
            height=HEIGHT,
            deviceScaleFactor=1,
            mobile=False,
        )

    def call(self, method: str, **params):
        self.next_id += 1
        self.socket.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv())
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    def open(self, url: str, wait_s: float, script: str | None = None) -> None:
        self.call("Page.navigate", url=url)
        time.sleep(wait_s)
        self.call("Runtime.evaluate", expression=CLOSE_ASSISTANT)
        if script:
            self.call("Runtime.evaluate", expression=script)
        time.sleep(wait_s / 2)

    def screenshot(self, path: Path) -> None:
        png = self.call("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(png))

    def close(self) -> None:
        self.socket.close()
        stop(self.process)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/deepslicing-screenshots"))
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "img" / "mlflow")
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--port", type=int, default=5077, help="mlflow server; chromium +1")
    parser.add_argument("--wait", type=float, default=8.0, help="seconds for a page to render")
    parser.add_argument(
        "--reuse", action="store_true", help="keep --workdir's store instead of training again"
    )
    args = parser.parse_args()
    chromium = shutil.which("chromium")
    if chromium is None:
        raise SystemExit("chromium: not found; install it with `apt-get install -y chromium`")
    if not args.reuse:
        shutil.rmtree(args.workdir, ignore_errors=True)
        args.workdir.mkdir(parents=True)
        train_and_register_twice(args.workdir, args.iterations)
    args.out.mkdir(parents=True, exist_ok=True)
    server = start_server(args.workdir, args.port)
    browser = None
    try:
        base = f"http://127.0.0.1:{args.port}"
        ids = page_ids(base)
        browser = Chromium(chromium, args.workdir / "chromium-profile", args.port + 1)
        for name, (route, script) in PAGES.items():
            route = route.format(**ids)
            url = f"{base}/#{route}{'&' if '?' in route else '?'}{WORKFLOW}"
            browser.open(url, args.wait, script)
            browser.screenshot(args.out / name)
            print(f"wrote {args.out / name}  ({url})", flush=True)
    finally:
        if browser is not None:
            browser.close()
        stop(server)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
