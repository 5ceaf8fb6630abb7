"""GET /dashboard in headless Chromium, on a real service (a built-in teacher) under load.

Debian's chromium (make system-packages), driven by Playwright; nothing is downloaded.
`DASHBOARD_SCREENSHOT=docs/dashboard.png` also writes the screenshot there (the docs' one),
after a minute of calls rather than the three points the test waits for.
"""

from __future__ import annotations

import itertools
import os
import shutil
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from playwright.sync_api import Browser, Page, sync_playwright
from prometheus_client.parser import text_string_to_metric_families

from teacher_service.backend import HFBackend
from teacher_service.frontends.http.dashboard import ASSETS, STATIC
from teacher_service.frontends.http.dashboard_data import summarize
from teacher_service.heap import CollectionTimer
from teacher_service.metrics import LATENCY_BUCKETS, ServiceMetrics
from tests.conftest import start_background_server

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models/arithmetic/teacher"
CHROMIUM = "/usr/bin/chromium"
TOKEN = "dashboard-test-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}
TEXTS = ["Ada has 12 apples.", "12+7=19", "Ben gives 3 of 40 coins away, so 37 are left."]
CHARTS = ("tokens", "queue", "batching", "latency", "errors", "gc")
CALLERS = 3  # at once, so forwards batch several calls' sequences and some wait
LOADED = 180_000  # ms Playwright waits for the page's data: far above a loaded machine's


@pytest.fixture(scope="module")
def service() -> Iterator:
    backend = HFBackend.load(MODEL, device="cpu", dtype="float32")
    running = start_background_server(MODEL, backend, http_port=0, auth_token=TOKEN)
    # the garbage collector's pauses reach the metrics as `serve` has them (its own process)
    collections = CollectionTimer(running.running.engine.metrics.observe_gc_pause)
    yield running, backend
    collections.close()
    running.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    assert shutil.which(CHROMIUM), f"{CHROMIUM} is missing: `make system-packages` installs it"
    flags = ["--disable-gpu", "--disable-quic", "--no-first-run", "--disable-component-update"]
    flags += ["--no-sandbox", "--disable-background-networking", "--disable-sync"]
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=flags)
        yield launched
        launched.close()


class Traffic(threading.Thread):
    """Scoring calls of 1, 2, then 3 sequences, one after another, every fifth one invalid
    (a 422), until stopped; answers counted by status (a busy queue may answer 429)."""

    def __init__(self, url: str, sequences: list[list[int]], vocab_size: int) -> None:
        super().__init__(daemon=True)
        self.url, self.sequences = url, sequences
        self.bad = [[1, 2, vocab_size + 5]]
        self.stop = threading.Event()
        self.statuses: Counter[str] = Counter()
        self.positions = 0  # scored by the 200s

    def run(self) -> None:
        with httpx.Client(headers=AUTH, timeout=60) as http:
            for n in itertools.count():
                if self.stop.is_set():
                    return
                batch = self.bad if n % 5 == 4 else self.sequences[: n % 3 + 1]
                body = {"sequences": [{"token_ids": s, "score_from": 1} for s in batch]}
                status = http.post(f"{self.url}/v1/score", json=body).status_code
                self.statuses[str(status)] += 1
                if status == 200:
                    self.positions += sum(len(s) - 1 for s in batch)
                self.stop.wait(0.05)


def metrics(url: str) -> dict[tuple[str, frozenset], float]:
    text = httpx.get(f"{url}/metrics", headers=AUTH).text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def total(scraped: dict, name: str, **labels: str) -> float:
    wanted = set(labels.items())
    return sum(v for (n, got), v in scraped.items() if n == name and wanted <= got)


def series_pixels(page: Page, chart: str) -> int:
    """Pixels of a chart's canvas in its series' colours (their lines; axes and grid are grey)."""
    return page.evaluate(
        """id => {
            const rgb = PALETTE.slice(0, charts[id].keys.length)
                .map((hex) => [1, 3, 5].map((i) => parseInt(hex.slice(i, i + 2), 16)));
            const canvas = document.querySelector(`#chart-${id} canvas`);
            const { width, height } = canvas;
            const pixels = canvas.getContext("2d").getImageData(0, 0, width, height).data;
            let n = 0;
            for (let i = 0; i < pixels.length; i += 4) {
                const near = (c) => [0, 1, 2].every((k) => Math.abs(pixels[i + k] - c[k]) <= 10);
                if (pixels[i + 3] > 200 && rgb.some(near)) n++;
            }
            return n;
        }""",
        chart,
    )


def test_page_files_are_open_and_its_data_needs_the_token(service):
    running, _ = service
    url = running.http_url
    page = httpx.get(f"{url}/dashboard")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert page.content == (STATIC / "dashboard.html").read_bytes()
    for name, (relative, media_type) in ASSETS.items():
        asset = httpx.get(f"{url}/dashboard/static/{name}")
        assert asset.status_code == 200, name
        assert asset.headers["content-type"].startswith(media_type)
        assert asset.content == (STATIC / relative).read_bytes()
    assert httpx.get(f"{url}/dashboard/static/secret").status_code == 401  # not a page file
    assert httpx.get(f"{url}/dashboard/static/secret", headers=AUTH).status_code == 404
    assert httpx.get(f"{url}/dashboard/data").status_code == 401  # as /metrics
    assert httpx.get(f"{url}/metrics").status_code == 401
    data = httpx.get(f"{url}/dashboard/data", headers=AUTH)
    assert data.status_code == 200 and "tokens_scored" in data.json()


