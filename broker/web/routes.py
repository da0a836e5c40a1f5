"""What a browser opens: `/` (the clinician's lookup page), `/record` (the patient's imaging record,
for printing), `/admin/...` (facilities, jobs, identity review), `/docs` (Swagger UI from the
broker's own copy, so it works offline), `/api` (to the docs) and the OHIF Viewer under `/viewer/`
with the broker's own `app-config.js`.

Three routers, so that sign-in and roles can be required per router when they exist: `pages`
(the clinician's), `admin` (facilities, jobs, review) and `router` (docs, viewer, static assets)."""

from __future__ import annotations

from html import escape
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from broker.deps import FormDep, PrincipalDep, SessionDep, StateDep
from broker.errors import ScanOnceError
from broker.imports import service as imports
from broker.imports.schemas import ImportOut
from broker.settings import Settings
from broker.web import assets, pages, present, service

router = APIRouter(include_in_schema=False)
pages_router = APIRouter(include_in_schema=False)
admin_router = APIRouter(prefix="/admin", include_in_schema=False)

_STATIC = Path(__file__).with_name("static")
# Autoescaped: every value a page shows (names, descriptions, messages) is escaped.
templates = Jinja2Templates(directory=Path(__file__).with_name("templates"))
templates.env.globals.update(present=present, settings=pages.SETTINGS)
_HTML = {"Cache-Control": "no-store"}  # patient data: never kept by a shared cache

_SWAGGER_ASSETS = "/docs/assets/"
# OHIF's own hanging protocol for two studies side by side (study 0 current, study 1 prior).
COMPARE_PROTOCOL = "@ohif/hpCompare"
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
async def viewer(path: str, request: Request, state: StateDep, principal: PrincipalDep) -> Response:
    uids = [
        uid.strip()
        for value in request.query_params.getlist("StudyInstanceUIDs")
        for uid in value.split(",")
        if uid.strip()
    ]
    # A broken link is the link's fault whether or not the viewer is installed: said first.
    if any("\x00" in uid for uid in uids):
        message = "The link's study UID contains a NUL character: no study has one."
        context = {"title": "Not a study", "message": message, "back": "/", "htmx": False}
        return templates.TemplateResponse(request, "message.html", context, status_code=400, headers=_HTML)
    root = _installed(state.settings, assets.OHIF)
    if root is None:
        return _not_installed(state.settings, "The OHIF viewer")
    found = _file(root, path) if path else None
    if found is not None:
        cache = _IMMUTABLE if ".bundle." in found.name or found.suffix == ".wasm" else "no-cache"
        return FileResponse(found, headers={"Cache-Control": cache, **_ISOLATED})
    # Anything else is a route of the single-page app (the study list, `viewer?StudyInstanceUIDs=`).
    if uids:
        waiting = await run_in_threadpool(
            service.prepare_studies,
            engine=state.engine,
            store=state.store,
            study_uids=uids[:20],
            principal=principal,
        )
        if waiting is not None:
            return _fetching(request, state, waiting)
        if _partial(request):  # the wait page's poll: the studies are here, so reload into the viewer
            return Response(status_code=204, headers={"HX-Refresh": "true", **_HTML})
    return FileResponse(root / "index.html", headers={"Cache-Control": "no-cache", **_ISOLATED})


def _fetching(request: Request, state: Any, waiting: service.Waiting) -> Response:
    """The page shown instead of the viewer while its studies are fetched, or htmx's answer to
    the page's poll: 204 (nothing new) while the fetch runs; its failure as the fragment, with 286,
    htmx's "stop polling" (a failure is shown once: the next visit tries again)."""
    check_url = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    context = {"w": waiting, "check_url": check_url, "nav": None, "htmx": _htmx(state)}
    if _partial(request):
        if not waiting.error:
            return Response(status_code=204, headers=_HTML)
        context["fragment"] = True
        return templates.TemplateResponse(request, "_fetching.html", context, status_code=286, headers=_HTML)
    status = 503 if waiting.error else 202
    return templates.TemplateResponse(request, "fetching.html", context, status_code=status, headers=_HTML)


