"""The web console as a person uses it: a real headless Chromium (Debian's) driven over WebDriver, against the
console running on the emulated API server, with a job that has a loss history and a real vLLM serving the
tiny model behind its Service.

Screenshots of each page land in ``$FT_TEST_ARTIFACTS`` (default: the test's tmp folder) for a human to look at.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp.web
import pytest

from finetune_operator.access import cluster
from finetune_operator.console import views
from finetune_operator.console.app import make_app
from finetune_operator.console.source import ClusterSource
from finetune_operator.local.serve import free_port
from tests.emulator.runner import EmulatorServer
from tests.served_model import ServedModel, job_manifest, loss_history, seed_serving_job, serving_status

CHROMIUM = os.environ.get("FT_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("FT_CHROMEDRIVER", "/usr/bin/chromedriver")


# ------------------------------------------------------------------------------------------------ pure views


def test_views_show_what_status_says() -> None:
    job = job_manifest("bot", "ml")
    job["status"] = serving_status("bot", "ml", loss_history(12))
    d = views.detail(job)
    assert (d["name"], d["namespace"], d["state"], d["ready"]) == ("bot", "ml", "Serving", True)
    assert [s["name"] for s in d["stages"]] == ["sft", "merge", "serve"]
    assert len(d["curves"]["sft"]) == 12 and d["curves"]["sft"][0]["step"] == 5
    assert d["chat"] == {"available": True, "model": "tiny-chat", "reason": ""}
    job["status"] = serving_status("bot", "ml", [], ready=False)
    d = views.detail(job)
    assert d["curves"] == {} and not d["chat"]["available"] and "is not Ready yet" in d["chat"]["reason"]
    job["spec"]["serve"]["enabled"] = False
    assert "does not serve a model" in views.detail(job)["chat"]["reason"]


def test_pages_escape_what_users_wrote() -> None:
    """A job's status message is user-influenced text: it is escaped, never markup."""
    from finetune_operator.console.app import _env

    job = job_manifest("bot", "ml")
    job["status"] = serving_status("bot", "ml", loss_history(3))
    job["status"]["conditions"][0]["message"] = "<script>alert(1)</script>"
    html = _env().get_template("job.html").render(job=views.detail(job))
    assert "<script>alert(1)</script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html


def test_job_page_shows_the_plan_and_the_evaluation_when_they_exist() -> None:
    """``status.plan`` (the preflight step's) as a table per stage; metrics and the promotion gate's result."""
    from finetune_operator.console.app import _env

    job = job_manifest("bot", "ml")
    job["status"] = serving_status("bot", "ml", loss_history(3))
    job["status"]["plan"] = {
        "stages": [
            {
                "name": "sft",
                "gpuMemoryGiB": 18.4,
                "gpu": "NVIDIA-A100-SXM4-40GB",
                "gpuCapacityGiB": 40.0,
                "verdict": "fits",
                "samples": 980,
                "dropped": 20,
                "truncated": 3,
                "totalSteps": 123,
                "estimatedSeconds": 5400,
            }
        ]
    }
    job["status"]["outputs"]["metrics"] = {"eval_loss": 1.25}
    job["status"]["gate"] = {"result": "Failed", "message": "eval_loss 1.3 is worse than the serving model's 1.25"}
    html = _env().get_template("job.html").render(job=views.detail(job))
    assert '<tr data-stage="sft"><td>sft</td><td>18.4</td>' in html
    assert "NVIDIA-A100-SXM4-40GB (40.0 GiB)" in html and "<td>fits</td>" in html and "1 h 30 min" in html
    assert "<th>eval_loss</th><td>1.25</td>" in html
    assert "Promotion gate: Failed" in html and "worse than the serving model&#39;s 1.25" in html
    job["status"].pop("plan")
    job["status"].pop("gate")
    job["status"]["outputs"].pop("metrics")
    html = _env().get_template("job.html").render(job=views.detail(job))
    assert 'id="plan"' not in html and 'id="metrics"' not in html


# ------------------------------------------------------------------------------------------------ the server


class ConsoleServer:
    """The console app on 127.0.0.1:<free port>, on its own event loop in a thread."""

    def __init__(self, source: ClusterSource) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._app = make_app(source)
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._runner = aiohttp.web.AppRunner(self._app)
        self._loop.run_until_complete(self._runner.setup())
        self._loop.run_until_complete(aiohttp.web.TCPSite(self._runner, "127.0.0.1", self.port).start())
        self._started.set()
        self._loop.run_forever()

    def __enter__(self) -> ConsoleServer:
        self._thread.start()
        assert self._started.wait(30), "the console did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)


@pytest.fixture()
def console(emulator_server: EmulatorServer, kubeconfig: Path) -> Iterator[ConsoleServer]:
    access = cluster.from_kubeconfig(kubeconfig=str(kubeconfig))
    with ConsoleServer(ClusterSource(access=access, via="proxy")) as server:
        yield server


