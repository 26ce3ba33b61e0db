"""The browser playground at `/` and the API page at `/v1/docs`, served from files in this
folder (static/, no build step) and, for Swagger UI, from the copy BentoML ships in its
package: nothing is loaded from the internet.

Every HTML page leaves with a strict Content-Security-Policy (scripts, styles and
connections to this origin only; no inline scripts, no frames, no forms posting
elsewhere), so a page the service serves cannot call out even if a script tried.

`Playground(app)` answers these paths itself and hands everything else to `app`;
`routes()` is their entry in the gateway's allow-list (public GETs: the page needs no API
key to load; its API calls send the key typed into it).
"""

from __future__ import annotations

import mimetypes
from pathlib import Path

STATIC = Path(__file__).parent / "static"
PREFIX = "/playground/"

# 'self' only; data:/blob: images are the previews and results the page builds itself.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
       "connect-src 'self'; font-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'")
# Swagger UI sets inline style attributes while it renders; scripts stay 'self' only.
DOCS_CSP = CSP.replace("style-src 'self'", "style-src 'self' 'unsafe-inline'")
SECURITY_HEADERS = {"x-content-type-options": "nosniff", "referrer-policy": "no-referrer",
                    "cache-control": "no-cache"}


def _swagger_dir() -> Path | None:
    try:
        import bentoml
    except ImportError:  # pragma: no cover - bentoml is a dependency of the service
        return None
    folder = Path(bentoml.__file__).parent / "_internal" / "server" / "static_content"
    return folder if (folder / "swagger-ui-bundle.js").exists() else None


def _files() -> dict[str, tuple[Path, str]]:
    """Path served -> (file, Content-Security-Policy or '' for non-HTML)."""
    files = {"/": (STATIC / "index.html", CSP), "/v1/docs": (STATIC / "docs.html", DOCS_CSP)}
    for path in sorted(STATIC.iterdir()):
        if path.suffix != ".html" and path.is_file():
            files[PREFIX + path.name] = (path, "")
    swagger = _swagger_dir()
    if swagger is not None:
        for name in ("swagger-ui-bundle.js", "swagger-ui.css"):
            files[f"{PREFIX}swagger/{name}"] = (swagger / name, "")
    return files


FILES = _files()


def routes() -> dict:
    """The gateway's entries for the playground's paths."""
    from services.gateway import Route

    return {path: Route(frozenset({"GET"}), public=True, limited=False, drains=False) for path in FILES}


class Playground:
    """ASGI: the playground's files; any other path goes to `app`."""

    def __init__(self, app):
        self.app = app
        self._cache: dict[str, tuple[bytes, list]] = {}

    def _load(self, path: str) -> tuple[bytes, list]:
        if path not in self._cache:
            file, csp = FILES[path]
            body = file.read_bytes()
            media = mimetypes.guess_type(file.name)[0] or "application/octet-stream"
            if media.startswith("text/") or media in ("application/javascript", "image/svg+xml"):
                media += "; charset=utf-8"
            headers = {"content-type": media, "content-length": str(len(body)), **SECURITY_HEADERS}
            if csp:
                headers["content-security-policy"] = csp
            self._cache[path] = (body, [(k.encode(), v.encode()) for k, v in headers.items()])
        return self._cache[path]

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] not in FILES or scope["method"] not in ("GET", "HEAD"):
            return await self.app(scope, receive, send)
        body, headers = self._load(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body})