# -- static assets of the pages ------------------------------------------------------------------


@router.get("/static/{name}")
def static(name: str, state: StateDep) -> Response:
    """The pages' own stylesheet, and htmx from its pinned install."""
    if name == "htmx.min.js":
        root = _installed(state.settings, assets.HTMX)
        path = _file(root / "dist", name) if root else None
    else:
        path = _file(_STATIC, name)
    if path is None:
        return Response(status_code=404)
    return FileResponse(path, headers={"Cache-Control": "no-cache"})


def _htmx(state: Any) -> bool:
    return _installed(state.settings, assets.HTMX) is not None


def _partial(request: Request) -> bool:
    return request.headers.get("HX-Request") == "true" and request.headers.get("HX-Boosted") != "true"


# -- the clinician's pages ------------------------------------------------------------------------


@pages_router.get("/", response_class=HTMLResponse)
def lookup_page(request: Request, session: SessionDep, principal: PrincipalDep, state: StateDep) -> Response:
    """The lookup: the form, and the answer when the form is filled in (works without JavaScript;
    with htmx only the answer is replaced)."""
    view = pages.lookup_view(
        session=session, principal=principal, form=pages.LookupForm.from_query(request.query_params)
    )
    missing = _installed(state.settings, assets.OHIF) is None
    # Back from "use this prior" without JavaScript (the redirect names the study).
    notice = (
        "Recorded: that prior is used instead of a new exam." if request.query_params.get("avoided") else ""
    )
    context = {"v": view, "nav": "lookup", "htmx": _htmx(state), "viewer_missing": missing, "notice": notice}
    name = "_lookup.html" if _partial(request) else "lookup.html"
    status = 400 if view.errors else 200
    return templates.TemplateResponse(request, name, context, status_code=status, headers=_HTML)


@pages_router.get("/record", response_class=HTMLResponse)
def record_page(request: Request, session: SessionDep, principal: PrincipalDep) -> Response:
    """The patient's imaging record across every facility, for printing (a print stylesheet)."""
    view = pages.lookup_view(
        session=session, principal=principal, form=pages.LookupForm.from_query(request.query_params)
    )
    rows = sorted(
        view.answer.priors if view.answer else [],
        key=lambda p: p.study_date.isoformat() if p.study_date else "",
        reverse=True,
    )
    context = {"v": view, "rows": rows, "background_source": present.BACKGROUND_SOURCE}
    return templates.TemplateResponse(
        request, "record.html", context, status_code=400 if view.errors else 200, headers=_HTML
    )


@pages_router.post("/avoided", response_class=HTMLResponse)
def avoided(
    request: Request,
    session: SessionDep,
    principal: PrincipalDep,
    form: FormDep,
) -> Response:
    """The "use this prior instead of a new exam" button: an avoided repeat, through the lookup
    service. Without JavaScript it redirects back to the lookup; with htmx it answers a fragment."""
    back = form.get("back", "/")
    back = back if back.startswith("/") and not back.startswith("//") else "/"
    study_instance_uid = form.get("study_instance_uid", "")[:64]
    planned_exam = form.get("planned_exam", "")[:256]
    facility = form.get("facility", "")[:64]
    try:
        service.refuse_nul(study=study_instance_uid, exam=planned_exam, facility=facility)
        message, month = pages.record_avoided(
            session=session,
            principal=principal,
            study_uid=study_instance_uid,
            planned_exam=planned_exam,
            facility=facility,
        )
    except ScanOnceError as exc:
        if _partial(request):
            return HTMLResponse(
                f'<p class="error" role="alert" tabindex="-1" autofocus>{escape(exc.message)}</p>',
                status_code=exc.status_code,
                headers=_HTML,
            )
        context = {"title": "Not recorded", "message": exc.message, "back": back, "htmx": False}
        return templates.TemplateResponse(
            request, "message.html", context, status_code=exc.status_code, headers=_HTML
        )
    if not _partial(request):
        sep = "&" if "?" in back else "?"
        target = f"{back}{sep}{urlencode({'avoided': study_instance_uid})}#answer"
        return RedirectResponse(target, status_code=303)
    names = {facility: facility}
    view = SimpleNamespace(avoided=month, facility_names=names)
    context = {"v": view, "oob": True}
    count = templates.get_template("_avoided.html").render(context)
    # autofocus: htmx focuses it after the swap, so the keyboard stays where the button was.
    notice = f'<p class="notice" role="status" tabindex="-1" autofocus>{escape(message)}</p>'
    return HTMLResponse(notice + count, headers=_HTML)


