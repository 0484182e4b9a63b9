"""`ptutils ui`: the dashboard's ASGI app (starlette) and its server (uvicorn).

Pages are static HTML + vendored JavaScript (static/, no CDN, no build step) that read
the JSON API below; every store access goes through ptutils.ui.data.

Actions (cancel, pause, resume, requeue: whichever the caller lends through `Hooks`;
409 with the reason when the session's state refuses one, 503 when the broker is down)
need no token when the server listens on localhost only. Bound beyond it, a random
token is printed at start-up (as Jupyter does) and each action must carry it, in the
`X-Ptutils-Token` header or the `ptutils_token` cookie (opening a page with `?token=...`
sets the cookie); otherwise 403. Every action must also carry the `X-Ptutils-Action`
header, which a cross-site form cannot send.
"""

from __future__ import annotations

import hmac
import secrets
import sys
from pathlib import Path
from typing import Any

from ptutils.errors import BrokerUnavailable, PtutilsError, SessionNotFound
from ptutils.store.base import Store
from ptutils.ui import data
from ptutils.ui.data import BadRequest, Hooks

try:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import FileResponse, JSONResponse, RedirectResponse, Response
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles
except ImportError as exc:  # pragma: no cover - the extra is missing
    raise ImportError("`ptutils ui` needs starlette and uvicorn: "
                      "run `pip install 'ptutils[ui]'`") from exc

STATIC = Path(__file__).parent / "static"
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
"""Addresses that only this machine reaches: actions need no token there."""

TOKEN_HEADER = "X-Ptutils-Token"
TOKEN_COOKIE = "ptutils_token"
ACTION_HEADER = "X-Ptutils-Action"
DEFAULT_BUCKETS = 1000


def needs_token(host: str) -> bool:
    """Whether actions need the token: the server is reachable beyond this machine."""
    return host not in LOCAL_HOSTS


def create_app(store: Store, *, store_arg: str, token: str | None,
               hooks: Hooks | None = None) -> Starlette:
    """The dashboard over `store`; `token` None: actions need none (localhost)."""
    hooks = hooks or Hooks()

    def page(name: str) -> Any:
        def endpoint(request: Request) -> Response:
            given = request.query_params.get("token")
            if given is not None:  # a link printed at start-up: keep it as a cookie
                response: Response = RedirectResponse(request.url.remove_query_params("token"))
                response.set_cookie(TOKEN_COOKIE, given, httponly=True, samesite="strict")
                return response
            return FileResponse(STATIC / name, headers={"Cache-Control": "no-store"})
        return endpoint

    def sessions(request: Request) -> Response:
        filters, sort, desc, page_no, per_page = data.parse_query(dict(request.query_params))
        return JSONResponse(data.list_sessions(store, filters, sort, desc, page_no, per_page,
                                               hooks))

    def session(request: Request) -> Response:
        return JSONResponse(data.session_detail(store, request.path_params["ref"], hooks,
                                                store_arg))

    def curve(request: Request) -> Response:
        try:
            buckets = int(request.query_params.get("buckets") or DEFAULT_BUCKETS)
        except ValueError as exc:
            raise BadRequest("buckets is a whole number of pixel columns") from exc
        return JSONResponse(data.curve(store, request.path_params["ref"],
                                       request.query_params.get("series", "train/loss"),
                                       buckets))

    def sweep(request: Request) -> Response:
        name = request.query_params.get("sweep")
        if not name:
            raise BadRequest("sweep=NAME is needed: the sweep or search to show")
        return JSONResponse(data.sweep_points(store, name, request.query_params.get("metric")))

    def workers(request: Request) -> Response:
        return JSONResponse({"workers": data.workers(store)})

    def info(request: Request) -> Response:
        return JSONResponse({"store": store_arg, "actions": sorted(hooks.actions),
                             "token_required": token is not None})

    def action(request: Request) -> Response:
        if ACTION_HEADER not in request.headers:
            return _refuse(f"an action needs the {ACTION_HEADER} header")
        if token is not None:
            given = request.headers.get(TOKEN_HEADER) or request.cookies.get(TOKEN_COOKIE)
            if not given or not hmac.compare_digest(given.encode(), token.encode()):
                return _refuse("this server listens beyond localhost: an action needs the "
                               "token printed at its start-up (open the printed link, or "
                               f"send it in the {TOKEN_HEADER} header)")
        try:
            row = data.act(store, request.path_params["ref"], request.path_params["action"],
                           hooks)
        except (BadRequest, SessionNotFound):
            raise
        except BrokerUnavailable as exc:  # resume, requeue: nothing was changed
            return JSONResponse({"error": str(exc)}, status_code=503)
        except PtutilsError as exc:  # refused (a finished session, ...): the message says why
            return JSONResponse({"error": str(exc)}, status_code=409)
        return JSONResponse({"row": row})

    routes = [
        Route("/", page("sessions.html")),
        Route("/session/{ref}", page("session.html")),
        Route("/workers", page("workers.html")),
        Route("/compare", page("compare.html")),
        Route("/sweep", page("sweep.html")),
        Route("/api/sweep", sweep),
        Route("/api/info", info),
        Route("/api/sessions", sessions),
        Route("/api/sessions/{ref}", session),
        Route("/api/sessions/{ref}/curve", curve),
        Route("/api/sessions/{ref}/{action}", action, methods=["POST"]),
        Route("/api/workers", workers),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    handlers = {BadRequest: _bad_request, SessionNotFound: _not_found}
    return Starlette(routes=routes, exception_handlers=handlers)  # type: ignore[arg-type]


def _refuse(message: str) -> Response:
    return JSONResponse({"error": message}, status_code=403)


def _bad_request(request: Request, exc: Exception) -> Response:
    return JSONResponse({"error": str(exc)}, status_code=400)


def _not_found(request: Request, exc: Exception) -> Response:
    return JSONResponse({"error": str(exc)}, status_code=404)


def serve(store: Store, *, store_arg: str, host: str, port: int,
          hooks: Hooks | None = None) -> None:
    """Serve the dashboard until Ctrl-C; prints its address (with the token if one is
    needed) first."""
    import uvicorn

    token = secrets.token_urlsafe(24) if needs_token(host) else None
    app = create_app(store, store_arg=store_arg, token=token, hooks=hooks)
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{port}/"
    print(f"ptutils ui: {store_arg} at {url}", flush=True)
    if token is not None:
        print(f"actions need the token: open {url}?token={token}", flush=True)
    sys.stdout.flush()
    uvicorn.run(app, host=host, port=port, log_level="warning")
