"""The admin app: pages for the admin, endpoints for machines (Starlette, Jinja2 templates).

Every asset is in the package (``static/``): hospital networks are often
offline. No page runs inline script (the CSP forbids it); one small script
(``static/live.js``) refreshes the parts of a page that change, and every
action is a plain form POST behind a confirmation page.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import secrets
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from ..errors import AdminActionRefused
from . import actions
from .auth import TokenCheck, csrf_token, valid_csrf
from .facts import BoxFacts
from .metrics import render_metrics

__all__ = ["SECURITY_HEADERS", "create_app"]

log = logging.getLogger(__name__)

HERE = Path(__file__).parent

#: Sent with every response: no framing, no inline script or style, nothing from elsewhere.
SECURITY_HEADERS = {
    "content-security-policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cross-origin-opener-policy": "same-origin",
    "cache-control": "no-store",
}

#: A wrong token's answer waits this long, one at a time over all connections: one guess a second.
WRONG_TOKEN_DELAY_S = 1.0
#: The names a browser on this box uses for a page bound to loopback. Any other Host header is refused
#: there: a web page whose domain was made to resolve to 127.0.0.1 (DNS rebinding) must not reach it.
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]", "::1")


class Throttle:
    """Serialises the waits after wrong tokens, so parallel guesses wait in line."""

    def __init__(self) -> None:
        self._lock = asyncio.Lock()

    async def wrong_token(self) -> None:
        async with self._lock:
            await asyncio.sleep(WRONG_TOKEN_DELAY_S)


#: Reachable without the token (a liveness probe must not need a secret), and the sign-in itself.
_OPEN_PATHS = ("/health/live", "/login", "/static/")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class SecurityHeaders:
    """Adds :data:`SECURITY_HEADERS` to every HTTP response (pure ASGI: no buffering).

    Outermost of the app's own layers, it also answers a fault of the page itself (an exception
    no route handled): a fixed 500 with the same headers, the exception logged by its type only
    (its text may quote a file's name), instead of Starlette's bare error page.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def with_headers(message: MutableMapping[str, Any]) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                for name, value in SECURITY_HEADERS.items():
                    if name.encode() not in present:
                        headers.append((name.encode(), value.encode()))
                message["headers"] = headers
            await send(message)

        try:
            await self.app(scope, receive, with_headers)
        except Exception as exc:
            log.error("admin page: %s failed (%s)", scope.get("path"), type(exc).__name__)
            if started:
                raise
            fault = JSONResponse(
                {"error": "internal error", "detail": "the admin page failed; see the service log"},
                status_code=500,
            )
            await fault(scope, receive, with_headers)


def _ago(value: str | None) -> str:
    """``2026-12-07T10:00:00.123Z`` -> ``10:00:00`` today, else the date too."""
    if not value:
        return ""
    try:
        when = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return value
    today = dt.datetime.now(dt.UTC).date()
    return when.strftime("%H:%M:%S" if when.date() == today else "%Y-%m-%d %H:%M")


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "not started"
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days} d {hours} h"
    if hours:
        return f"{hours} h {minutes} min"
    return f"{minutes} min {secs} s"