# -- the radiologist's import page ---------------------------------------------------------------


@pages_router.get("/imports", response_class=HTMLResponse)
def imports_page(request: Request, session: SessionDep, principal: PrincipalDep, state: StateDep) -> Response:
    """The imports and their progress; with ?study=&facility= first the dry-run diff to confirm."""
    study, facility = request.query_params.get("study", ""), request.query_params.get("facility", "")
    preview, error, status = None, "", 200
    if study and facility:
        try:
            service.refuse_nul(study=study, facility=facility)
            prepared = imports.prepare(
                engine=state.engine, principal=principal, study_uid=study[:64], facility_id=facility[:64],
                calling_ae=state.settings.ae_title,
            )  # fmt: skip
            diffs = imports.dry_run(
                engine=state.engine, store=state.store, prepared=prepared, study_uid=study
            )
            preview = {"study_uid": study, "facility": facility, "via": prepared.via,
                       "plan": prepared.plan.to_json(), "instances": diffs}  # fmt: skip
        except ScanOnceError as exc:
            error, status = exc.message, exc.status_code
    listed = imports.list_imports(session=session, limit=50)
    retry = imports.retry_times(session=session, rows=listed)
    rows = [ImportOut.of(r, retry_at=retry.get(r.id or 0)) for r in listed]
    # Each import's refused or lost instances, named with the archive's answer (the first 20).
    failures = {
        r.id: [i for i in imports.instances_of(session=session, import_id=r.id) if i.status == "failed"][:20]
        for r in rows
        if r.failed
    }
    context = {"rows": rows, "preview": preview, "error": error, "nav": "imports", "htmx": _htmx(state),
               "failures": failures}  # fmt: skip
    name = "_imports.html" if _partial(request) else "imports.html"  # htmx's poll: the table only
    return templates.TemplateResponse(request, name, context, status_code=status, headers=_HTML)


@pages_router.post("/imports", response_class=HTMLResponse)
def imports_start(request: Request, principal: PrincipalDep, state: StateDep, form: FormDep) -> Response:
    """Start the import confirmed on the page; the job worker runs it."""
    try:
        service.refuse_nul(study=form.get("study_uid", ""), facility=form.get("facility", ""))
        imports.start_import(
            engine=state.engine, principal=principal, study_uid=form.get("study_uid", "")[:64],
            facility_id=form.get("facility", "")[:64], accession_policy=form.get("accession_policy", "keep"),
            calling_ae=state.settings.ae_title,
        )  # fmt: skip
    except ScanOnceError as exc:
        preview = urlencode(
            {"study": form.get("study_uid", "")[:64], "facility": form.get("facility", "")[:64]}
        )
        context = {
            "title": "Not imported",
            "message": exc.message,
            "back": f"/imports?{preview}",
            "htmx": False,
        }
        return templates.TemplateResponse(
            request, "message.html", context, status_code=exc.status_code, headers=_HTML
        )
    return RedirectResponse("/imports", status_code=303)