def test_live_charts_agree_with_metrics(service, browser, tmp_path):
    running, backend = service
    url = running.http_url
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    requested, console, crashes = [], [], []
    page.on("request", lambda request: requested.append(request.url))
    page.on("console", lambda m: console.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda error: crashes.append(str(error)))

    page.goto(f"{url}/dashboard")
    page.wait_for_selector("#login", state="visible")  # the data answered 401
    page.fill("#token", TOKEN)
    page.click("#login button")
    page.wait_for_function("() => Number(document.body.dataset.polls) >= 1", timeout=LOADED)
    assert all("401" in message for message in console), console  # the refused first poll
    console.clear()

    sequences = [backend.tokenizer(text)["input_ids"] for text in TEXTS]
    callers = [Traffic(url, sequences, backend.vocab_size) for _ in range(CALLERS)]
    for caller in callers:
        caller.start()
    page.wait_for_function(
        "([ids, n]) => ids.every("
        "    (id) => Number(document.getElementById(`chart-${id}`).dataset.points) >= n)",
        arg=[list(CHARTS), 30 if os.environ.get("DASHBOARD_SCREENSHOT") else 3],
        timeout=LOADED,
    )
    shot = tmp_path / "dashboard.png"  # while the calls go on
    page.screenshot(path=str(shot), full_page=True)
    if os.environ.get("DASHBOARD_SCREENSHOT"):
        shutil.copy(shot, os.environ["DASHBOARD_SCREENSHOT"])
    for caller in callers:
        caller.stop.set()
        caller.join()
    statuses = sum((c.statuses for c in callers), Counter())
    polls = int(page.get_attribute("body", "data-polls"))
    page.wait_for_function(  # a snapshot taken wholly after the last call
        "n => Number(document.body.dataset.polls) >= n", arg=polls + 2, timeout=LOADED
    )
    scraped = metrics(url)
    shown = {
        key: float(page.get_attribute(f'[data-total="{key}"]', "data-value"))
        for key in ("tokens_scored", "sequences_computed", "forwards", "answered", "errors")
    }
    table = {
        tuple(cells[:3]): int(cells[3].replace(",", ""))
        for cells in page.eval_on_selector_all(
            "#requests tbody tr", "rows => rows.map(r => [...r.cells].map(c => c.textContent))"
        )
    }
    pixels = {chart: series_pixels(page, chart) for chart in CHARTS}
    page.close()

    assert statuses["200"] > 0 and statuses["422"] > 0
    assert set(statuses) <= {"200", "422", "429"}, statuses
    assert shown["answered"] == statuses["200"]  # the only answered calls but housekeeping
    for status, count in statuses.items():
        assert table[("http", "POST /v1/score", status)] == count
    assert shown["errors"] == total(scraped, "teacher_request_errors_total")
    assert shown["tokens_scored"] == total(scraped, "teacher_tokens_scored_total")
    assert shown["tokens_scored"] >= sum(c.positions for c in callers)
    assert shown["sequences_computed"] == total(scraped, "teacher_sequences_computed_total")
    assert shown["forwards"] == total(scraped, "teacher_batch_sequences_count")
    assert total(scraped, "teacher_gc_pause_seconds_count") > 0  # the GC chart drew real pauses
    assert all(n > 100 for n in pixels.values()), pixels
    origin = f"{url}/"
    assert all(r.startswith(origin) or r.startswith("data:") for r in requested), requested
    assert not console, console
    assert not crashes, crashes


def test_page_percentiles_bracket_the_true_quantiles(service, browser):
    """The page's histogram_quantile on the summary's buckets against numpy on the samples."""
    running, _ = service
    samples = np.random.default_rng(0).lognormal(mean=-3, sigma=1.5, size=2000)
    observed = ServiceMetrics()
    for seconds in samples:
        observed.observe_request("http", "POST /v1/score", "200", float(seconds))
    latency = summarize(observed.registry, now=0.0)["latency"]
    none = {"le": [], "counts": [], "count": 0}
    page = browser.new_page()
    page.goto(f"{running.http_url}/dashboard")
    for q in (0.5, 0.9, 0.99):
        got = page.evaluate(
            "([q, prev, now]) => { const l = latencyBetween(prev, now);"
            " return histogramQuantile(q, l.le, l.counts); }",
            [q, none, latency],
        )
        true = float(np.quantile(samples, q))
        upper = next(le for le in LATENCY_BUCKETS if le >= true)
        lower = max([0, *(le for le in LATENCY_BUCKETS if le < true)])
        assert lower <= got <= upper, (q, got, true)
    exact = {"le": [0.01, 0.025], "counts": [0, 4], "count": 4}  # all four in (0.01, 0.025]
    assert page.evaluate(
        "l => histogramQuantile(0.5, [...l.le, Infinity], [...l.counts, l.count])", exact
    ) == pytest.approx(0.0175)
    beyond = {"le": [10, 30], "counts": [0, 0], "count": 3}  # all past the last bound
    assert (
        page.evaluate(
            "l => histogramQuantile(0.5, [...l.le, Infinity], [...l.counts, l.count])", beyond
        )
        == 30
    )
    page.close()
