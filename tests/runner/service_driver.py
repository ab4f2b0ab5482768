"""A job service with its HTTP routes as a process of its own, wired as the node daemon
wires it (``job_service_from_config`` + ``add_job_routes``), so tests can watch its
memory, SIGKILL it and start it again.

    service_driver.py DATA_DIR RUNNER_TABLE_JSON

Listens on 127.0.0.1 (a free port, written to ``DATA_DIR/port`` once it
answers); the token is ``s3cret``. SIGTERM stops the service (running tasks
are cut at once) and exits.
"""

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

from aiohttp import web

from runner.api import add_job_routes
from runner.service import job_service_from_config

TOKEN = "s3cret"


def require_token(request: web.Request) -> None:
    if request.headers.get("Authorization") != f"Bearer {TOKEN}":
        raise web.HTTPUnauthorized(
            text='{"error": "this route needs the token"}', content_type="application/json"
        )


async def main(data_dir: Path, table: dict[str, object]) -> None:
    service = job_service_from_config(table, data_dir, environ={})
    app = web.Application()
    add_job_routes(app, service, require_token)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    service.start()
    tmp = data_dir / ".port.tmp"
    tmp.write_text(f"{port}\n")
    os.replace(tmp, data_dir / "port")
    done = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, done.set)
    await done.wait()
    await asyncio.to_thread(service.close)
    await runner.cleanup()


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]), json.loads(sys.argv[2])))
