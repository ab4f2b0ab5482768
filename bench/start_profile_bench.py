"""Cold import from an origin with a start profile vs without one.

``python -m bench.start_profile_bench [--latency-ms 10] [--reps 3]`` (also the
``profile`` section of ``python -m bench.run``, on the run's store).

The pip-installed numpy+scipy+rich tree (:func:`bench.datasets.python_tree`)
is published and served by the project's origin app (``swarm.origin``) in
this process on a loopback port, each answer delayed by ``--latency-ms``
(default 10 ms: a loopback origin answers in well under a millisecond, a
site's origin or proxy is some milliseconds of round trip away; the delay is
an ``asyncio.sleep`` before each answer, so it costs the server nothing and
concurrent requests overlap as they would over a real link).

1. Recording: one mount with a fresh cache runs the import once; at unmount
   the mount writes the revision's start profile (``CACHE/profiles/``).
2. Then, ``--reps`` times each, alternating: a fresh, empty cache directory
   (nothing cached, not even the metadata), mounted ``--no-start-profile``,
   and a fresh cache directory holding only the recorded profile (a node whose
   cache was wiped, or one given the profile), mounted with profiles on; the
   import is timed from the moment the mount is ready.  The page cache is not
   dropped: both runs read every object from the origin into new files, and
   the interpreter's own standard library is hot alike.

Row: median wall seconds with the profile / without (goal <= 0.5x, i.e. at
least twice as fast with it), with the objects the prefetch fetched.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from bench.datasets import IMPORT_STMT, python_tree
from bench.report import Row
from bench.util import VENV_BIN, BenchError, Resources, median, rm_tree, run, say, timed
from swarm.origin import make_app

PY_REPO = "py.bench.local"


class LatencyOrigin:
    """The origin app over ``store`` on 127.0.0.1, each answer ``latency`` s late."""

    def __init__(self, store: Path, latency: float) -> None:
        self.store = store
        self.latency = latency
        self.requests = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None
        self.url = ""

    def __enter__(self) -> LatencyOrigin:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(30)
        return self

    async def _start(self) -> None:
        app = make_app(self.store)

        @web.middleware
        async def late(
            request: web.Request,
            handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
        ) -> web.StreamResponse:
            self.requests += 1
            await asyncio.sleep(self.latency)
            return await handler(request)

        app.middlewares.append(late)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert isinstance(server, asyncio.Server)
        self.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/"

    def __exit__(self, *exc: object) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)
        self._loop.close()


def _timed_import(d: Path) -> float:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(d), "PYTHONDONTWRITEBYTECODE": "1"}
    return timed([sys.executable, "-c", IMPORT_STMT], env=env)


def _profile_status(mp: Path) -> dict[str, Any]:
    out = run([VENV_BIN / "swarm", "status", mp, "--json"])
    doc: dict[str, Any] = json.loads(out)["start_profile"]
    return doc


def measure(
    store: Path, trust: Path, work: Path, *, reps: int, latency: float, res: Resources
) -> dict[str, Any]:
    """Record a profile, then time cold imports without and with it (module
    docstring).  Returns the samples and what the prefetches did."""
    rm_tree(work)
    work.mkdir(parents=True)
    mnt = work / "mnt"
    with LatencyOrigin(store, latency) as origin:
        say(f"start profile: origin at {origin.url}, +{latency * 1000:g} ms per answer")

        def mount(cache: Path, *extra: str) -> None:
            res.swarm_mount(PY_REPO, mnt, origin.url, trust, cache, extra=extra)

        recorded = work / "cache-record"
        mount(recorded)
        first = _timed_import(mnt)
        res.unmount(mnt, recorded)
        profiles = recorded / "profiles"
        found = list(profiles.glob("*.json")) if profiles.is_dir() else []
        if not found:
            raise BenchError(f"no start profile was recorded in {profiles}")
        entries = len(json.loads(found[0].read_bytes())["entries"])
        say(f"  recording run: {first:.2f} s; profile of {entries} entries")
        without: list[float] = []
        with_: list[float] = []
        prefetch: list[dict[str, Any]] = []
        for i in range(reps):
            cache = work / f"cache-none-{i}"
            mount(cache, "--no-start-profile")
            without.append(_timed_import(mnt))
            res.unmount(mnt, cache)
            cache = work / f"cache-profile-{i}"
            shutil.copytree(profiles, cache / "profiles")
            mount(cache)
            with_.append(_timed_import(mnt))
            prefetch.append(_profile_status(mnt))
            res.unmount(mnt, cache)
            say(f"  rep {i}: without {without[-1]:.2f} s, with {with_[-1]:.2f} s; {prefetch[-1]}")
            rm_tree(work / f"cache-none-{i}")
            rm_tree(cache)
    return {
        "latency_s": latency,
        "recording_s": first,
        "entries": entries,
        "without_s": without,
        "with_s": with_,
        "prefetch": prefetch,
    }


def rows_of(result: dict[str, Any]) -> list[Row]:
    ms = result["latency_s"] * 1000
    fetched = [p.get("fetched", 0) for p in result["prefetch"]]
    return [
        Row(
            f"import, cold from an origin (+{ms:g} ms per answer), start profile vs none",
            "s",
            median(result["with_s"]),
            "no start profile",
            median(result["without_s"]),
            ("<=", 0.5),
            note=f"profile of {result['entries']} entries; prefetch fetched {fetched} objects",
        )
    ]


def start_profile_section(b: Any) -> None:
    """The ``profile`` section of ``python -m bench.run`` (a ReleaseBench)."""
    say("== 5. cold import with a start profile vs without")
    result = measure(
        b.store,
        b.trust(PY_REPO),
        b.run_dir / "profile",
        reps=b.reps,
        latency=b.args.profile_latency_ms / 1000,
        res=b.res,
    )
    b.record("import_cold_origin_without_profile_s", result["without_s"])
    b.record("import_cold_origin_with_profile_s", result["with_s"])
    b.samples["start_profile"] = result
    b.rows.extend(rows_of(result))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.start_profile_bench", description=__doc__)
    p.add_argument("--latency-ms", type=float, default=10.0)
    p.add_argument("--reps", type=int, default=3)
    a = p.parse_args(argv)
    from bench.release_bench import WORK

    work = WORK / "profile-run"
    res = Resources()
    try:
        pytree = python_tree(WORK / "pytree")
        rm_tree(work)
        work.mkdir(parents=True)
        keys = work / "keys"
        run([VENV_BIN / "swarm", "keys", "init", keys, "--repo", PY_REPO])
        store = work / "store"
        t0 = time.perf_counter()
        run([VENV_BIN / "swarm", "publish", pytree, "--repo", PY_REPO, "--keys", keys,
             "--store", store, "--quiet"])  # fmt: skip
        say(f"published {pytree} in {time.perf_counter() - t0:.1f} s")
        result = measure(
            store, keys / "root.json", work / "run", reps=a.reps, latency=a.latency_ms / 1000,
            res=res,
        )  # fmt: skip
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    finally:
        res.close()
    for row in rows_of(result):
        print(
            f"{row.name}: {row.ours:.2f} s vs {row.baseline:.2f} s"
            f" = {row.ratio:.2f}x (goal {row.goal_text()}); {row.note}"
        )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