def test_console_http_contract(console: ConsoleServer, emulator_server: EmulatorServer) -> None:
    """Without a browser: security headers, 404s with a message, the chat route's refusals."""
    import json
    import urllib.error
    import urllib.request

    seed_serving_job(emulator_server, "pending", "ml", backend=None, ready=False)

    def get(path: str) -> tuple[int, dict[str, str], str]:
        try:
            with urllib.request.urlopen(console.url + path, timeout=30) as r:
                return r.status, dict(r.headers), r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read().decode()

    def post(path: str, body: Any, ctype: str = "application/json", origin: str | None = None) -> tuple[int, str]:
        headers = {"Content-Type": ctype, **({"Origin": origin} if origin else {})}
        req = urllib.request.Request(console.url + path, data=json.dumps(body).encode(), headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    code, headers, html = get("/")
    assert code == 200 and "pending" in html
    assert "default-src 'self'" in headers["Content-Security-Policy"] and headers["X-Frame-Options"] == "DENY"
    code, _, html = get("/jobs/ml/absent")
    assert code == 404 and "FineTuneJob &#34;absent&#34; not found in namespace &#34;ml&#34;" in html
    code, _, html = get("/jobs/ml/Bad_Name")
    assert code == 404
    chat = "/api/jobs/ml/pending/chat"
    ok_body = {"messages": [{"role": "user", "content": "hi"}]}
    assert post(chat, ok_body, ctype="text/plain")[0] == 415
    assert post(chat, ok_body, origin="http://evil.example")[0] == 403
    code, text = post(chat, ok_body)
    assert code == 409 and "is not Ready yet" in text
    seed_serving_job(emulator_server, "ready", "ml", backend=None)
    assert post("/api/jobs/ml/ready/chat", {"messages": [{"role": "tool", "content": "x"}]})[0] == 400
    assert post("/api/jobs/ml/ready/chat", {"messages": []})[0] == 400


# ------------------------------------------------------------------------------------------------ the browser


@pytest.fixture()
def browser(tmp_path: Path) -> Iterator[Any]:
    if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
        pytest.skip(f"no headless browser: install Debian's chromium and chromium-driver ({CHROMIUM}, {CHROMEDRIVER})")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    opts.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1280,1400",
    ):
        opts.add_argument(arg)
    opts.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture()
def artifacts(tmp_path: Path, request: pytest.FixtureRequest) -> Path:
    base = os.environ.get("FT_TEST_ARTIFACTS")
    out = Path(base) / request.node.name if base else tmp_path / "screenshots"
    out.mkdir(parents=True, exist_ok=True)
    return out


def wait(driver: Any, condition: Any, timeout: float = 60) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(condition)


@pytest.mark.vllm
@pytest.mark.slow
def test_a_person_watches_the_curve_and_chats(
    browser: Any, console: ConsoleServer, emulator_server: EmulatorServer, tiny_vllm: ServedModel, artifacts: Path
) -> None:
    from selenium.webdriver.common.by import By

    seeded = seed_serving_job(emulator_server, "support-bot", "ml", backend=tiny_vllm.base_url, history_points=57)
    seed_serving_job(emulator_server, "still-training", "ml", backend=None, ready=False, history_points=0)

    # The list shows both jobs with their state.
    browser.get(console.url + "/")
    rows = {r.get_attribute("data-name"): r for r in browser.find_elements(By.CSS_SELECTOR, "tr.job")}
    assert set(rows) == {"support-bot", "still-training"}
    assert "Serving" in rows["support-bot"].text and "Running" in rows["still-training"].text
    browser.save_screenshot(str(artifacts / "01-list.png"))

    # The job page: the curve has exactly as many points as the history in status.
    rows["support-bot"].find_element(By.LINK_TEXT, "support-bot").click()
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "svg.chart circle.pt"))
    points = browser.find_elements(By.CSS_SELECTOR, 'svg.chart circle.pt[data-stage="sft"]')
    assert len(points) == len(seeded["history"]) == 57
    assert [li.get_attribute("data-stage") for li in browser.find_elements(By.CSS_SELECTOR, "#timeline li")] == [
        "sft",
        "merge",
        "serve",
    ]
    assert "http://support-bot-serve.ml.svc:8000/v1" in browser.find_element(By.ID, "endpoint").text
    browser.save_screenshot(str(artifacts / "02-job.png"))

    # A chat message gets a streamed answer from the real model, through the console.
    browser.find_element(By.ID, "chat-input").send_keys("What is two plus three?")
    browser.find_element(By.ID, "chat-send").click()
    answer = wait(browser, lambda d: d.find_element(By.CSS_SELECTOR, ".msg.assistant.done"), timeout=180)
    assert answer.text.strip()
    assert browser.find_element(By.ID, "chat-error").get_attribute("hidden") is not None
    browser.save_screenshot(str(artifacts / "03-chat.png"))

    # The live refresh draws new history points without a reload.
    longer = loss_history(63)
    emulator_server.patch_status(
        "finetunejobs", "support-bot", {"stages": serving_status("support-bot", "ml", longer)["stages"]}, "ml"
    )
    wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "circle.pt")) == 63, timeout=30)

    # A job that does not serve yet: the page says why instead of offering a chat.
    browser.get(console.url + "/jobs/ml/still-training")
    assert "is not Ready yet" in browser.find_element(By.ID, "chat-unavailable").text
    assert browser.find_element(By.ID, "no-curves").is_displayed()

    # An unknown job: a clear message.
    browser.get(console.url + "/jobs/ml/absent")
    assert 'FineTuneJob "absent" not found in namespace "ml"' in browser.find_element(By.ID, "error").text
    browser.save_screenshot(str(artifacts / "04-unknown.png"))

    # vLLM down: the Service's endpoint does not answer; the chat says so on the page.
    emulator_server.emulator.service_backends[("ml", seeded["service"], "8000")] = f"http://127.0.0.1:{free_port()}"
    browser.get(console.url + "/jobs/ml/support-bot")
    browser.find_element(By.ID, "chat-input").send_keys("Hello?")
    browser.find_element(By.ID, "chat-send").click()
    error = wait(
        browser,
        lambda d: d.find_element(By.ID, "chat-error") if d.find_element(By.ID, "chat-error").is_displayed() else None,
    )
    assert "The model did not answer" in error.text and "error trying to reach service" in error.text
    browser.save_screenshot(str(artifacts / "05-vllm-down.png"))
