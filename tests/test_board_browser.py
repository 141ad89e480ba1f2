"""`sftflow board` in a real headless Chromium (Debian's, driven by playwright) on the tiny test model:
browse the data, start two runs from the page, stop one (checkpoint) and resume it, close the page and
reopen it mid-run, see the chart update, watch it finish, compare the two runs, open a report, chat with
the tuned model and its base side by side, export.

Set SFTFLOW_BOARD_SHOTS=DIR to keep the two screenshots (docs/board-train.png, docs/board-runs.png).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
import yaml

from helpers import free_port

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
pytest.importorskip("gradio", reason="the board extra is not installed (pip install -e .[board])")
playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not Path(CHROMIUM).is_file(),
        reason=f"no {CHROMIUM} (apt-get install chromium; make install-dev does as root)",
    ),
]


def wait_http(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the board exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise AssertionError(f"the board did not answer on {url} within {timeout} s")


@pytest.fixture
def board(tmp_path, tiny_model_dir, toy_data_dir):
    """A live board over tmp_path/saves, its form filled from a tiny-model config; every run it started
    is ended afterwards."""
    saves = tmp_path / "saves"
    config = {
        "model_name_or_path": str(tiny_model_dir),
        "dataset_dir": str(toy_data_dir),
        "dataset": "toy",
        "eval_dataset": "toy_heldout",
        "cutoff_len": 64,
        "lora_rank": 4,
        "do_train": True,
        "do_eval": True,
        "eval_strategy": "steps",
        "eval_steps": 20,
        "max_steps": 80,
        "logging_steps": 1,
        "per_device_train_batch_size": 2,
        "learning_rate": 5e-3,
        "max_new_tokens": 8,
        "output_dir": str(saves / "first"),
    }
    config_path = tmp_path / "board.yaml"
    config_path.write_text(yaml.safe_dump(config))
    port = free_port()
    log = (tmp_path / "board.log").open("w")
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sftflow.cli",
            "board",
            "--port",
            str(port),
            "--saves",
            str(saves),
            "--config",
            str(config_path),
        ],  # fmt: skip
        cwd=tmp_path,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_http(url, proc, timeout=90)
        yield url, saves, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        for status in saves.rglob("board_status.json"):
            pid = json.loads(status.read_text()).get("pid")
            with contextlib.suppress(ProcessLookupError, PermissionError, TypeError):
                os.killpg(pid, signal.SIGKILL)


def open_page(browser, url: str):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    start = time.time()
    page.goto(url, timeout=30_000)
    # loaded: the form is there and the load event filled the run lists
    page.wait_for_function(
        "() => document.querySelector('#key-output_dir input, #key-output_dir textarea')?.value",
        timeout=30_000,
    )
    return page, time.time() - start


def text_of(page, selector: str) -> str:
    return page.locator(selector).inner_text(timeout=10_000)


def wait_text(page, selector: str, predicate, timeout: float, what: str) -> str:
    deadline = time.time() + timeout
    text = ""
    while time.time() < deadline:
        text = text_of(page, selector)
        if predicate(text):
            return text
        time.sleep(0.25)
    raise AssertionError(f"{what}: {selector} still says {text!r} after {timeout} s")


def step_of(text: str) -> int:
    words = text.split()
    return int(words[words.index("step") + 1]) if "step" in words else -1


def pick(page, elem_id: str, option: str) -> None:
    page.locator(f"#{elem_id} input").click()
    page.get_by_role("option", name=option, exact=True).click()


def fill(page, key: str, value: str) -> None:
    box = page.locator(f"#key-{key} input, #key-{key} textarea").first
    box.fill(value)


def test_board_in_a_browser(board, tmp_path):
    url, saves, board_proc = board
    shots = Path(os.environ.get("SFTFLOW_BOARD_SHOTS") or tmp_path / "shots")
    shots.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    def mark(what: str) -> None:
        print(f"[{time.time() - t0:5.1f} s] {what}", flush=True)

    with playwright_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=30_000)
        try:
            page, load_s = open_page(browser, url)
            mark(f"page loaded in {load_s:.2f} s")
            assert load_s < 30

            # the data browser: the training examples as the model sees them, trained tokens marked
            page.get_by_text("data: the examples as the model sees them").click()
            page.click("#data-btn")
            data = wait_text(page, "#data-box", lambda t: "example 0" in t or "error" in t, 60, "data")
            assert "18 examples" in data and page.locator("#data-box mark").count() >= 1, data
            mark("data browsed")

            # start a run from the page, and a second, shorter one beside it from the same form
            page.click("#start-btn")
            wait_text(page, "#train-message", lambda t: "started" in t, 30, "start")
            assert "sftflow train" in text_of(page, "#train-command")
            assert (saves / "first" / "train_config.yaml").is_file()
            fill(page, "max_steps", "4")
            page.click("#start-btn")
            wait_text(
                page, "#train-message", lambda t: "started" in t and "first" not in t, 30, "second start"
            )
            second = page.locator("#live-run input").input_value()
            assert second.startswith("run-"), second
            mark("started two runs")

            # as soon as the first one trains, stop it: the graceful SIGTERM path saves a checkpoint
            pick(page, "live-run", "first")
            wait_text(page, "#live-progress", lambda t: "first" in t and step_of(t) >= 1, 90, "first steps")
            page.click("#stop-btn")
            wait_text(page, "#train-message", lambda t: "SIGTERM sent" in t, 10, "stop")
            text = wait_text(page, "#live-progress", lambda t: "stopped" in t, 60, "stopped")
            stopped_at = step_of(text)
            assert 0 < stopped_at < 80, text
            assert list((saves / "first").glob("checkpoint-*")), "no checkpoint after Stop"
            mark(f"stopped at step {stopped_at}")

            # resume it, close the page and open it again mid-run: it opens on the running run, whose
            # charts go on from the checkpoint's step
            page.click("#resume-btn")
            wait_text(page, "#train-message", lambda t: "resumed" in t, 20, "resume")
            page.close()
            page, _ = open_page(browser, url)
            pick(page, "live-run", "first")
            wait_text(
                page, "#live-progress", lambda t: "first" in t and "running" in t and step_of(t) > stopped_at, 90, "reopen"
            )  # fmt: skip
            mark("reopened mid-run")
            chart = page.locator("#loss-plot")
            before = chart.screenshot()
            deadline = time.time() + 30
            while chart.screenshot() == before and time.time() < deadline:
                time.sleep(0.5)
            assert chart.screenshot() != before, "the loss chart did not change while the run went on"
            page.screenshot(path=str(shots / "board-train.png"))
            mark("chart updated")
            pick(page, "live-run", "first")
            text = wait_text(
                page, "#live-progress", lambda t: "first" in t and "finished" in t, 90, "resumed"
            )
            assert step_of(text) == 80, text
            log = (saves / "first" / "trainer_log.jsonl").read_text().splitlines()
            steps = [json.loads(line)["step"] for line in log if "loss" in json.loads(line)]
            assert steps == sorted(set(steps)) and steps[-1] == 80  # each step once across the resume

            mark("resumed run finished")
            # compare the two runs
            page.get_by_role("tab", name="Runs").click()
            deadline = time.time() + 60
            while text_of(page, "#runs-table").count("finished") < 2 and time.time() < deadline:
                page.click("#runs-refresh")
                time.sleep(1)
            assert text_of(page, "#runs-table").count("finished") == 2, text_of(page, "#runs-table")
            pick(page, "compare", "first")
            pick(page, "compare", second)
            page.keyboard.press("Escape")
            page.wait_for_timeout(1500)
            page.screenshot(path=str(shots / "board-runs.png"), full_page=False)
            legend = page.locator("#cmp-loss").inner_text()
            assert "first" in legend and second in legend, legend

            pick(page, "report-run", "first")
            page.click("#report-btn")
            page.wait_for_selector("#report iframe", timeout=30_000)
            assert "first" in page.frame_locator("#report iframe").locator("body").inner_text(timeout=10_000)
            mark("compared, report opened")
            rss = psutil.Process(board_proc.pid).memory_info().rss / 2**20
            print(f"board RSS before chat: {rss:.0f} MiB")
            # chat: the tuned model and its base answer the same prompt side by side
            page.get_by_role("tab", name="Chat").click()
            pick(page, "chat-run", "first")
            page.click("#chat-load")
            wait_text(page, "#chat-status", lambda t: "loaded" in t or "error" in t, 60, "chat load")
            assert "loaded first" in text_of(page, "#chat-status")
            page.locator("#chat-prompt textarea").fill("What is 2 plus 3?")
            page.click("#chat-send")
            tuned = page.locator("#chat-tuned textarea")
            base = page.locator("#chat-base textarea")
            deadline = time.time() + 30
            while time.time() < deadline and not (tuned.input_value() and base.input_value()):
                time.sleep(0.25)
            assert tuned.input_value() and base.input_value()
            assert tuned.input_value() != base.input_value()  # LoRA trained at lr 5e-3: they differ
            mark("chatted")

            # export: merge the LoRA run into a model dir
            page.get_by_role("tab", name="Export").click()
            pick(page, "export-run", "first")
            page.wait_for_function(
                "() => document.querySelector('#export-dir input, #export-dir textarea')?.value",
                timeout=10_000,
            )
            page.click("#export-btn")
            wait_text(page, "#export-status", lambda t: "exported" in t or "error" in t, 60, "export")
            assert "exported" in text_of(page, "#export-status"), text_of(page, "#export-status")
            assert (saves / "exports" / "first" / "config.json").is_file()
            mark("exported")
            rss = psutil.Process(board_proc.pid).memory_info().rss / 2**20
            print(f"board RSS after chat and export: {rss:.0f} MiB")
        finally:
            browser.close()
    assert board_proc.poll() is None, "the board died during the test"
    if os.environ.get("SFTFLOW_BOARD_SHOTS"):
        shutil.copy(tmp_path / "board.log", shots / "board.log")
