"""The status page in a real headless Chromium, served by a coordinator running real rounds.

Needs Debian's ``chromium`` and ``chromium-driver`` (``make test`` installs them when
missing). The screenshot is written to the test's tmp dir, and also to
``$MASKFL_SCREENSHOT_DIR`` when that is set.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from maskfl.broker_coordinator.cli import main
from maskfl.protocol.masking import EvalCounts
from maskfl.protocol.topics import Topics
from maskfl.testing.broker import Mosquitto, free_port
from maskfl.testing.participants import Behaviour, SimParticipant, start_all, stop_all, wait_for
from tests.broker_coordinator.support import make_setup, running_coordinator

pytestmark = [pytest.mark.broker, pytest.mark.slow, pytest.mark.timeout(180)]

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")


def _browser() -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,2200"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(executable_path=str(DRIVER)), options=options)


def _look(
    url: str, current: Callable[[], int | None], device: str, revoked: str, shot: Path
) -> dict[str, Any]:
    """Load the page, wait until it shows the round in progress (``current()``, read at
    each poll: rounds go on meanwhile) and ``revoked`` as revoked, read the DOM, take the
    screenshot."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = _browser()
    try:
        driver.get(url)
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: d.find_element(By.ID, "round").text == str(current()))
        wait.until(
            lambda d: (
                int(d.find_element(By.ID, "chart-participants").get_attribute("data-points") or 0)
                >= 2
            )
        )
        wait.until(
            lambda d: (
                d.find_element(
                    By.CSS_SELECTOR, f'#devices tr[data-device="{revoked}"] td:nth-child(4)'
                ).text
                == "REVOKED"
            )
        )
        row = driver.find_element(By.CSS_SELECTOR, f'#devices tr[data-device="{device}"]')
        wait.until(
            lambda d: (
                int(d.find_element(By.ID, "chart-eval").get_attribute("data-points") or 0) >= 2
            )
        )

        def shows_the_live_round(d: Any) -> tuple[str, int] | None:
            # The round in progress read before and after the page: the same, and shown.
            before = current()
            shown = d.find_element(By.ID, "round").text
            after = current()
            if before is None or before != after or shown != str(before):
                return None
            return shown, before

        shown, live = wait.until(shows_the_live_round)
        found = {
            "eval_points": int(
                driver.find_element(By.ID, "chart-eval").get_attribute("data-points")
            ),
            "round": shown,
            "live_round": live,
            "phase": driver.find_element(By.ID, "phase").text,
            "points": int(
                driver.find_element(By.ID, "chart-participants").get_attribute("data-points")
            ),
            "canvases": len(driver.find_elements(By.CSS_SELECTOR, "#chart-participants canvas")),
            "device_row": [td.text for td in row.find_elements(By.TAG_NAME, "td")],
            "round_rows": len(driver.find_elements(By.CSS_SELECTOR, "#rounds tbody tr")),
            "progress": driver.find_element(By.ID, "progress-text").text,
            "console": [
                entry
                for entry in driver.get_log("browser")
                if entry.get("level") == "SEVERE" and "favicon" not in entry.get("message", "")
            ],
        }
        driver.save_screenshot(str(shot))
        found["screenshot_bytes"] = shot.stat().st_size
        if out := os.environ.get("MASKFL_SCREENSHOT_DIR"):
            Path(out).mkdir(parents=True, exist_ok=True)
            shutil.copy(shot, Path(out) / shot.name)
        return found
    finally:
        driver.quit()


