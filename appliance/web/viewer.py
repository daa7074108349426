"""The OHIF viewer at /viewer, reading this archive's DICOMweb root.

`make` fetches the npm package @ohif/app (its built `dist/`) into VIEWER_DIR (not in
git). That build expects to live at the site root: its index.html, its webpack runtime
(`__webpack_require__.p`) and its stylesheets name their files from "/". They are served
with those references moved under /viewer/, and `app-config.js` is ours: one DICOMweb
data source, this server's /dicom-web (QIDO and WADO-RS, frames and metadata), with
relative URLs so that the viewer works on whatever name and port the server is reached
by. The viewer's files hold no patient data and need no token; the viewer passes the
one in its URL (`/viewer/viewer?StudyInstanceUIDs=...&token=TOKEN`) with every request.
"""

from __future__ import annotations

import json
from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, PlainTextResponse, Response
from starlette.routing import Route

from appliance.errors import ConfigError
from appliance.web.app import run

VIEWER_DIR = Path(__file__).resolve().parent / "ohif"
MOUNT = "/viewer"
_REWRITES = {
    ".html": ((b'window.PUBLIC_URL="/"', b'window.PUBLIC_URL="/viewer/"'), (b'src="/', b'src="/viewer/'),
              (b'href="/', b'href="/viewer/')),
    ".js": ((b'__webpack_require__.p = "/";', b'__webpack_require__.p = "/viewer/";'),),
    ".css": ((b"url(/", b"url(/viewer/"),),
}
_TYPES = {".js": "text/javascript", ".css": "text/css", ".html": "text/html", ".wasm": "application/wasm",
          ".json": "application/json"}


def app_config(dicomweb_root: str) -> str:
    data_source = {
        "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
        "sourceName": "pacs-vault",
        "configuration": {
            "friendlyName": "pacs-vault", "name": "pacs-vault",
            "wadoUriRoot": "/wado", "qidoRoot": dicomweb_root, "wadoRoot": dicomweb_root,
            "qidoSupportsIncludeField": True, "imageRendering": "wadors", "thumbnailRendering": "wadors",
            "enableStudyLazyLoad": True, "supportsFuzzyMatching": False, "supportsWildcard": True,
            "staticWado": False, "singlepart": "bulkdata,video",
            "bulkDataURI": {"enabled": True, "relativeResolution": "studies"},
            "omitQuotationForMultipartRequest": True,
        },
    }
    config = {"routerBasename": MOUNT, "showStudyList": True, "extensions": [], "modes": [],
              "customizationService": {}, "maxNumberOfWebWorkers": 2, "showWarningMessageForCrossOrigin": False,
              "showCPUFallbackMessage": False, "showLoadingIndicator": True, "strictZSpacingForVolumeViewport": True,
              "maxNumRequests": {"interaction": 100, "thumbnail": 5, "prefetch": 10},
              "defaultDataSourceName": "pacs-vault", "dataSources": [data_source]}
    return f"window.config = {json.dumps(config, indent=2)};\n"


class Viewer:
    def __init__(self, dist: Path, dicomweb_root: str):
        if not (dist / "index.html").is_file():
            raise ConfigError(f"dicomweb.viewer is on but the OHIF viewer is not in {dist}: run `make viewer`")
        self._dist = dist.resolve()
        self._config = app_config(dicomweb_root).encode()

    def routes(self) -> list[Route]:
        return [Route(MOUNT, self.serve, methods=["GET"]), Route(MOUNT + "/{path:path}", self.serve, methods=["GET"])]

    async def serve(self, request: Request) -> Response:
        path = request.path_params.get("path", "")
        if path == "app-config.js":
            return Response(self._config, media_type="text/javascript", headers={"Cache-Control": "no-cache"})
        file = (self._dist / path).resolve()
        if not file.is_relative_to(self._dist):
            return PlainTextResponse("not found\n", 404)
        if not file.is_file():  # a route of the single-page app: its page
            file = self._dist / "index.html"
        rewrites = _REWRITES.get(file.suffix)
        if rewrites is None:
            return FileResponse(file, media_type=_TYPES.get(file.suffix))
        body = await run(file.read_bytes)
        for old, new in rewrites:
            body = body.replace(old, new)
        return Response(body, media_type=_TYPES[file.suffix])
