"""The fleet page of a real `satellite serve` over HTTP (httpx): login by token into a cookie,
read-only for `read` tokens, the attention order with a stopped poller, the satellite and job
pages, replay from the page (admin, CSRF), the unix socket trusted or with a login."""

from __future__ import annotations

import html
import re
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from satellite.service.tokens import TokensFile
from tests.support.fleet_scene import FleetScene, fleet_scene, page_rows, wait_for_rows
from tests.support.rabbitmq import AmqpVhost
from tests.support.serve_proc import ServeFactory

pytestmark = pytest.mark.integration
__all__ = ["fleet_scene"]  # the fixture, imported for pytest


def browser(port: int) -> httpx.Client:
    """A client without a bearer header: what a browser sends (cookies only)."""
    return httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found, html[:500]
    return found.group(1)


def login(http: httpx.Client, token: str, next_page: str = "/") -> httpx.Response:
    form = http.get("/login", params={"next": next_page})
    assert form.status_code == 200
    return http.post("/login", data={"token": token, "next": next_page, "csrf": csrf_of(form.text)})


def dlq_shown(scene: FleetScene, count: int) -> Callable[[str], bool]:
    """Whether the fleet page shows `count` dead letters and a job in each lane for the stopped
    satellite (the management API's figures lag by up to 5 s)."""

    def check(html: str) -> bool:
        row = html.split(f'data-satellite="{scene.stopped}"')[1].split("</tr>", maxsplit=1)[0]
        lanes = (
            'data-label="Bulk queue" class="num">1 ready',
            'data-label="Interactive" class="num">1 ready',
        )
        return f'data-label="DLQ" class="num">{count}<' in row and all(x in row for x in lanes)

    return check


def dlq_ids(scene: FleetScene) -> list[str]:
    with scene.serve.tcp(scene.admin) as api:
        listed = api.get(f"/v1/satellites/{scene.stopped}/dlq").json()
    return sorted(d["job_id"] for d in listed["dead_letters"])


def test_login_rows_in_attention_order_pages_and_replay(fleet_scene: FleetScene) -> None:
    scene = fleet_scene
    with browser(scene.serve.tcp_port) as http:
        # Not logged in: the login form, which comes back to the page asked for.
        first = http.get(f"/satellites/{scene.stopped}")
        assert first.status_code == 303
        assert first.headers["location"] == f"/login?next=%2Fsatellites%2F{scene.stopped}"
        assert http.get("/static/fleet.css").status_code == 200  # no login for the stylesheet
        # A wrong token, and a form without the CSRF token, are refused.
        assert login(http, "usm_not-a-token").status_code == 401
        no_csrf = http.post("/login", data={"token": scene.reader, "next": "/"})
        assert no_csrf.status_code == 403
        assert "usm_session" not in http.cookies
        # A reader logs in: an HttpOnly, SameSite=Strict cookie (not Secure over plain http).
        done = login(http, scene.reader, f"/satellites/{scene.stopped}")
        assert done.status_code == 303
        assert done.headers["location"] == f"/satellites/{scene.stopped}"
        cookie = done.headers["set-cookie"]
        assert "HttpOnly" in cookie
        assert "SameSite=strict" in cookie
        assert "Secure" not in cookie
        # The stopped satellite first, although its id sorts last.
        rows = wait_for_rows(
            http, {scene.stopped: "critical", scene.healthy: "ok"}, until=dlq_shown(scene, 2)
        )
        assert [sid for sid, _ in rows if sid in (scene.healthy, scene.stopped)] == [
            scene.stopped,
            scene.healthy,
        ]
        page = http.get("/")
        assert page.headers["content-type"].startswith("text/html")
        assert "script-src 'self'" in page.headers["content-security-policy"]
        assert page.headers["cache-control"] == "no-store"
        text = page.text
        stopped_row = text.split(f'data-satellite="{scene.stopped}"')[1].split("</tr>")[0]
        assert "no consumer on the job queue" in stopped_row
        assert "no heartbeat" in stopped_row
        assert re.search(r'data-label="DLQ" class="num">2<', stopped_row)
        assert re.search(r'data-label="Interactive" class="num">1 ready', stopped_row)
        assert re.search(r'data-label="Bulk queue" class="num">1 ready', stopped_row)
        healthy_row = text.split(f'data-satellite="{scene.healthy}"')[1].split("</tr>")[0]
        assert re.search(r'data-label="Replicas" class="num">1<', healthy_row)
        assert "timeout 2" in healthy_row
        assert "auth_failed 1" in healthy_row
        assert "75% of 4" in healthy_row
        assert 'src="/static/refresh.js"' in text
        assert '<meta http-equiv="refresh"' in text  # inside <noscript>
        assert "http://" not in text.replace(f"http://127.0.0.1:{scene.serve.tcp_port}", "")
        # The satellite page: its DLQ, the queued job's age, no replay button for a reader.
        sat = http.get(f"/satellites/{scene.stopped}").text
        for letter in scene.letters:
            assert f'data-letter="{letter}"' in sat
        assert "Replaying needs a token with the admin scope" in sat
        assert "/replay" not in sat
        refused = http.post(
            f"/satellites/{scene.stopped}/replay",
            data={"csrf": csrf_of(sat), "id": scene.letters[0]},
        )
        assert refused.status_code == 403
        assert dlq_ids(scene) == scene.letters
        healthy = http.get(f"/satellites/{scene.healthy}").text
        assert f'data-worker="poller-{scene.healthy}-0"' in healthy
        assert f'href="/jobs?q={scene.host}"' in healthy  # the slowest devices
        assert "auth_failed" in healthy  # recent errors
        assert http.get("/satellites/nosuch-sat").status_code == 404
        # The job page: by id (to the record as JSON), by host (a list).
        by_id = http.get("/jobs", params={"q": scene.answered_job}, follow_redirects=True)
        assert by_id.url.path == f"/jobs/{scene.answered_job}"
        assert '"status": "ok"' in html.unescape(by_id.text)
        assert "community" not in by_id.text
        by_host = http.get("/jobs", params={"q": scene.host})
        assert f'href="/jobs/{scene.answered_job}"' in by_host.text
        assert "No job with the id" in http.get("/jobs", params={"q": "nothing-here"}).text
        assert http.get("/jobs/nothing-here").status_code == 404
        # Log out: the cookie is gone and the page asks for a token again.
        out = http.post("/logout", data={"csrf": csrf_of(http.get("/").text)})
        assert out.status_code == 303
        assert http.get("/").status_code == 303

    with browser(scene.serve.tcp_port) as http:
        assert login(http, scene.admin, f"/satellites/{scene.stopped}").status_code == 303
        sat = http.get(f"/satellites/{scene.stopped}").text
        assert f'aria-label="Replay {scene.letters[0]}"' in sat
        token = csrf_of(sat)
        url = f"/satellites/{scene.stopped}/replay"
        # No CSRF token, a stale one, or another origin: refused, nothing replayed.
        assert http.post(url, data={"id": scene.letters[0]}).status_code == 403
        assert http.post(url, data={"id": scene.letters[0], "csrf": "x" * 43}).status_code == 403
        cross = http.post(
            url,
            data={"id": scene.letters[0], "csrf": token},
            headers={"Origin": "http://evil.example"},
        )
        assert cross.status_code == 403
        assert dlq_ids(scene) == scene.letters
        replayed = http.post(url, data={"id": scene.letters[0], "csrf": token})
        assert replayed.status_code == 303
        after = http.get(replayed.headers["location"]).text
        assert "DLQ replay: 1 replayed." in after
        forged = http.get(f"/satellites/{scene.stopped}", params={"replayed": "call 555"}).text
        assert "call 555" not in forged
        assert dlq_ids(scene) == scene.letters[1:]
        assert http.post(url, data={"all": "1", "csrf": token}).status_code == 303
        assert dlq_ids(scene) == []

    # A bearer header works as well as the cookie (scripts, curl).
    with scene.serve.tcp(scene.reader) as api:
        assert page_rows(api.get("/").text)
    # Over the unix socket (trusted by default) there is no login; nginx serves it from there.
    with scene.serve.unix() as local:
        page = local.get("/")
        assert page.status_code == 200
        assert scene.stopped in dict(page_rows(page.text))
        assert "unix-socket · admin" in page.text
    log = scene.serve.log_text()
    assert scene.reader not in log
    assert scene.admin not in log