@pages_router.get("/compare", response_class=HTMLResponse)
def compare(request: Request, session: SessionDep, principal: PrincipalDep) -> Response:
    """ "Compare in viewer": today's local study and the outside prior side by side in OHIF (its
    compare hanging protocol: the first study named is the current one, the second the prior).
    Today's is `local` when the page names it, else the patient's most recent study at
    `facility` (default: the caller's)."""
    q = request.query_params
    try:
        service.refuse_nul(study=q.get("study", ""), facility=q.get("facility", ""), local=q.get("local", ""))
        uids = imports.compare_studies(
            session=session, study_uid=q.get("study", "")[:64],
            facility_id=(q.get("facility") or principal.facility)[:64], local_uid=q.get("local", "")[:64],
        )  # fmt: skip
    except ScanOnceError as exc:
        context = {"title": "Nothing to compare", "message": exc.message, "back": "/", "htmx": False}
        return templates.TemplateResponse(
            request, "message.html", context, status_code=exc.status_code, headers=_HTML
        )
    target = f"{assets.VIEWER_PATH}viewer?" + urlencode(
        {"StudyInstanceUIDs": ",".join(uids), "hangingProtocolId": COMPARE_PROTOCOL}, safe=",@/"
    )
    return RedirectResponse(target, status_code=303)


# -- admin pages ------------------------------------------------------------------------------------


@admin_router.get("/facilities", response_class=HTMLResponse)
def admin_facilities(
    request: Request, session: SessionDep, _principal: PrincipalDep, state: StateDep
) -> Response:
    context = {"rows": pages.facility_rows(session=session), "nav": "facilities", "htmx": _htmx(state)}
    return templates.TemplateResponse(request, "admin_facilities.html", context, headers=_HTML)


@admin_router.get("/jobs", response_class=HTMLResponse)
def admin_jobs(request: Request, session: SessionDep, _principal: PrincipalDep, state: StateDep) -> Response:
    context = {"rows": pages.job_rows(session=session), "nav": "jobs", "htmx": _htmx(state)}
    name = "_jobs.html" if _partial(request) else "admin_jobs.html"
    return templates.TemplateResponse(request, name, context, headers=_HTML)


@admin_router.get("/review", response_class=HTMLResponse)
def admin_review(
    request: Request, session: SessionDep, _principal: PrincipalDep, state: StateDep
) -> Response:
    return _review_page(request, session, state)


def _review_page(
    request: Request,
    session: Any,
    state: Any,
    *,
    notice: str = "",
    error: str = "",
    status: int = 200,
    refused: tuple[int, str] | None = None,
) -> Response:
    """`refused`: (item, reason typed) of a refused decision, to show its message beside that
    item's Reason with the text kept; an item no longer open keeps the message at the top."""
    cards = pages.review_cards(session=session)
    beside = refused is not None and any(c.id == refused[0] for c in cards)
    context = {
        "cards": cards,
        "field_names": pages.FIELD_NAMES,
        "nav": "review",
        "htmx": _htmx(state),
        "notice": notice,
        "error": "" if beside else error,
        "refused": {"id": refused[0], "reason": refused[1], "message": error} if beside and refused else None,
    }
    return templates.TemplateResponse(
        request, "admin_review.html", context, status_code=status, headers=_HTML
    )


@admin_router.post("/review/{review_id}", response_class=HTMLResponse)
def admin_decide(
    request: Request,
    review_id: int,
    session: SessionDep,
    principal: PrincipalDep,
    state: StateDep,
    form: FormDep,
) -> Response:
    """Accept (link) or reject a review item through the identity service."""
    reason = form.get("reason", "")[:512]
    try:
        notice = pages.decide_review(
            session=session,
            principal=principal,
            review_id=review_id,
            decision=form.get("decision", ""),
            why=reason,
        )
    except ScanOnceError as exc:
        session.rollback()
        refused = (review_id, reason)
        return _review_page(
            request, session, state, error=exc.message, status=exc.status_code, refused=refused
        )
    return _review_page(request, session, state, notice=notice)
