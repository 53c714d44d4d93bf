"""The fleet page and its companions, server-rendered HTML (DESIGN §12).

`/` the fleet, one row per satellite in attention order; `/satellites/{id}` one satellite
(replicas and their heartbeats, recent errors, slowest devices, its DLQ with replay);
`/jobs` search by id or host and `/jobs/{id}` one job as JSON; `/schedules` every schedule
(run now, pause, resume); `/alerts` the alerts per satellite, the silences, the channels and the
notifications' archive; `/login` and `/logout`.

Everything is readable without JavaScript; `static/refresh.js` reloads the fleet, satellite,
schedules and alerts pages every `REFRESH_SECONDS` (a `<noscript>` meta refresh does it without
script). Reading needs the `read` scope; replay, run now, pause and resume need `admin` (POST
forms with a CSRF token). The pages use no
resource from outside the service (a strict Content-Security-Policy says so to the browser).
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote, urlencode

from fastapi import APIRouter, FastAPI, Request
from fastapi import Path as PathParam
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, FileSystemLoader, select_autoescape

from poller import __version__
from poller.logging import get_logger
from satellite.service.alerts import AlertsConfig, archive_page
from satellite.service.api.alerts import alerts_overview
from satellite.service.auth import AuthProblem, Principal
from satellite.service.deadletters import DeadLetterError, DeadLetters
from satellite.service.fleet import FleetError, FleetWatch
from satellite.service.jobs import JobService
from satellite.service.scheduler import Scheduler, UnknownScheduleError
from satellite.service.store import JobFilter
from satellite.service.tokens import Scope, TokensError
from satellite.service.web import session
from satellite.service.web.history import fleet_history, slowest_hosts
from satellite.service.web.overview import collect
from satellite.status import uptime_text

__all__ = ["REFRESH_SECONDS", "install", "router"]

log = get_logger("satellite.service.web")

REFRESH_SECONDS = 15
HERE = Path(__file__).parent
SatelliteId = Annotated[str, PathParam(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
JobId = Annotated[str, PathParam(min_length=1, max_length=128)]
ScheduleName = Annotated[str, PathParam(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)

_REPLAY_NOTE = re.compile(r"\d{1,6} replayed(, \d{1,6} not replayed)?")
_SCHEDULE_NOTE = re.compile(
    r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}: (paused|resumed|run now, \d{1,6} job\(s\) published)"
)
#: The notifications' archive rows on the alerts page.
ARCHIVE_ROWS = 100

router = APIRouter(include_in_schema=False)


def _age(seconds: float | None) -> str:
    return "—" if seconds is None else uptime_text(seconds)


def _rate(value: float) -> str:
    return f"{value:.1f}" if value < 100 else f"{value:.0f}"


def _bytes(value: int) -> str:
    return f"{value / 1_048_576:.0f} MiB"


_env = Environment(
    loader=FileSystemLoader(HERE / "templates"),
    autoescape=select_autoescape(["html"]),
    trim_blocks=True,
    lstrip_blocks=True,
)
_env.filters.update(age=_age, rate=_rate, mib=_bytes)


def install(app: FastAPI) -> None:
    """Add the pages and their static files (CSS, the refresh script) to `app`."""
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")


def _render(
    request: Request,
    template: str,
    who: Principal | None,
    status_code: int = 200,
    **context: Any,
) -> HTMLResponse:
    context |= {
        "who": who,
        "admin": who is not None and "admin" in who.scopes,
        "login_needed": session.login_needed(request),
        "csrf": session.csrf_token(request),
        "version": __version__,
        "path": request.url.path,
        "now": datetime.now(UTC),
    }
    html = _env.get_template(template).render(context)
    response = HTMLResponse(html, status_code=status_code)
    session.remember_csrf(request, response)
    response.headers.update(
        {
            "cache-control": "no-store",
            "content-security-policy": CSP,
            "x-content-type-options": "nosniff",
            "referrer-policy": "same-origin",
            "x-frame-options": "DENY",
        }
    )
    return response


def _who(request: Request, scope: Scope) -> Principal | Response:
    """The principal, or the response to give instead (login page, 403, 503)."""
    try:
        return session.principal(request, scope)
    except AuthProblem as exc:
        if exc.status == 401 and request.method == "GET":
            target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            return RedirectResponse(f"/login?{urlencode({'next': target})}", status_code=303)
        return _render(request, "error.html", None, exc.status, title=exc.code, detail=exc.detail)


def _store(request: Request) -> Any:
    jobs: JobService = request.app.state.jobs
    return jobs.store


@router.get("/", response_class=HTMLResponse)
async def fleet_page(request: Request) -> Response:
    who = _who(request, "read")
    if isinstance(who, Response):
        return who
    store = _store(request)
    now = store.clock()
    history = await fleet_history(store.engine, now)
    fleet: FleetWatch = request.app.state.fleet
    try:
        rows = await collect(fleet, history, now)
    except FleetError as exc:
        return _render(request, "error.html", who, exc.status, title=exc.code, detail=exc.detail)
    counts = {level: sum(1 for r in rows if r.level == level) for level in ("critical", "warning")}
    return _render(
        request,
        "fleet.html",
        who,
        rows=rows,
        counts=counts,
        refresh=REFRESH_SECONDS,
        heartbeats=fleet.connected,
    )


@router.get("/satellites/{satellite_id}", response_class=HTMLResponse)
async def satellite_page(satellite_id: SatelliteId, request: Request) -> Response:
    who = _who(request, "read")
    if isinstance(who, Response):
        return who
    store = _store(request)
    now = store.clock()
    history = await fleet_history(store.engine, now)
    try:
        rows = await collect(request.app.state.fleet, history, now, only=satellite_id)
    except FleetError as exc:
        return _render(request, "error.html", who, exc.status, title=exc.code, detail=exc.detail)
    if not rows:
        return _render(
            request,
            "error.html",
            who,
            404,
            title="unknown_satellite",
            detail=f"no queue and no heartbeat for {satellite_id!r}",
        )
    errors = await store.search(JobFilter(satellite_id=satellite_id, status="error"), limit=20)
    slowest = await slowest_hosts(store.engine, satellite_id, now)
    dead: DeadLetters = request.app.state.dead_letters
    dlq_error = None
    try:
        letters = await dead.list(satellite_id)
    except DeadLetterError as exc:
        letters, dlq_error = [], exc.detail
    return _render(
        request,
        "satellite.html",
        who,
        schedules=await _schedule_rows(request, satellite_id),
        has_scheduler=_scheduler(request) is not None,
        done=_schedule_note(request.query_params.get("done")),
        row=rows[0],
        replicas=[r.as_dict() for r in rows[0].status.replicas],
        errors=errors.items,
        slowest=slowest,
        letters=letters,
        dlq_error=dlq_error,
        replayed=_replay_note(request.query_params.get("replayed")),
        refresh=REFRESH_SECONDS,
    )


def _replay_note(text: str | None) -> str | None:
    """The replay report carried by the redirect, only in the form `replay` writes it."""
    return text if text and _REPLAY_NOTE.fullmatch(text) else None


async def _admin_form(request: Request) -> tuple[Principal, dict[str, str]] | Response:
    """The admin behind a form post and its fields, CSRF-checked; else the page that says no."""
    who = _who(request, "admin")
    if isinstance(who, Response):
        return who
    try:
        form = await session.read_form(request)
        session.check_csrf(request, form)
    except (ValueError, session.CsrfError) as exc:
        return _render(request, "error.html", who, 403, title="forbidden", detail=str(exc))
    return who, form


@router.post("/satellites/{satellite_id}/replay")
async def replay(satellite_id: SatelliteId, request: Request) -> Response:
    """Replay one dead letter (`id`) or all (`all=1`); back to the satellite page."""
    checked = await _admin_form(request)
    if isinstance(checked, Response):
        return checked
    who, form = checked
    ids = None if form.get("all") == "1" else [form.get("id", "")]
    if ids is not None and not ids[0]:
        return _render(
            request, "error.html", who, 422, title="invalid_request", detail="no job id given"
        )
    dead: DeadLetters = request.app.state.dead_letters
    try:
        report = await dead.replay(satellite_id, ids)
    except DeadLetterError as exc:
        return _render(request, "error.html", who, exc.status, title=exc.code, detail=exc.detail)
    log.info(
        "dlq_replayed_from_page",
        satellite_id=satellite_id,
        by=who.name,
        replayed=len(report["replayed"]),
        not_found=len(report["not_found"]),
    )
    done = f"{len(report['replayed'])} replayed"
    if report["not_found"] or report["failed"]:
        done += f", {len(report['not_found']) + len(report['failed'])} not replayed"
    return RedirectResponse(
        f"/satellites/{quote(satellite_id)}?{urlencode({'replayed': done})}", status_code=303
    )


def _scheduler(request: Request) -> Scheduler | None:
    scheduler: Scheduler | None = getattr(request.app.state, "scheduler", None)
    return scheduler


async def _schedule_rows(request: Request, satellite_id: str | None = None) -> list[Any]:
    """Every schedule (of one satellite) with its stats, by satellite then name."""
    scheduler = _scheduler(request)
    if scheduler is None:
        return []
    out: list[dict[str, Any]] = []
    for name, schedule in sorted(scheduler.file.schedules.items()):
        if satellite_id is not None and schedule.satellite != satellite_id:
            continue
        try:
            stats = await scheduler.stats(name)
        except UnknownScheduleError:  # the file changed meanwhile
            continue
        skipped = sum(stats.skipped.values())
        out.append(
            {
                "stats": stats,
                "satellite": schedule.satellite,
                "clock": f"every {stats.every} s" if stats.every else f"cron {stats.cron}",
                "skipped": skipped,
                "troubled": stats.failed > 0 or skipped > 0,
            }
        )
    out.sort(key=lambda r: (str(r["satellite"]), r["stats"].name))
    return out


def _schedule_note(text: str | None) -> str | None:
    """The report of run now / pause / resume carried by the redirect, only in its own form."""
    return text if text and _SCHEDULE_NOTE.fullmatch(text) else None


@router.get("/schedules", response_class=HTMLResponse)
async def schedules_page(request: Request) -> Response:
    who = _who(request, "read")
    if isinstance(who, Response):
        return who
    return _render(
        request,
        "schedules.html",
        who,
        schedules=await _schedule_rows(request),
        has_scheduler=_scheduler(request) is not None,
        done=_schedule_note(request.query_params.get("done")),
        refresh=REFRESH_SECONDS,
    )


@router.post("/schedules/{name}/{action}")
async def schedule_action(name: ScheduleName, action: str, request: Request) -> Response:
    """Run now, pause or resume a schedule; back to the page the form was on."""
    checked = await _admin_form(request)
    if isinstance(checked, Response):
        return checked
    who, form = checked
    scheduler = _scheduler(request)
    if action not in ("run", "pause", "resume"):
        return _render(request, "error.html", who, 404, title="not_found", detail="no such action")
    if scheduler is None:
        detail = "this service runs no schedules (set USM_CORE_SCHEDULES_FILE)"
        return _render(request, "error.html", who, 404, title="no_schedules", detail=detail)
    try:
        satellite = scheduler.get(name).satellite
        if action == "run":
            # A run is its own claimed slot (`run<epoch ms>`): published once, as the API's.
            published = await scheduler.run_now(name)
            done = f"{name}: run now, {len(published)} job(s) published"
        else:
            await scheduler.set_paused(name, action == "pause")
            done = f"{name}: {'paused' if action == 'pause' else 'resumed'}"
    except UnknownScheduleError:
        return _render(
            request,
            "error.html",
            who,
            404,
            title="unknown_schedule",
            detail=f"no schedule {name!r} in the file",
        )
    log.info("schedule_action_from_page", schedule=name, action=action, by=who.name)
    back = f"/satellites/{quote(satellite)}" if form.get("back") == "satellite" else "/schedules"
    return RedirectResponse(f"{back}?{urlencode({'done': done})}", status_code=303)


@router.get("/alerts", response_class=HTMLResponse)
async def alerts_page(request: Request) -> Response:
    who = _who(request, "read")
    if isinstance(who, Response):
        return who
    store = request.app.state.store
    config: AlertsConfig = request.app.state.alerts_config
    overview = await alerts_overview(store, config)
    groups = []
    for sat in overview["satellites"]:
        shown = [a for a in sat["alerts"] if a["state"] != "ok" or a["seq"] > 0]
        if shown:
            groups.append({**sat, "alerts": shown, "quiet": len(sat["alerts"]) - len(shown)})
    archive = await archive_page(store.engine, limit=ARCHIVE_ROWS)
    return _render(
        request,
        "alerts.html",
        who,
        overview=overview,
        groups=groups,
        archive=archive,
        failing={c["name"] for c in overview["channels"] if c["failing"]},
        archive_rows=ARCHIVE_ROWS,
        refresh=REFRESH_SECONDS,
    )


@router.get("/jobs", response_class=HTMLResponse)
async def jobs_page(request: Request, q: str = "") -> Response:
    who = _who(request, "read")
    if isinstance(who, Response):
        return who
    q = q.strip()[:255]
    found = []
    if q:
        store = _store(request)
        record = await store.get_job(q)
        if record is not None:
            return RedirectResponse(f"/jobs/{quote(record.id, safe='')}", status_code=303)
        found = (await store.search(JobFilter(host=q), limit=50)).items
    return _render(request, "jobs.html", who, q=q, found=found)


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
async def job_page(job_id: JobId, request: Request) -> Response:
    who = _who(request, "read")
    if isinstance(who, Response):
        return who
    record = await _store(request).get_job(job_id)
    if record is None:
        return _render(
            request, "error.html", who, 404, title="unknown_job", detail=f"no job {job_id!r}"
        )
    text = json.dumps(record.model_dump(mode="json"), indent=2, sort_keys=False)
    return _render(request, "job.html", who, job=record, text=text)


@router.get("/login", response_class=HTMLResponse)
async def login_form(request: Request, next: str = "/") -> Response:
    return _render(request, "login.html", None, next=session.safe_next(next), failed=None)


@router.post("/login")
async def login(request: Request) -> Response:
    try:
        form = await session.read_form(request)
        session.check_csrf(request, form)
    except (ValueError, session.CsrfError) as exc:
        return _render(request, "login.html", None, 403, next="/", failed=str(exc))
    target = session.safe_next(form.get("next"))
    token = form.get("token", "").strip()
    tokens = request.app.state.tokens
    try:
        found = tokens.verify(token) if tokens is not None and token else None
    except TokensError:
        found = None
    if found is None or not found.allows("read"):
        log.warning("page_login_refused", reason="unknown" if found is None else "scope")
        return _render(
            request,
            "login.html",
            None,
            401,
            next=target,
            failed="that token is not valid for reading (check it, or ask for a new one)",
        )
    log.info("page_login", token_name=found.name)
    response = RedirectResponse(target, status_code=303)
    session.set_session(response, request, token)
    return response


@router.post("/logout")
async def logout(request: Request) -> Response:
    try:
        form = await session.read_form(request)
        session.check_csrf(request, form)
    except (ValueError, session.CsrfError) as exc:
        return _render(request, "error.html", None, 403, title="forbidden", detail=str(exc))
    response = RedirectResponse("/login", status_code=303)
    session.set_session(response, request, None)
    return response
