"""``imgclust serve``: a local web app to browse, search and curate a finished run.

Plain HTML pages rendered here, one stylesheet and one script served by the app (nothing from the
internet, no build step). Every page reads a bounded slice of the run (``RunCatalog``), so it
answers as fast at ten million images as at ten thousand. Bound to an address other than the
loopback, every request needs the token printed at start (as Jupyter does): given once as
``?token=``, it is kept in a cookie.
"""

from __future__ import annotations

import html
import logging
import math
import secrets
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import FastAPI, File, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from imgclust.curation import UNASSIGNED, CurationError, add_edit
from imgclust.serve.catalog import ClusterInfo, NotFound, RunCatalog
from imgclust.state.lease import LeaseHeld

logger = logging.getLogger("imgclust")
STATIC = Path(__file__).parent / "static"
PER_PAGE, MAX_PER_PAGE = 60, 500
GROUPS_PER_PAGE = 20
MAX_UPLOAD = 64 << 20
SORTS = {"size": lambda c: (-c.size, c.id), "cohesion": lambda c: (c.cohesion if math.isfinite(c.cohesion) else 1e300,
                                                                      c.id),
         "id": lambda c: (c.id,), "name": lambda c: (c.name.lower(), c.id)}


def create_app(catalog: RunCatalog, token: str | None = None) -> FastAPI:
    """The app over ``catalog``; with ``token``, requests without it are refused (401)."""
    app = FastAPI(title="imgclust", docs_url=None, redoc_url=None, openapi_url=None)

    @app.middleware("http")
    async def guard(request: Request, call_next: Any) -> Response:
        if token is not None:
            given = request.query_params.get("token") or request.cookies.get("imgclust_token")
            if not given or not secrets.compare_digest(given, token):
                return _page("Token needed", "<p>This app was started on a network address: open the link with "
                             "<code>?token=…</code> that <code>imgclust serve</code> printed.</p>", 401)
        try:
            response = await call_next(request)
        except Exception:  # never a traceback to the browser; the log has it
            logger.exception("serve: %s %s failed", request.method, request.url.path)
            response = _page("Something went wrong", "<p>The app could not answer this request; its log says "
                             "why.</p>", 500)
        if token is not None and request.query_params.get("token"):
            response.set_cookie("imgclust_token", token, httponly=True, samesite="strict")
        return response

    @app.exception_handler(NotFound)
    async def not_found(request: Request, exc: NotFound) -> Response:
        return _error(request, str(exc), 404)

    @app.exception_handler(CurationError)
    async def bad_edit(request: Request, exc: CurationError) -> Response:
        return _error(request, str(exc), 400)

    @app.exception_handler(LeaseHeld)
    async def busy(request: Request, exc: LeaseHeld) -> Response:
        return _error(request, f"the run is being written just now ({exc}); try again in a moment", 423)

    @app.exception_handler(ValueError)
    async def bad_value(request: Request, exc: ValueError) -> Response:
        return _error(request, str(exc), 400)

    @app.exception_handler(404)
    async def no_route(request: Request, exc: Exception) -> Response:
        return _error(request, f"there is no page {request.url.path}", 404)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: Any) -> Response:
        errors = getattr(exc, "errors", lambda: [])()
        what = "; ".join(f"{'.'.join(str(x) for x in e.get('loc', [])[1:])}: {e.get('msg', '').lower()}"
                         for e in errors)
        return _error(request, f"bad request: {what or exc}", 400)

    @app.get("/static/{name}")
    def static(name: str) -> Response:
        path = STATIC / name
        if name not in {"app.css", "app.js"} or not path.is_file():
            raise NotFound(f"there is no file {name}")
        kind = "text/css" if name.endswith(".css") else "text/javascript"
        return Response(path.read_bytes(), media_type=kind, headers={"Cache-Control": "max-age=300"})

    @app.get("/", response_class=HTMLResponse)
    def overview(sort: str = "size") -> Response:
        catalog.refresh()
        if sort not in SORTS:
            raise ValueError(f"sort by one of {', '.join(SORTS)} (got {sort!r})")
        clusters = sorted(catalog.clusters(), key=SORTS[sort])
        head = "".join(f'<th><a href="/?sort={k}"{" class=on" if k == sort else ""}>{label}</a></th>'
                       for k, label in (("id", "cluster"), ("name", "name"), ("size", "images"),
                                        ("cohesion", "cohesion")))
        rows = []
        for c in clusters:
            few = catalog.members(c.id, 0, 5)
            thumbs = "".join(_thumb(int(r.index), str(r.path)) for r in few.itertuples())
            cohesion = f"{c.cohesion:.3f}" if math.isfinite(c.cohesion) else "–"
            merged = f' <span class="muted">(with {", ".join(map(str, c.parts[1:]))})</span>' if len(c.parts) > 1 else ""
            parent = catalog.curation.split_part_of(c.id)
            if parent is not None:
                merged += f' <span class="muted">(split of cluster {parent})</span>'
            rows.append(f'<tr data-cluster="{c.id}"><td><a href="/cluster/{c.id}">{c.id}</a></td>'
                        f'<td><a href="/cluster/{c.id}">{html.escape(c.name)}</a>{merged}</td>'
                        f'<td class="num">{c.size:,}</td><td class="num">{cohesion}</td>'
                        f'<td class="strip">{thumbs}</td></tr>')
        n = sum(c.size for c in clusters)
        body = (f'<p>{n:,} images in {len(clusters)} clusters. Cohesion is the members\' mean distance to the '
                'centre: smaller is tighter. The first image of a row is the one nearest its centre.</p>'
                f'<table class="clusters"><thead><tr>{head}<th>nearest the centre</th></tr></thead>'
                f'<tbody>{"".join(rows)}</tbody></table>')
        return _page("Clusters", body)

    @app.get("/cluster/{cluster}", response_class=HTMLResponse)
    def cluster_page(cluster: int, page: int = 1, per: int = PER_PAGE) -> Response:
        catalog.refresh()
        if not 1 <= per <= MAX_PER_PAGE:
            raise ValueError(f"per (images a page) is 1 to {MAX_PER_PAGE} (got {per})")
        info = catalog.cluster(cluster)
        span = catalog.member_span(cluster)
        pages = max(1, -(-span // per))
        if not 1 <= page <= pages:
            raise NotFound(f"cluster {cluster} has {pages} page{'s' if pages != 1 else ''} of {per}; "
                           f"there is no page {page}")
        rows = catalog.members(cluster, (page - 1) * per, per)
        first = (page - 1) * per
        cells = "".join(
            f'<figure class="member" data-index="{int(r.index)}" data-path="{html.escape(str(r.path))}">'
            f'<label><input type="checkbox" class="pick" aria-label="select {html.escape(str(r.path))}">'
            f'{first + i + 1:,}</label>{_thumb(int(r.index), str(r.path))}'
            f'<figcaption>{float(r.distance):.3f}</figcaption></figure>'
            for i, r in enumerate(rows.itertuples()))
        options = "".join(f'<option value="{c.id}">{c.id}: {html.escape(c.name)}</option>'
                          for c in catalog.clusters() if c.id not in (cluster, UNASSIGNED))
        tools = "" if cluster == UNASSIGNED else (
            f'<form class="tool" data-action="rename"><input name="name" value="{html.escape(info.name)}" '
            'aria-label="name" maxlength="200"><button>Rename</button></form>'
            f'<form class="tool" data-action="merge"><select name="other" aria-label="cluster to merge">{options}</select>'
            '<button>Merge it into this one</button></form>'
            + ('' if info.parts != (cluster,) or catalog.curation.split_part_of(cluster) is not None else
               '<form class="tool" data-action="split"><input name="parts" type="number" min="2" max="50" value="2" '
               'aria-label="parts"><button>Split into parts</button></form>'))
        move = (f'<div class="tool selection"><span id="picked">0 selected</span> '
                f'<select id="move-to" aria-label="move to">{options}</select>'
                '<button id="move">Move to cluster</button> <button id="reject">Not this</button></div>')
        body = (f'<p>{info.size:,} images, in order of distance to the centre (the number under each). '
                f'Page {page:,} of {pages:,}.</p><div class="tools" data-cluster="{cluster}">{tools}{move}</div>'
                f'{_pager(f"/cluster/{cluster}", page, pages, per)}<div class="grid">{cells}</div>'
                f'{_pager(f"/cluster/{cluster}", page, pages, per)}')
        return _page(f"{info.name}", body)

    @app.get("/image/{index}", response_class=HTMLResponse)
    def image_page(index: int) -> Response:
        catalog.refresh()
        img = catalog.image(index)
        near = catalog.similar(index=index, k=24)
        outlier = "" if img["outlier"] is None else (
            f'<dt>outlier score</dt><dd>{img["outlier"]:.2f} <span class="muted">(its distance to its 10th nearest '
            'neighbour over its cluster\'s typical one: about 1 is typical, 2 or more stands apart)</span></dd>')
        copies = catalog.duplicates_of(index)
        dup_html = "" if not len(copies) else (
            f'<h2>Near-duplicates ({len(copies)})</h2><div class="grid results">'
            + "".join(_dup_cell(r) for r in copies.itertuples()) + '</div>')
        body = (f'<div class="one"><img src="/thumb/{index}" alt="{html.escape(img["path"])}" class="big">'
                f'<dl><dt>path</dt><dd>{html.escape(img["path"])}</dd><dt>cluster</dt>'
                f'<dd><a href="/cluster/{img["cluster"]}">{img["cluster"]}: {html.escape(img["name"])}</a></dd>'
                f'<dt>distance to its centre</dt><dd>{img["distance"]:.3f}</dd>{outlier}</dl></div>'
                f'{dup_html}<h2>Most similar</h2>{_result_grid(near)}')
        return _page(f"Image {index}", body)

    @app.get("/duplicates", response_class=HTMLResponse)
    def duplicates_page(page: int = 1, per: int = GROUPS_PER_PAGE) -> Response:
        catalog.refresh()
        if not 1 <= per <= MAX_PER_PAGE:
            raise ValueError(f"per (groups a page) is 1 to {MAX_PER_PAGE} (got {per})")
        total = catalog.duplicate_groups()
        pages = max(1, -(-total // per))
        if not 1 <= page <= pages:
            raise NotFound(f"there are {pages} page{'s' if pages != 1 else ''} of near-duplicate groups; "
                           f"there is no page {page}")
        groups = catalog.duplicate_page((page - 1) * per, per)
        rows = "".join(f'<section class="dupgroup"><h2>Group {int(g["group"].iloc[0])} · {len(g)} images</h2>'
                       f'<div class="grid results">{"".join(_dup_cell(r) for r in g.itertuples())}</div></section>'
                       for g in groups if len(g))
        intro = (f'<p>{total:,} groups of near-identical images (resized, recompressed, lightly cropped or '
                 'brightened copies): close by code, by perceptual hash and by content. The number under each image is its '
                 'code distance to the group\'s first, then the bits its hash differs by. Byte-identical files '
                 'are in <code>duplicates.parquet</code> instead.</p>')
        if not total:
            return _page("Near-duplicates", intro)
        return _page("Near-duplicates", f'{intro}{_pager("/duplicates", page, pages, per)}{rows}'
                     f'{_pager("/duplicates", page, pages, per)}')

    @app.post("/similar", response_class=HTMLResponse)
    async def similar_upload(file: UploadFile = File(...)) -> Response:
        data = await file.read(MAX_UPLOAD + 1)
        if len(data) > MAX_UPLOAD:
            raise ValueError(f"the upload is larger than {MAX_UPLOAD >> 20} MB")
        if not data:
            raise ValueError("the upload is empty")
        near = catalog.similar(image=data, k=24)
        return _page("Similar to your image", f'<p>Nearest to {html.escape(file.filename or "the upload")}:</p>'
                     f'{_result_grid(near)}')

    @app.get("/thumb/{index}")
    def thumb(index: int) -> Response:
        return Response(catalog.thumbnail_png(index), media_type="image/png",
                        headers={"Cache-Control": "max-age=3600"})

    @app.get("/map", response_class=HTMLResponse)
    def map_page() -> Response:
        return _page("Map", '<p>A sample of the images on the first two principal axes of their codes, coloured '
                     'by cluster. Point at one to see it; click to open its cluster.</p>'
                     '<div class="mapbox"><canvas id="map" width="900" height="640"></canvas>'
                     '<img id="peek" alt="" hidden></div>')

    @app.get("/api/map")
    def api_map() -> Response:
        return JSONResponse(catalog.map_points())

    @app.get("/api/clusters")
    def api_clusters() -> Response:
        catalog.refresh()
        return JSONResponse([_info(c) for c in catalog.clusters()])

    @app.get("/api/cluster/{cluster}/members")
    def api_members(cluster: int, start: int = 0, count: int = PER_PAGE) -> Response:
        if not 0 < count <= 1000 or start < 0:
            raise ValueError("count is 1 to 1000 and start at least 0")
        catalog.refresh()
        rows = catalog.members(cluster, start, count)
        return JSONResponse({"span": catalog.member_span(cluster), "start": start,
                             "members": rows.astype({"index": int}).to_dict(orient="records")})

    @app.get("/api/similar/{index}")
    def api_similar(index: int, k: int = 10) -> Response:
        if not 0 < k <= 200:
            raise ValueError("k is 1 to 200")
        near = catalog.similar(index=index, k=k)
        return JSONResponse(near[["index", "path", "cluster", "similarity_distance"]].to_dict(orient="records"))

    @app.post("/api/curation")
    async def api_curation(request: Request) -> Response:
        edit = await _json_object(request, "send the edit as a JSON object")
        stored = add_edit(catalog.store, edit, who=request.headers.get("X-Imgclust-User"))
        catalog.refresh()
        return JSONResponse(stored)

    @app.post("/api/split")
    async def api_split(request: Request) -> Response:
        how = 'send {"cluster": N, "parts": K} (parts: 2 to 50, or null to choose by silhouette)'
        body = await _json_object(request, how)
        if not isinstance(body.get("cluster"), int):
            raise ValueError(how)
        parts = body.get("parts")
        if parts is not None and (not isinstance(parts, int) or not 2 <= parts <= 50):
            raise ValueError("parts is 2 to 50, or null to choose by silhouette")
        catalog.refresh()
        catalog.cluster(body["cluster"])  # a clear 404 before any work
        stored = await run_in_threadpool(split_in_app, catalog, body["cluster"], parts,
                                         request.headers.get("X-Imgclust-User"))
        catalog.refresh()
        return JSONResponse(stored)

    @app.get("/favicon.ico")
    def favicon() -> Response:
        return Response(status_code=204)

    return app


async def _json_object(request: Request, how: str) -> dict[str, Any]:
    """The request's JSON body, which must be an object (ValueError ``how`` otherwise: a 400)."""
    try:
        body = await request.json()
    except Exception:
        raise ValueError(how) from None
    if not isinstance(body, dict):
        raise ValueError(how)
    return body


def split_in_app(catalog: RunCatalog, cluster: int, parts: int | None, who: str | None) -> dict[str, Any]:
    """Split ``cluster`` with the re-clustering stage on a one-worker local Dask cluster."""
    from imgclust.dask_cluster import dask_client
    from imgclust.stages.explore import split_cluster

    with dask_client(None, n_workers=1) as client:
        return split_cluster(catalog.store, cluster, parts, int(catalog.run.get("config", {}).get("seed", 0)),
                             client, who=who)


def _info(c: ClusterInfo) -> dict[str, Any]:
    return {"id": c.id, "name": c.name, "size": c.size,
            "cohesion": c.cohesion if math.isfinite(c.cohesion) else None, "parts": list(c.parts)}


def _thumb(index: int, path: str) -> str:
    return (f'<a href="/image/{index}" class="thumb"><img src="/thumb/{index}" alt="{html.escape(path)}" '
            f'title="{html.escape(path)}" loading="lazy" width="128" height="128"></a>')


def _dup_cell(r: Any) -> str:
    return (f'<figure class="member" data-index="{int(r.index)}">{_thumb(int(r.index), str(r.path))}'
            f'<figcaption>{float(r.distance):.3f} · {int(r.hash_distance)} bits · <a href="/cluster/{int(r.cluster)}">'
            f'{html.escape(str(r.name))}</a></figcaption></figure>')


def _result_grid(rows: Any) -> str:
    cells = "".join(f'<figure class="member" data-index="{int(r.index)}">{_thumb(int(r.index), str(r.path))}'
                    f'<figcaption>{float(r.similarity_distance):.3f} · <a href="/cluster/{int(r.cluster)}">'
                    f'{html.escape(str(r.name))}</a></figcaption></figure>' for r in rows.itertuples())
    return f'<div class="grid results">{cells}</div>'


def _pager(base: str, page: int, pages: int, per: int) -> str:
    extra = "" if per == PER_PAGE else f"&per={per}"

    def link(p: int, label: str) -> str:
        if p == page or not 1 <= p <= pages:
            return f'<span class="off">{label}</span>'
        return f'<a href="{base}?page={p}{extra}" rel="{label.lower()}">{label}</a>'

    return (f'<nav class="pager">{link(1, "First")} {link(page - 1, "Previous")} '
            f'<span>{page:,} / {pages:,}</span> {link(page + 1, "Next")} {link(pages, "Last")}</nav>')


def _page(title: str, body: str, status: int = 200) -> HTMLResponse:
    nav = ('<nav class="top"><a href="/">Clusters</a> <a href="/map">Map</a> <a href="/duplicates">Near-duplicates</a>'
           '<form action="/similar" method="post" enctype="multipart/form-data" class="upload">'
           '<label>Find similar to a file <input type="file" name="file" accept="image/*" required></label>'
           '<button>Search</button></form></nav>')
    return HTMLResponse(
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)} · imgclust</title>'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<link rel="stylesheet" href="/static/app.css"><link rel="icon" href="data:,"></head>'
        f'<body>{nav}<main><h1>{html.escape(title)}</h1>{body}</main>'
        '<script src="/static/app.js"></script></body></html>', status_code=status)


def _error(request: Request, message: str, status: int) -> Response:
    if request.url.path.startswith("/api/"):
        return JSONResponse({"error": message}, status_code=status)
    return _page("Not found" if status == 404 else "Cannot do that", f'<p class="error">{html.escape(message)}</p>'
                 '<p><a href="/">Back to the clusters</a></p>', status)


def serve_url(host: str, port: int, token: str | None) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/" + (f"?token={quote(token)}" if token else "")
