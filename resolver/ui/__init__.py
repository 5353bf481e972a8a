"""The resolver's web console (docs/console.md), served at ``/ui/``.

:func:`add_ui_routes` mounts, on the resolver app:

* ``GET /ui/`` and ``GET /ui/{file}``: the static console (``index.html``, ES modules,
  ``style.css``) shipped as package data.  Every answer carries a strict
  Content-Security-Policy: scripts, styles and fetches from this origin only, no inline
  script or style, no frames, no plug-ins.
* ``GET /v1/anchor`` -> ``{"anchors": [{"type", "subject", "public_key", "kid"}],
  "log_vkeys": [...]}``: the trust anchors this resolver verifies records against, and
  the transparency log's verifier keys when ``CPI_RESOLVER_LOG_VKEY`` names ``.vkey``
  files (comma-separated).  The console pins an anchor the user loads from a file, or
  this one, and shows its kid either way.
* ``GET /v1/ui/namespaces``: the seeded namespace tree (``seeds/namespaces.json``).

The console verifies everything it shows in the browser; nothing here is trusted by it
beyond the anchor the user accepts.
"""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path
from typing import Final

from aiohttp import web

import seeds
from resolver.config import ResolverConfig

__all__ = ["CSP", "ENV_LOG_VKEY", "add_ui_routes", "anchor_document"]

ENV_LOG_VKEY: Final = "CPI_RESOLVER_LOG_VKEY"

CSP: Final = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
_HEADERS: Final = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
_TYPES: Final = {
    ".html": "text/html",
    ".js": "text/javascript",
    ".css": "text/css",
    ".svg": "image/svg+xml",
}


def _static() -> dict[str, tuple[bytes, str]]:
    """Every file of ``resolver/ui/static`` by name, with its content type."""
    out: dict[str, tuple[bytes, str]] = {}
    for item in resources.files(__name__).joinpath("static").iterdir():
        suffix = Path(item.name).suffix
        if item.is_file() and suffix in _TYPES:
            out[item.name] = (item.read_bytes(), _TYPES[suffix])
    return out


def anchor_document(config: ResolverConfig, environ: dict[str, str] | None = None) -> bytes:
    """The body of ``GET /v1/anchor``: the configured anchors (with kids) and log vkeys."""
    env = os.environ if environ is None else environ
    anchors = [
        {
            "type": "anchor.v1",
            "subject": a.subject,
            "public_key": a.public_key,
            "kid": a.kid,
        }
        for a in config.load_anchors()
    ]
    vkeys: list[str] = []
    for name in filter(None, (p.strip() for p in env.get(ENV_LOG_VKEY, "").split(","))):
        vkeys += [line.strip() for line in Path(name).read_text().splitlines() if line.strip()]
    return json.dumps({"anchors": anchors, "log_vkeys": vkeys}, separators=(",", ":")).encode()


def add_ui_routes(app: web.Application, config: ResolverConfig) -> None:
    """Mount ``/ui/``, ``/v1/anchor`` and ``/v1/ui/namespaces`` on ``app``.

    Call before the app's catch-all route.  Files are read once, here.
    """
    files = _static()
    anchor = anchor_document(config)
    namespaces = seeds.path(seeds.NAMESPACES).read_bytes()

    def answer(body: bytes, content_type: str) -> web.Response:
        resp = web.Response(body=body, content_type=content_type, charset="utf-8")
        resp.headers.update(_HEADERS)
        return resp

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPFound("/ui/")

    async def index(request: web.Request) -> web.Response:
        return answer(*files["index.html"])

    async def static(request: web.Request) -> web.Response:
        found = files.get(request.match_info["name"])
        if found is None:
            body = json.dumps({"error": {"code": "not_found", "message": request.path}})
            resp = web.Response(body=body.encode(), status=404, content_type="application/json")
            resp.headers.update(_HEADERS)
            return resp
        return answer(*found)

    async def get_anchor(request: web.Request) -> web.Response:
        return answer(anchor, "application/json")

    async def get_namespaces(request: web.Request) -> web.Response:
        return answer(namespaces, "application/json")

    app.router.add_get("/ui", redirect, name="ui-redirect")
    app.router.add_get("/ui/", index, name="ui-index")
    app.router.add_get("/ui/{name:[A-Za-z0-9_.-]+}", static, name="ui-static")
    app.router.add_get("/v1/anchor", get_anchor, name="anchor")
    app.router.add_get("/v1/ui/namespaces", get_namespaces, name="ui-namespaces")
