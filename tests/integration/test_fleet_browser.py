"""The fleet page in a real browser: Debian's chromium driven by Playwright (no browser
download), against a real `satellite serve` with two satellites, one of them stopped.

Login, the rows in attention order, the satellite and job pages, replay from the page, the
schedules page (run now and pause as admin; no buttons and a 403 for a reader), the alerts page
(firing alerts per satellite, the failing channel, every attempt), the page without JavaScript
and its self-refresh, light and dark schemes and a phone-sized viewport, and an axe-core pass
over every page (no serious or critical violation). Screenshots go to
`$USM_TEST_ARTIFACTS/screenshots` (default `.artifacts/screenshots`); the test prints the folder.
Without chromium or axe-core (scripts/setup.sh installs both) the test is skipped locally and
fails under CI.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.fleet_scene import FleetScene, fleet_scene

pytestmark = pytest.mark.integration
__all__ = ["fleet_scene"]  # the fixture, imported for pytest

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("USM_TEST_CHROMIUM", "/usr/bin/chromium")
AXE_VERSION = "4.14.1"
AXE = Path(
    os.environ.get("USM_TEST_AXE", ROOT / ".cache" / "axe-core" / AXE_VERSION / "axe.min.js")
)
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
PHONE = {"width": 390, "height": 844}
DESKTOP = {"width": 1500, "height": 900}


def _missing() -> str | None:
    if not (Path(CHROMIUM).is_file() or shutil.which(CHROMIUM)):
        return f"no chromium at {CHROMIUM} (scripts/setup.sh installs Debian's)"
    if not AXE.is_file():
        return f"no axe-core at {AXE} (scripts/setup.sh fetches it with npm)"
    try:
        import playwright.sync_api  # noqa: F401, PLC0415 - only to know it is there
    except ImportError:
        return "playwright is not installed (the dev extra)"
    return None


@pytest.fixture
def shots() -> Path:
    base = Path(os.environ.get("USM_TEST_ARTIFACTS") or ROOT / ".artifacts")
    folder = base / "screenshots"
    folder.mkdir(parents=True, exist_ok=True)
    print(f"\nscreenshots: {folder}")
    return folder


@pytest.fixture
def browser() -> Iterator[Any]:
    reason = _missing()
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright  # noqa: PLC0415 - after the check above

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


def rows(page: Any) -> list[tuple[str, str]]:
    found: list[list[str]] = page.eval_on_selector_all(
        "tr[data-satellite]", "trs => trs.map(t => [t.dataset.satellite, t.dataset.level])"
    )
    return [(sid, level) for sid, level in found]


def login(page: Any, base: str, token: str) -> None:
    page.goto(f"{base}/")
    assert page.url.startswith(f"{base}/login?next=")
    page.fill("#token", token)
    page.click("form.login button[type=submit]")
    page.wait_for_url(f"{base}/")


def wait_rows(page: Any, scene: FleetScene, base: str) -> list[tuple[str, str]]:
    """Reload until the stopped satellite is critical with its 2 dead letters shown."""
    for _ in range(120):
        page.goto(f"{base}/")
        levels = dict(rows(page))
        dlq = page.locator(f'tr[data-satellite="{scene.stopped}"] td[data-label="DLQ"]')
        if (
            levels.get(scene.stopped) == "critical"
            and levels.get(scene.healthy) == "ok"
            and dlq.count()
            and dlq.inner_text().strip() == "2"
        ):
            return rows(page)
        page.wait_for_timeout(500)
    raise AssertionError(f"the page never showed the scene: {rows(page)}")


def axe_violations(page: Any) -> list[dict[str, Any]]:
    page.add_script_tag(content=AXE.read_text())
    result: dict[str, Any] = page.evaluate(
        "async () => await axe.run(document, {resultTypes: ['violations']})"
    )
    return [v for v in result["violations"] if v.get("impact") in ("serious", "critical")]


@pytest.mark.timeout(400)
def test_the_fleet_page_in_chromium(browser: Any, fleet_scene: FleetScene, shots: Path) -> None:
    scene = fleet_scene
    base = f"http://127.0.0.1:{scene.serve.tcp_port}"
    context = browser.new_context(viewport=DESKTOP, color_scheme="light")
    page = context.new_page()
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    # A request cut short by the next navigation (the favicon while wait_rows reloads the page)
    # is net::ERR_ABORTED, not a fault of the page; any other failure is.
    page.on(
        "requestfailed",
        lambda r: (
            None
            if r.failure == "net::ERR_ABORTED"
            else problems.append(f"failed: {r.url} ({r.failure})")
        ),
    )
    page.on(
        "response", lambda r: problems.append(f"{r.status} {r.url}") if r.status >= 400 else None
    )
    outside: list[str] = []
    page.on("request", lambda r: None if r.url.startswith(base) else outside.append(r.url))

    # Login as a reader; the rows in attention order (the stopped satellite sorts last by id).
    page.goto(f"{base}/")
    page.screenshot(path=shots / "login.png")
    login(page, base, scene.reader)
    order = [sid for sid, _ in wait_rows(page, scene, base)]
    assert order.index(scene.stopped) < order.index(scene.healthy)
    assert (
        page.locator(f'tr[data-satellite="{scene.stopped}"]')
        .inner_text()
        .count("no consumer on the job queue")
    )
    page.screenshot(path=shots / "fleet-light.png", full_page=True)
    # Dark scheme (checked below): opened now, so that its self-reload (REFRESH_SECONDS after
    # it loaded) comes while the light pages are checked instead of being waited for after.
    dark = browser.new_context(viewport=DESKTOP, color_scheme="dark")
    dark_page = dark.new_page()
    login(dark_page, base, scene.reader)
    dark_rendered = dark_page.inner_text("footer")
    dark_loads: list[float] = []
    dark_page.on("load", lambda _page: dark_loads.append(time.monotonic()))
    page.set_viewport_size({"width": 1200, "height": 200})  # docs/img/fleet.png is this one
    page.screenshot(path=shots / "fleet-docs.png", full_page=True)
    page.set_viewport_size(DESKTOP)

    # The satellite page: replicas, DLQ (no replay button for a reader), errors.
    page.click(f'a[href="/satellites/{scene.stopped}"]')
    page.wait_for_url(f"{base}/satellites/{scene.stopped}")
    assert page.locator("tr[data-letter]").count() == 2
    assert page.locator("button", has_text="Replay").count() == 0
    page.goto(f"{base}/satellites/{scene.healthy}")
    assert page.locator(f'tr[data-worker="poller-{scene.healthy}-0"]').count() == 1
    page.screenshot(path=shots / "satellite-light.png", full_page=True)

    # The job page: search by id, the record as JSON.
    page.click('nav a[href="/jobs"]')
    page.fill("#q", scene.answered_job)
    page.press("#q", "Enter")
    page.wait_for_url(f"{base}/jobs/{scene.answered_job}")
    record = json.loads(page.inner_text("pre.json"))
    assert record["id"] == scene.answered_job
    assert record["status"] == "ok"
    page.screenshot(path=shots / "job-light.png", full_page=True)
    page.fill("#q", scene.host)
    page.press("#q", "Enter")
    assert page.locator(f'a[href="/jobs/{scene.answered_job}"]').count() == 1

    # The schedules page as a reader: every schedule, no button; a POST anyway is refused.
    name = scene.schedules[0]
    page.click('nav a[href="/schedules"]')
    page.wait_for_url(f"{base}/schedules")
    listed = page.eval_on_selector_all(
        "tr[data-schedule]", "trs => trs.map(t => t.dataset.schedule)"
    )
    assert sorted(listed) == sorted(scene.schedules)
    assert page.locator("tr[data-schedule] button").count() == 0
    csrf = page.locator("input[name=csrf]").first.get_attribute("value")
    refused = page.request.post(
        f"{base}/schedules/{name}/pause", form={"csrf": csrf or ""}, max_redirects=0
    )
    assert refused.status == 403
    problems[:] = [p for p in problems if f"/schedules/{name}/pause" not in p]

    # Log out, log in as admin, replay one dead letter from the page.
    page.click(".who button")
    page.wait_for_url(f"{base}/login")
    login(page, base, scene.admin)
    page.goto(f"{base}/satellites/{scene.stopped}")
    page.click(f'button[aria-label="Replay {scene.letters[0]}"]')
    page.wait_for_url(f"{base}/satellites/{scene.stopped}?replayed=*")
    assert "DLQ replay: 1 replayed." in page.inner_text("main")
    assert [
        e.get_attribute("data-letter") for e in page.locator("tr[data-letter]").all()
    ] == scene.letters[1:]
    page.screenshot(path=shots / "replayed-light.png", full_page=True)

    # Schedules as admin: run one now (its own slot: one job, published once), then pause it.
    page.click('nav a[href="/schedules"]')
    row = page.locator(f'tr[data-schedule="{name}"]')
    assert row.locator('td[data-label="Satellite"]').inner_text().strip() == scene.healthy
    row.locator(f'button[aria-label="Run now: {name}"]').click()
    page.wait_for_url(f"{base}/schedules?done=*")
    assert f"{name}: run now, 1 job(s) published." in page.inner_text("main")
    row.locator(f'button[aria-label="Pause {name}"]').click()
    page.wait_for_url(f"{base}/schedules?done=*")
    assert f"{name}: paused." in page.inner_text("main")
    assert row.locator("td.state").inner_text().strip() == "paused"
    assert row.locator(f'button[aria-label="Resume {name}"]').count() == 1
    with scene.serve.tcp(scene.admin) as api:
        assert api.get(f"/v1/schedules/{name}").json()["paused"] is True
        ran = api.get("/v1/jobs", params={"source": f"schedule:{name}"}).json()["items"]
    assert [j["id"].startswith(f"{name}:run") for j in ran] == [True]
    page.set_viewport_size({"width": 1200, "height": 200})  # docs/img/schedules.png
    page.screenshot(path=shots / "schedules-light.png", full_page=True)
    page.set_viewport_size(DESKTOP)
    # The satellite page lists its schedules (with the same buttons).
    page.goto(f"{base}/satellites/{scene.healthy}")
    assert page.locator(f'tr[data-schedule="{name}"] td.state').inner_text().strip() == "paused"

    # Alerts: the stopped satellite fires; `pager` (always 500) is failing, every attempt shown.
    page.click('nav a[href="/alerts"]')
    firing = f'section[data-satellite="{scene.stopped}"] tr[data-rule="satellite_down"]'
    for _ in range(120):
        page.goto(f"{base}/alerts")
        if (
            page.locator(f'{firing}[data-state="firing"]').count()
            and page.locator('tr[data-channel="pager"].row-critical').count()
        ):
            break
        page.wait_for_timeout(500)
    else:
        raise AssertionError(page.inner_text("main"))
    assert page.locator('tr[data-status="failed"] td[data-label="HTTP"]').first.inner_text() == (
        "500"
    )
    assert page.locator('tr[data-status="sent"]').count() >= 1
    assert any(
        r.json()["satellite"] == scene.stopped and r.json()["alert"] == "satellite_down"
        for r in scene.ops.requests
    )
    page.set_viewport_size({"width": 1200, "height": 200})  # docs/img/alerts.png
    page.screenshot(path=shots / "alerts-light.png", full_page=True)
    page.set_viewport_size(DESKTOP)
    assert problems == []
    assert outside == []
    context.close()

    # Dark scheme: the page follows prefers-color-scheme; it reloads itself (refresh.js) after
    # REFRESH_SECONDS after its login (waited for up to 40 s, as before).
    page = dark_page
    for _ in range(80):
        if dark_loads:
            break
        page.wait_for_timeout(500)
    assert dark_loads, "the page did not reload itself"
    assert page.inner_text("footer") != dark_rendered  # rendered again (a time to the second)
    background = page.evaluate("getComputedStyle(document.body).backgroundColor")
    assert background == "rgb(13, 17, 23)"
    page.screenshot(path=shots / "fleet-dark.png", full_page=True)
    dark.close()

    # A phone: the table turns into cards with labelled fields.
    phone = browser.new_context(viewport=PHONE, color_scheme="light", is_mobile=True)
    page = phone.new_page()
    login(page, base, scene.reader)
    cell = page.locator(f'tr[data-satellite="{scene.stopped}"] td[data-label="DLQ"]')
    assert cell.evaluate("td => getComputedStyle(td, '::before').content") == '"DLQ"'
    assert page.locator("table.fleet thead").evaluate("e => getComputedStyle(e).position") == (
        "absolute"
    )
    wide = page.evaluate(
        """w => [...document.querySelectorAll('body *')]
            .filter(e => e.getBoundingClientRect().right > w + 0.5)
            .map(e => e.tagName + '.' + e.className + ' ' + e.getBoundingClientRect().right)
            .slice(0, 5)""",
        PHONE["width"],
    )
    assert wide == [], "the fleet page scrolls sideways on a phone"
    page.screenshot(path=shots / "fleet-phone.png", full_page=True)
    page.screenshot(path=shots / "fleet-phone-docs.png")  # the first screen: docs/img
    phone.close()

    # Without JavaScript: the same rows; a <noscript> meta refresh does the reloading.
    plain = browser.new_context(viewport=DESKTOP, java_script_enabled=False)
    page = plain.new_page()
    login(page, base, scene.reader)
    assert dict(rows(page)).get(scene.stopped) == "critical"
    plain.close()


@pytest.mark.timeout(400)
def test_the_pages_pass_axe(browser: Any, fleet_scene: FleetScene) -> None:
    """axe-core over every page in both schemes and on a phone: no serious/critical violation.
    (The context bypasses the page's CSP only so that the test can inject axe.)"""
    scene = fleet_scene
    base = f"http://127.0.0.1:{scene.serve.tcp_port}"
    pages = [
        "/login",
        "/",
        f"/satellites/{scene.stopped}",
        f"/satellites/{scene.healthy}",
        f"/jobs?q={scene.host}",
        f"/jobs/{scene.answered_job}",
        "/jobs?q=nothing-here",
        "/schedules",
        "/alerts",
    ]
    found: dict[str, list[str]] = {}
    for scheme, viewport in (("light", DESKTOP), ("dark", DESKTOP), ("light", PHONE)):
        context = browser.new_context(viewport=viewport, color_scheme=scheme, bypass_csp=True)
        page = context.new_page()
        page.goto(f"{base}/login")
        violations = axe_violations(page)
        login(page, base, scene.admin)
        wait_rows(page, scene, base)
        for path in pages[1:]:
            page.goto(f"{base}{path}")
            violations += axe_violations(page)
        for v in violations:
            key = f"{scheme} {viewport['width']}px: {v['id']} ({v['impact']})"
            found.setdefault(key, []).extend(n["target"][0] for n in v["nodes"][:3])
        context.close()
    assert found == {}, json.dumps(found, indent=1)
