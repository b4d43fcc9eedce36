"""The operator page: `GET /` serves `static/index.html`, `/static/*` its script and style sheet.

Plain files, no build step and nothing from a CDN: the page works on an air-gapped line PC. It calls the
same HTTP API as every other client (relative URLs, so it also works behind a path prefix).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).parent / "static"
INDEX_FILE = STATIC_DIR / "index.html"
STATIC_ROUTE_NAME = "operator-page-static"
# The page and its assets change with the package version, never while a server runs; revalidate anyway so an
# upgrade is picked up on the next load.
NO_STALE_PAGE = {"Cache-Control": "no-cache"}


async def operator_page() -> FileResponse:
    return FileResponse(INDEX_FILE, media_type="text/html; charset=utf-8", headers=NO_STALE_PAGE)


def mount_operator_page(app: FastAPI) -> None:
    """Serve the operator page at `/` and its assets under `/static/` (a second call changes nothing).

    The two routes go first in the route list, so a catch-all mount added before (a `Mount("/")`) cannot
    shadow them; they share no path with the API.
    """
    if any(getattr(route, "name", None) == STATIC_ROUTE_NAME for route in app.router.routes):
        return
    if not INDEX_FILE.is_file():
        raise FileNotFoundError(f"operator page missing: {INDEX_FILE} (a broken install?)")
    existing = list(app.router.routes)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name=STATIC_ROUTE_NAME)
    app.add_api_route("/", operator_page, methods=["GET"], include_in_schema=False, name="operator-page")
    added = [route for route in app.router.routes if route not in existing]
    app.router.routes[:] = added + existing