@pytest.mark.skipif(
    CHROMIUM is None or DRIVER is None,
    reason="needs Debian's chromium and chromium-driver (make test installs them)",
)
async def test_status_page_shows_a_live_fleet(  # noqa: PLR0915 one live fleet, checked page by page
    tmp_path: Path, mosquitto: Mosquitto, capsys: pytest.CaptureFixture[str]
) -> None:
    port = free_port()
    n = 6
    setup = make_setup(
        tmp_path,
        mosquitto.port,
        summers=2,
        updaters=4,
        extra={
            "http": {"enabled": True, "host": "127.0.0.1", "port": port},
            "fleet": {"revocations_file": "revoked.bin", "revocations_poll_s": 0.2},
            # Rounds after the first draw roles at p_sum = 0.5 among six devices: with
            # the default floor (3 updates) a third of them fail and two completed
            # rounds could take longer than the wait below.
            "privacy": {"min_updates": 2},
        },
        pet={
            "max_rounds": 0,
            # A round lasts at least 3 s, longer than the page's 2 s refresh.
            "sum": {"count_min": 1, "count_max": n, "time_min_s": 2.0, "time_max_s": 20.0},
            "update": {"count_min": 2, "count_max": n, "time_min_s": 1.0, "time_max_s": 20.0},
            "sum2": {"count_min": 1, "count_max": n, "time_min_s": 0.5, "time_max_s": 20.0},
        },
    )
    ca = setup.fleet.ca_public_key

    def evaluation(round_id: int) -> EvalCounts:
        # What an updater's held-out data would say of the model it starts from.
        return EvalCounts(100, min(100, 10 + 20 * round_id), 230.0 / round_id)

    parts = [
        SimParticipant(
            i,
            ca_public_key=ca,
            host=mosquitto.host,
            port=mosquitto.port,
            behaviour=Behaviour(evaluation=evaluation),
        )
        for i in setup.summers + setup.updaters
    ]
    await start_all(parts)
    try:
        async with running_coordinator(setup.config_path) as coordinator:
            await wait_for(lambda: coordinator.runner is not None, 30, "the coordinator")
            runner = coordinator.runner
            assert runner is not None
            # A message the coordinator must reject, from a known device: garbage on its
            # own update topic (counted as malformed for that device).
            first = parts[0]
            await first.publish(
                Topics(setup.fleet.fleet).update(1, first.device), b"not a message", 1 << 16
            )
            await wait_for(lambda: runner.rounds_completed >= 2, 90, "two completed rounds")
            victim = parts[-1]
            setup.fleet.revocations(
                setup.config_path.parent / "revoked.bin", [victim.identity.certificate.serial], 1
            )
            assert coordinator.services is not None
            enrollment = coordinator.services.enrollment
            await wait_for(lambda: enrollment.revocations is not None, 10, "the revocation list")
            await wait_for(lambda: runner.state is not None, 30, "the third round to start")
            assert runner.state is not None
            third = runner.state.round_id

            def current() -> int | None:
                state = runner.state
                return None if state is None else state.round_id

            shot = tmp_path / "status-page.png"
            found = await asyncio.to_thread(
                _look, f"http://127.0.0.1:{port}/", current, first.device, victim.device, shot
            )
    finally:
        await stop_all(parts)
    assert int(found["round"]) >= third
    assert found["round"] == str(found["live_round"]), found
    assert found["eval_points"] >= 2, found  # fleet accuracy of v0 and v1 at least
    assert found["points"] >= 2 and found["canvases"] == 1, found
    assert found["round_rows"] >= 3, found
    row = found["device_row"]
    assert row[0] == first.device
    assert row[3] == "no"  # not revoked
    assert "malformed" in row[6], row
    assert not found["console"], found["console"]
    assert found["screenshot_bytes"] > 10_000

    # The same table from the database, as an operator's second process reads it.
    config = str(setup.config_path)
    assert await asyncio.to_thread(main, ["devices", "--config", config, "--json"]) == 0
    rows = {r["device"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(rows) == {p.device for p in parts}
    assert rows[victim.device]["revoked"] is True
    assert rows[first.device]["revoked"] is False
    assert rows[first.device]["rejected"]["malformed"] == 1
    assert sum(r["accepted"]["update"] for r in rows.values()) >= 2
    for r in rows.values():
        assert set(r) == {
            "device",
            "serial",
            "first_seen",
            "last_seen",
            "alive",
            "revoked",
            "roles",
            "accepted",
            "rejected",
        }  # metadata only: nothing of a device's update
        assert r["roles"][0]["round_id"] >= third
    assert await asyncio.to_thread(main, ["devices", "--config", config]) == 0
    text = capsys.readouterr().out
    assert "REVOKED" in text and "malformed x1" in text, text
