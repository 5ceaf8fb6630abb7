"""GET /dashboard: a live page of the service's main charts, drawn from its own metrics, for
a user who has no monitoring stack.

The page and its files (static/: our HTML, script and style, and uPlot, vendored from npm by
scripts/vendor_uplot.py) hold no data, so they are served without the bearer token; the data
endpoint, /dashboard/data, follows /metrics' rule: with a token configured it needs it (the
page asks for it once and sends it as `Authorization: Bearer`). Nothing is loaded from
outside the service.
"""

from __future__ import annotations

import time
from functools import cache
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from teacher_service.frontends.http.dashboard_data import summarize

STATIC = Path(__file__).parent / "static"
ASSETS = {  # name in the URL -> (file under static/, media type)
    "dashboard.js": ("dashboard.js", "text/javascript"),
    "dashboard.css": ("dashboard.css", "text/css"),
    "uPlot.iife.min.js": ("uplot/uPlot.iife.min.js", "text/javascript"),
    "uPlot.min.css": ("uplot/uPlot.min.css", "text/css"),
}
PAGE_PATHS = frozenset({"/dashboard", *(f"/dashboard/static/{name}" for name in ASSETS)})

router = APIRouter(prefix="/dashboard", tags=["service"])


@cache
def _read(relative: str) -> bytes:
    return (STATIC / relative).read_bytes()


@router.get("")
async def page() -> Response:
    """The page itself (HTML; open, like its static files)."""
    return Response(_read("dashboard.html"), media_type="text/html; charset=utf-8")


@router.get("/static/{name}")
async def asset(name: str) -> Response:
    """The page's script and style, and the vendored uPlot (only the files ASSETS names)."""
    if name not in ASSETS:
        return JSONResponse(status_code=404, content={"error": f"no file {name!r}"})
    relative, media_type = ASSETS[name]
    return Response(
        _read(relative), media_type=media_type, headers={"Cache-Control": "max-age=3600"}
    )


@router.get("/data")
async def data(request: Request) -> JSONResponse:
    """One snapshot of the metrics registry /metrics renders (see dashboard_data.py)."""
    registry = request.app.state.engine.metrics.registry
    return JSONResponse(summarize(registry, time.time()), headers={"Cache-Control": "no-store"})
