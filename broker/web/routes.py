"""What a browser opens: `/` (home), `/docs` (Swagger UI from the broker's own copy, so it works
offline), `/api` (to the docs) and the OHIF Viewer under `/viewer/` with the broker's own
`app-config.js`."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response

from broker.deps import StateDep
from broker.settings import Settings
from broker.web import assets, service

router = APIRouter(include_in_schema=False)

_SWAGGER_ASSETS = "/docs/assets/"
# Hashed bundles never change under their name; everything else is revalidated.
_IMMUTABLE = "public, max-age=31536000, immutable"
# Cross-origin isolation: the viewer's 3D and MPR need SharedArrayBuffer. Everything it loads is
# the broker's own, so nothing is blocked by it.
_ISOLATED = {"Cross-Origin-Opener-Policy": "same-origin", "Cross-Origin-Embedder-Policy": "require-corp"}


def _installed(settings: Settings, package: str) -> Path | None:
    return assets.installed(root=settings.resolved_viewer_dir(), pin=assets.pins()[package])


def _not_installed(settings: Settings, what: str) -> HTMLResponse:
    page = service.not_installed_page(what=what, directory=str(settings.resolved_viewer_dir()))
    return HTMLResponse(page, status_code=503)


def _file(root: Path, relative: str) -> Path | None:
    """The file `relative` names inside `root`, never outside it."""
    path = (root / relative).resolve()
    return path if path.is_relative_to(root.resolve()) and path.is_file() else None


@router.get("/", response_class=HTMLResponse)
def home(state: StateDep) -> HTMLResponse:
    installed = _installed(state.settings, assets.OHIF) is not None
    return HTMLResponse(service.home_page(viewer_installed=installed))


@router.get("/api")
def api() -> RedirectResponse:
    return RedirectResponse("/docs")


@router.get("/docs", response_class=HTMLResponse)
def docs(request: Request, state: StateDep) -> HTMLResponse:
    if _installed(state.settings, assets.SWAGGER) is None:
        return _not_installed(state.settings, "Swagger UI")
    return get_swagger_ui_html(
        openapi_url=request.app.openapi_url,
        title=f"{request.app.title} API",
        swagger_js_url=f"{_SWAGGER_ASSETS}swagger-ui-bundle.js",
        swagger_css_url=f"{_SWAGGER_ASSETS}swagger-ui.css",
        swagger_favicon_url=f"{_SWAGGER_ASSETS}favicon-32x32.png",
        # The default validator badge asks validator.swagger.io about the document.
        swagger_ui_parameters={"validatorUrl": None},
    )


@router.get(_SWAGGER_ASSETS + "{name}")
def swagger_asset(name: str, state: StateDep) -> Response:
    root = _installed(state.settings, assets.SWAGGER)
    path = _file(root, name) if root else None
    if path is None:
        return Response(status_code=404)
    return FileResponse(path)


@router.get("/viewer")
def viewer_root() -> RedirectResponse:
    return RedirectResponse(assets.VIEWER_PATH)


@router.get(assets.VIEWER_PATH + "app-config.js")
def viewer_config(state: StateDep) -> Response:
    body = service.app_config_js(base_url=state.settings.base_url)
    return Response(body, media_type="text/javascript", headers={"Cache-Control": "no-cache", **_ISOLATED})


@router.get(assets.VIEWER_PATH + "{path:path}")
async def viewer(path: str, request: Request, state: StateDep) -> Response:
    root = _installed(state.settings, assets.OHIF)
    if root is None:
        return _not_installed(state.settings, "The OHIF viewer")
    found = _file(root, path) if path else None
    if found is not None:
        cache = _IMMUTABLE if ".bundle." in found.name or found.suffix == ".wasm" else "no-cache"
        return FileResponse(found, headers={"Cache-Control": cache, **_ISOLATED})
    # Anything else is a route of the single-page app (the study list, `viewer?StudyInstanceUIDs=`).
    uids = [
        uid.strip()
        for value in request.query_params.getlist("StudyInstanceUIDs")
        for uid in value.split(",")
        if uid.strip()
    ]
    if uids:
        waiting = await run_in_threadpool(
            service.prepare_studies, engine=state.engine, store=state.store, study_uids=uids[:20]
        )
        if waiting is not None:
            page = service.waiting_page(waiting=waiting, retry_url=str(request.url))
            return HTMLResponse(page, status_code=503 if waiting.error else 202)
    return FileResponse(root / "index.html", headers={"Cache-Control": "no-cache", **_ISOLATED})
