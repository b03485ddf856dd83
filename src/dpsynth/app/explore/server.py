"""`dpsynth explore`: a local web page over one run's sampling pipeline (FastAPI + uvicorn).

Routes take no file paths: the page and its scripts are fixed package files, volumes are
addressed by the random id `generate` gave them, and everything else is JSON. Generations
run one at a time on a single worker thread; others wait in its queue (up to
`max_pending`, then 503), so a CPU is never split between two volumes.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

from dpsynth.errors import DpsynthError

try:
    import uvicorn
    from fastapi import Body, FastAPI, Query, Request
    from fastapi import Path as PathParam
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
except ImportError:  # the `explore` extra keeps the core install lean
    raise DpsynthError(
        "dpsynth explore needs FastAPI and uvicorn: pip install 'dpsynth[explore]'"
    ) from None

from dpsynth.app.explore.service import Explorer, NotFoundError, response
from dpsynth.config import ExploreDefaults

STATIC = ("index.html", "explore.js", "explore.css")
VOLUME_ID = r"^[0-9a-f]{32}$"


def _package_file(*parts: str) -> bytes:
    return resources.files("dpsynth").joinpath(*parts).read_bytes()


def create_app(explorer: Explorer) -> FastAPI:
    """The FastAPI application serving `explorer`."""
    # Read once at start-up: the page is package data, never a path from a request.
    files = {name: _package_file("app", "explore", "static", name) for name in STATIC}
    files["viewer.js"] = _package_file("report", "viewer.js")
    media = {"html": "text/html; charset=utf-8", "js": "text/javascript", "css": "text/css"}
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dpsynth-generate")
    state = {"pending": 0}

    app = FastAPI(title="dpsynth explore", docs_url=None, redoc_url=None, openapi_url=None)

    def fail(status: int, message: str) -> JSONResponse:
        return JSONResponse({"detail": message}, status_code=status)

    @app.exception_handler(DpsynthError)
    async def bad_input(request: Request, exc: DpsynthError) -> JSONResponse:
        return fail(404 if isinstance(exc, NotFoundError) else 400, str(exc))

    @app.exception_handler(RequestValidationError)
    async def bad_shape(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(
            str(p) for p in first.get("loc", ()) if p != "body" and not isinstance(p, int)
        )
        where = where or "request"
        return fail(400, f"{where}: {first.get('msg', 'invalid request')}")

    def static(name: str) -> Response:
        kind = media[name.rsplit(".", 1)[1]]
        return Response(files[name], media_type=kind, headers={"Cache-Control": "no-cache"})

    @app.get("/")
    def index() -> Response:
        return static("index.html")

    @app.get("/static/{name}")
    def static_file(name: str) -> Response:
        if name not in files:
            return fail(404, f"no such file: {name}")
        return static(name)

    @app.get("/api/info")
    def info() -> dict[str, Any]:
        return explorer.info()

    @app.post("/api/generate")
    async def generate(payload: Annotated[Any, Body()]) -> dict[str, Any]:
        parsed = explorer.parse(payload)  # a bad request never reaches the queue
        if state["pending"] >= explorer.defaults.max_pending:
            return fail(503, f"busy: {state['pending']} volumes queued; try again shortly")
        state["pending"] += 1
        try:
            loop = asyncio.get_running_loop()
            result = await loop.run_in_executor(worker, explorer.generate, parsed)
        finally:
            state["pending"] -= 1
        return response(result)

    @app.get("/api/draw")
    def draw(
        seed: Annotated[int, Query()] = 0, phase: Annotated[float | None, Query()] = None
    ) -> dict[str, Any]:
        return explorer.draw(seed, phase)

    @app.get("/api/volume/{volume_id}.nii.gz")
    def volume(volume_id: Annotated[str, PathParam(pattern=VOLUME_ID)]) -> Response:
        body = explorer.nifti(volume_id)
        return Response(
            body,
            media_type="application/gzip",
            headers={
                "Content-Disposition": f'attachment; filename="dpsynth_{volume_id[:8]}.nii.gz"'
            },
        )

    app.state.explorer = explorer
    app.state.worker = worker
    return app


def serve(
    run: str | os.PathLike,
    host: str | None = None,
    port: int | None = None,
    referee: str | os.PathLike | None = None,
    selector: str | os.PathLike | None = None,
    private: Sequence[str | os.PathLike] = (),
) -> None:
    """Load `run`, print the URL and serve until interrupted."""
    # A generation is a long string of small tensor ops. On a shared CPU, OpenMP threads
    # that spin at every op's barrier starve each other: one volume took 37 s instead of
    # 2.9 s at load 11 on 2 cores (BENCHMARKS.md, Explorer). Passive waiting has to be chosen
    # before torch loads its OpenMP runtime, i.e. here, before the run is loaded.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    defaults = ExploreDefaults()
    host = host or defaults.host
    port = defaults.port if port is None else port
    explorer = Explorer(
        Path(run), referee=referee, defaults=defaults, selector=selector, private=private
    )
    if not _is_loopback(host):
        if explorer.evaluation_only:
            raise DpsynthError(
                f"{run}: evaluation only ({explorer.evaluation_only}); serve it on a loopback "
                f"host (--host 127.0.0.1), not {host}"
            )
        warnings.warn(
            f"serving on {host}: anyone who can reach this address can generate from the model",
            stacklevel=2,
        )
    app = create_app(explorer)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning")
    server = uvicorn.Server(config)
    shown = f"[{host}]" if ":" in host else host
    print(f"dpsynth explore: {Path(run)} at http://{shown}:{port}/  (Ctrl-C to stop)", flush=True)
    server.run()


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
