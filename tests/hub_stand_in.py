"""A stand-in for the Hugging Face Hub on a loopback port, serving one folder as one repo.

No test may download, but the code that downloads is real: pointed here with `HF_ENDPOINT`,
`huggingface_hub.snapshot_download` runs its online path (repo info, file tree, HEAD and GET of each file)
against these routes, the few it uses, and every file it fetches is logged.
"""

from __future__ import annotations

import contextlib
import hashlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hub_app(folder: Path, repo_id: str, fetched: list[str]) -> Starlette:
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    digests = {name: hashlib.sha1((folder / name).read_bytes()).hexdigest() for name in files}

    async def info(request: Request) -> JSONResponse:
        return JSONResponse({"id": repo_id, "sha": COMMIT, "siblings": [{"rfilename": f} for f in files]})

    async def tree(request: Request) -> JSONResponse:
        return JSONResponse(
            [{"type": "file", "path": f, "size": (folder / f).stat().st_size, "oid": digests[f]} for f in files]
        )

    async def resolve(request: Request) -> Response:
        name = request.path_params["path"]
        if name not in digests:
            return Response(status_code=404, headers={"X-Error-Code": "EntryNotFound"})
        headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{digests[name]}"'}
        if request.method == "HEAD":
            return Response(headers=headers | {"Content-Length": str((folder / name).stat().st_size)})
        fetched.append(name)
        return FileResponse(folder / name, headers=headers)

    return Starlette(
        routes=[
            Route(f"/api/models/{repo_id}/revision/{{revision}}", info),
            Route(f"/api/models/{repo_id}/tree/{{revision}}", tree),
            Route(f"/{repo_id}/resolve/{{revision}}/{{path:path}}", resolve, methods=["GET", "HEAD"]),
        ]
    )


@contextlib.contextmanager
def serving(folder: Path, repo_id: str) -> Iterator[tuple[str, list[str]]]:
    """Serve `folder` as `repo_id`; yields (the endpoint for HF_ENDPOINT, the names of the files fetched)."""
    fetched: list[str] = []
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(hub_app(folder, repo_id, fetched), host="127.0.0.1", port=port,
                                           log_level="warning"))  # fmt: skip
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the Hub stand-in did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}", fetched
    finally:
        server.should_exit = True
        thread.join(timeout=10)
