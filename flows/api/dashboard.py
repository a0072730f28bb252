"""The dashboard page (`/`): a shell that holds no data itself; its script (static/dashboard.js)
reads the API with the visitor's token (asked for when reads need one) and draws with
plotly.js, served from the plotly package installed here (no CDN, no inline script)."""

from __future__ import annotations

from pathlib import Path

import plotly
from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, HTMLResponse
from jinja2 import Environment, FileSystemLoader, select_autoescape

from flows.api.auth import anonymous_read

router = APIRouter(include_in_schema=False)
TEMPLATES = Environment(
    loader=FileSystemLoader(Path(__file__).parent / "templates"), autoescape=select_autoescape(["html"])
)
PLOTLY_JS = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
DASHBOARD_JS = Path(__file__).parent / "static" / "dashboard.js"


@router.get("/", response_class=HTMLResponse)
def page(request: Request) -> HTMLResponse:
    html = TEMPLATES.get_template("dashboard.html").render(
        anonymous_read=anonymous_read(request),
        plotly_version=plotly.__version__,
    )
    return HTMLResponse(html)


@router.get("/static/plotly.min.js")
def plotly_js() -> FileResponse:
    return FileResponse(PLOTLY_JS, media_type="text/javascript", headers={"Cache-Control": "max-age=86400"})


@router.get("/static/dashboard.js")
def dashboard_js() -> FileResponse:
    return FileResponse(DASHBOARD_JS, media_type="text/javascript")