def test_a_unix_socket_that_needs_tokens_takes_the_login_behind_https(
    amqp_vhost: AmqpVhost, tmp_path: Path
) -> None:
    tokens = TokensFile(tmp_path / "state" / "tokens.yaml")
    reader = tokens.create("page-reader", ["read"])
    factory = ServeFactory(amqp_vhost, tmp_path)
    try:
        serve = factory(USM_CORE_UNIX_AUTH="token")
        transport = httpx.HTTPTransport(uds=str(serve.socket_path))
        proxy = {"X-Forwarded-Proto": "https", "Host": "fleet.example"}
        with httpx.Client(
            transport=transport, base_url="http://fleet.example", headers=proxy, timeout=60
        ) as http:
            assert http.get("/").headers["location"] == "/login?next=%2F"
            # Behind a proxy that terminates https both cookies are Secure; httpx would not
            # send them back over http, so the test sends them as a browser on https would.
            form = http.get("/login")
            assert "Secure" in form.headers["set-cookie"]
            csrf = form.cookies["usm_csrf"]
            done = http.post(
                "/login",
                data={"token": reader, "next": "/", "csrf": csrf},
                headers={"Cookie": f"usm_csrf={csrf}"},
            )
            assert done.status_code == 303
            assert "Secure" in done.headers["set-cookie"]
            session = done.cookies["usm_session"]
            page = http.get("/", headers={"Cookie": f"usm_session={session}"})
            assert page.status_code == 200
            assert "page-reader · read-only" in page.text
        # Over TCP a forged X-Forwarded-Proto does not make the cookie Secure (only the socket's
        # proxy is trusted to say it).
        with browser(serve.tcp_port) as http:
            done = login(http, reader)
            assert "Secure" not in done.headers["set-cookie"]
    finally:
        factory.kill_all()


def test_without_the_management_api_the_fleet_says_so_and_jobs_still_work(
    amqp_vhost: AmqpVhost, tmp_path: Path
) -> None:
    factory = ServeFactory(amqp_vhost, tmp_path)
    try:
        serve = factory(USM_MANAGEMENT_URL="http://127.0.0.1:9")  # nothing listens on 9
        with serve.unix() as local:
            page = local.get("/")
            assert page.status_code == 503
            assert "management_unavailable" in page.text
            assert page.headers["content-type"].startswith("text/html")
            assert local.get("/satellites/s1").status_code == 503
            jobs = local.get("/jobs", params={"q": "10.0.0.1"})
            assert jobs.status_code == 200
            assert "No job with the id" in jobs.text
    finally:
        factory.kill_all()