def _templates() -> Jinja2Templates:
    env = Environment(
        loader=FileSystemLoader(HERE / "templates"),
        autoescape=select_autoescape(["html"], default=True),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["ago"] = _ago
    env.filters["duration"] = _duration
    env.filters["pretty"] = lambda value: json.dumps(value, indent=2, sort_keys=True)
    return Jinja2Templates(env=env)


def create_app(
    facts: BoxFacts,
    *,
    token: TokenCheck,
    read_only: Callable[[], bool],
    echoes: actions.Echoes | None = None,
    session_secret: str | None = None,
) -> Starlette:
    """The admin app over ``facts`` (``token``: who may see it; ``read_only``: Admin.ReadOnly, live)."""
    templates = _templates()
    echoes = echoes or actions.Echoes()
    throttle = Throttle()

    def page(request: Request, name: str, status_code: int = 200, **context: Any) -> Response:
        context.update(
            csrf=csrf_token(request.session),
            read_only=read_only(),
            show_images=facts.config().admin.show_images,
            signed_in=bool(request.session.get("auth")),
            token_required=token.required,
            path=request.url.path,
        )
        return templates.TemplateResponse(request, name, context, status_code=status_code)

    def refuse(request: Request, status_code: int, title: str, text: str) -> Response:
        if "text/html" in request.headers.get("accept", ""):
            return page(request, "message.html", status_code, title=title, text=text)
        return JSONResponse({"error": title, "detail": text}, status_code=status_code)

    async def checked_form(request: Request) -> dict[str, Any] | Response:
        """The posted form when its CSRF token and origin are this page's; a 403 otherwise."""
        origin = request.headers.get("origin")
        if origin and origin != "null":
            parts = urlsplit(origin)
            if parts.netloc != request.headers.get("host", ""):
                return refuse(request, 403, "Refused", "The form was posted from another site.")
        form = await request.form()
        if not valid_csrf(request.session, form.get("csrf")):
            return refuse(
                request, 403, "Refused", "The form's security token is missing or expired: reload the page."
            )
        return dict(form)

    # -- machines ----------------------------------------------------------------------
    async def live(request: Request) -> Response:
        return JSONResponse({"status": "live"})

    async def ready(request: Request) -> Response:
        is_ready, checks = await run_in_threadpool(facts.readiness)
        return JSONResponse({"ready": is_ready, "checks": checks}, status_code=200 if is_ready else 503)

    async def api_status(request: Request) -> Response:
        return JSONResponse(await run_in_threadpool(facts.status))

    async def metrics(request: Request) -> Response:
        body = await run_in_threadpool(render_metrics, facts)
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    # -- pages -------------------------------------------------------------------------
    async def overview(request: Request) -> Response:
        status = await run_in_threadpool(facts.status)
        return page(request, "overview.html", status=status)

    async def scans(request: Request) -> Response:
        views = await run_in_threadpool(facts.recent_scans)
        return page(request, "scans.html", scans=views)

    async def scan(request: Request) -> Response:
        view = await run_in_threadpool(facts.scan, request.path_params["ref"])
        if view is None:
            return refuse(request, 404, "Not found", "No scan has this reference on this box.")
        has_heatmap = facts.heatmap_file(view) is not None
        return page(request, "scan.html", scan=view, has_heatmap=has_heatmap)

    async def heatmap(request: Request) -> Response:
        view = await run_in_threadpool(facts.scan, request.path_params["ref"])
        path = None if view is None else facts.heatmap_file(view)
        if path is None:
            return Response(status_code=404)
        return FileResponse(path, media_type="image/png")

    async def quarantine(request: Request) -> Response:
        files = await run_in_threadpool(facts.quarantined)
        done = await run_in_threadpool(facts.journal.admin_actions, 20)
        return page(request, "quarantine.html", files=files, actions=done)

    async def confirm(request: Request) -> Response:
        what = request.path_params["action"]
        item = await run_in_threadpool(facts.quarantined_file, request.path_params["ref"])
        if what not in ("retry", "discard"):
            return refuse(request, 404, "Not found", "There is no such action.")
        if item is None:
            return refuse(request, 404, "Not found", "No quarantined file has this reference (any more).")
        return page(request, "confirm.html", item=item, action=what)

    async def act(request: Request) -> Response:
        form = await checked_form(request)
        if isinstance(form, Response):
            return form
        if read_only():
            return refuse(request, 403, "Read-only", "Admin.ReadOnly is true: this page changes nothing.")
        what, ref = request.path_params["action"], request.path_params["ref"]
        if what not in ("retry", "discard"):
            return refuse(request, 404, "Not found", "There is no such action.")
        item = await run_in_threadpool(facts.quarantined_file, ref)
        if item is None:
            return refuse(request, 404, "Not found", "No quarantined file has this reference (any more).")
        config = facts.config()
        try:
            if what == "retry":
                await run_in_threadpool(actions.retry, facts.journal, item, config.inbox.path)
            else:
                await run_in_threadpool(actions.discard, facts.journal, item, config.inbox.quarantine_path)
        except (AdminActionRefused, OSError) as exc:
            text = (
                exc.message if isinstance(exc, AdminActionRefused) else f"the file could not be moved: {exc}"
            )
            return refuse(request, 409, "Not done", text)
        return RedirectResponse(f"/quarantine?done={what}", status_code=303)

    async def destinations(request: Request) -> Response:
        nodes = actions.Echoes.destinations(facts.config().dicom)
        rows = [(name, node, echoes.last(name)) for name, node in nodes.items()]
        return page(request, "destinations.html", destinations=rows)

    async def echo(request: Request) -> Response:
        form = await checked_form(request)
        if isinstance(form, Response):
            return form
        config = facts.config()
        name = request.path_params["name"]
        node = actions.Echoes.destinations(config.dicom).get(name)
        if node is None:
            return refuse(request, 404, "Not found", "No DICOM destination has this name.")
        await run_in_threadpool(echoes.echo, name, node, config.dicom.ae_title)
        return RedirectResponse("/destinations", status_code=303)

    async def logs(request: Request) -> Response:
        return page(request, "logs.html", lines=list(reversed(facts.logs.lines())))

    # -- signing in --------------------------------------------------------------------
    async def login_page(request: Request) -> Response:
        return page(request, "login.html", next=_local_path(request.query_params.get("next")), failed=False)

    async def login(request: Request) -> Response:
        form = await checked_form(request)
        if isinstance(form, Response):
            return form
        target = _local_path(str(form.get("next") or "/"))
        if not token.matches(str(form.get("token") or "")):
            log.warning("admin page: a sign-in with a wrong token was refused")
            await throttle.wrong_token()
            return page(request, "login.html", 401, next=target, failed=True)
        request.session.clear()
        request.session["auth"] = True
        csrf_token(request.session)
        return RedirectResponse(target, status_code=303)

    async def logout(request: Request) -> Response:
        form = await checked_form(request)
        if isinstance(form, Response):
            return form
        request.session.clear()
        return RedirectResponse("/login", status_code=303)

    routes = [
        Route("/health/live", live),
        Route("/health/ready", ready),
        Route("/api/status", api_status),
        Route("/metrics", metrics),
        Route("/", overview),
        Route("/scans", scans),
        Route("/scans/{ref}", scan),
        Route("/scans/{ref}/heatmap.png", heatmap),
        Route("/quarantine", quarantine),
        Route("/quarantine/{ref}/{action}", confirm, methods=["GET"]),
        Route("/quarantine/{ref}/{action}", act, methods=["POST"]),
        Route("/destinations", destinations),
        Route("/destinations/{name}/echo", echo, methods=["POST"]),
        Route("/logs", logs),
        Route("/login", login_page, methods=["GET"]),
        Route("/login", login, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    # Without a token (bound to loopback), the Host header is the only thing a rebound domain cannot
    # fake; with one, a rebound page has no session cookie and no token.
    hosts = [] if token.required else [Middleware(TrustedHostMiddleware, allowed_hosts=list(LOOPBACK_HOSTS))]
    app = Starlette(
        routes=routes,
        middleware=[
            Middleware(SecurityHeaders),
            *hosts,
            Middleware(
                SessionMiddleware,
                secret_key=session_secret or secrets.token_urlsafe(32),
                session_cookie="edge_admin",
                max_age=8 * 3600,
                same_site="strict",
                https_only=False,
            ),
            Middleware(TokenGate, token=token, throttle=throttle),
        ],
    )
    return app


def _local_path(value: str | None) -> str:
    """A redirect target on this page only (never another host: no open redirect)."""
    if not value or not value.startswith("/") or value.startswith("//") or "\\" in value:
        return "/"
    return value


class TokenGate:
    """Every path but :data:`_OPEN_PATHS` needs the token (a signed-in session or a bearer token)."""

    def __init__(self, app: ASGIApp, token: TokenCheck, throttle: Throttle) -> None:
        self.app = app
        self.token = token
        self.throttle = throttle

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.token.required:
            await self.app(scope, receive, send)
            return
        path = str(scope.get("path", ""))
        if path in _OPEN_PATHS or any(path.startswith(p) for p in _OPEN_PATHS if p.endswith("/")):
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        bearer = request.headers.get("authorization", "")
        given = bearer[7:].strip() if bearer.lower().startswith("bearer ") else None
        if request.session.get("auth") or (given is not None and self.token.matches(given)):
            await self.app(scope, receive, send)
            return
        if given is not None:
            await self.throttle.wrong_token()
        response: Response
        if request.method == "GET" and "text/html" in request.headers.get("accept", ""):
            response = RedirectResponse(f"/login?next={quote(path)}", status_code=303)
        else:
            response = JSONResponse(
                {"error": "unauthorized", "detail": "send 'Authorization: Bearer <token>' (Admin.TokenFile)"},
                status_code=401,
                headers={"www-authenticate": 'Bearer realm="edge-runtime admin"'},
            )
        await response(scope, receive, send)
