"""The ``swarm site-job`` and ``swarm site-broker`` subcommands.

:func:`add_site_commands` registers them on the ``swarm`` parser; ``swarm``'s
``main`` prints an error of ours as one line and exits with the status its
cause has (``swarm --help``): 2 for a bad option, config key or spec file
(``ConfigError``; a bad spec is a ``JobSpecError``: 1), 6 when the broker
cannot be reached or does not answer in time (``BrokerError``, naming the
URL), 1 for anything else the broker refused (``SiteJobError``).

``submit``, ``status``, ``list`` and ``gather`` read the node configuration
(``--config NODE_TOML``) for its ``[site]`` table (``sitejob/config.py``;
relative paths from the file's directory) and hold one connection to the
broker for the command (no reconnects: a lost broker is an error, not a
wait). ``gather`` is ``sitejob.gather.run_gather``; its exit status is 0
when every range was committed, 1 when some were abandoned.

``site-broker`` runs ``nats-server`` (:class:`sitejob.natsd.NatsServer`) in
the foreground until SIGTERM or SIGINT, with a token file (mode 0600) made
if missing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from runner.exceptions import JobSpecError
from runner.spec import MAX_EVENTS, read_spec_file
from sitejob import control
from sitejob.config import SiteConfig, connect, site_config
from sitejob.exceptions import BrokerError
from sitejob.natsd import NatsServer
from sitejob.protocol import JobRecord
from sitejob.store import PUBLISH_WINDOW
from swarm.address import Address, AddressError
from swarm.exceptions import ConfigError
from swarm.options import check_directory, count_argument, seconds_argument

BIG_JOB = 1024  # ranges from which submit shows its progress
DEFAULT_BROKER = "127.0.0.1:4222"


def load_site(config: Path) -> SiteConfig:
    """The ``[site]`` table of a node configuration file.

    Raises:
        ConfigError: unreadable or invalid file, no ``[site]`` table, or a bad
            ``site.KEY`` (named).
    """
    from swarm.config import load_config

    cfg = load_config(config)
    if not cfg.site:
        raise ConfigError(
            f"{config}: no [site] table: site jobs need the site's broker "
            '(site.nats = "nats://HOST:4222" and site.token_file; docs/SITE_JOBS.md)'
        )
    return site_config(cfg.site, base=config.resolve().parent)


@asynccontextmanager
async def jetstream(site: SiteConfig) -> AsyncIterator[Any]:
    """A JetStream context over one connection for one command (no reconnects).

    Raises:
        ConfigError: the token or credentials cannot be read.
        BrokerError: no server could be reached, or authentication failed.
    """
    nc = await connect(site, name=f"{site.node_name}-cli", reconnect=False)
    try:
        yield nc.jetstream(timeout=site.request_timeout)
    finally:
        await nc.close()


def read_spec(path: Path) -> str:
    """The text of a spec file (checked by :func:`control.plan_job` when submitted).

    Raises:
        JobSpecError: unreadable, larger than ``MAX_SPEC_BYTES`` or not UTF-8
            (field ``"<file>"``).
    """
    raw = read_spec_file(path)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise JobSpecError("<file>", f"{path} is not UTF-8 text") from None


def _progress(total: int) -> Callable[[int], None] | None:
    """Ranges published so far, on stderr, for a big job."""
    if total < BIG_JOB:
        return None
    tty = sys.stderr.isatty()

    def show(done: int) -> None:
        if tty:
            sys.stderr.write(f"\r  published {done}/{total} ranges ")
        elif done == total or done % (BIG_JOB * 16) < PUBLISH_WINDOW:
            sys.stderr.write(f"  published {done}/{total} ranges\n")
        if tty and done == total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    return show


# -- swarm site-job ------------------------------------------------------------------


def cmd_submit(a: argparse.Namespace) -> int:
    site = load_site(a.config)
    text = read_spec(a.spec)
    record = control.plan_job(
        text, events=a.events, ack_wait=a.ack_wait, max_attempts=a.max_attempts
    )  # a bad spec or option is refused before the broker is asked

    async def run() -> JobRecord:
        async with jetstream(site) as js:
            return await control.submit(
                js,
                text,
                events=a.events,
                ack_wait=a.ack_wait,
                max_attempts=a.max_attempts,
                progress=_progress(record.tasks),
            )

    submitted = asyncio.run(run())
    if a.json:
        print(
            json.dumps({"id": submitted.id, "ranges": submitted.tasks, "events": submitted.events})
        )
    else:
        print(submitted.id)
    return 0


def _when(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(seconds)) + "Z"


def render_status(st: dict[str, Any]) -> list[str]:
    """A site job's status (:func:`sitejob.control.status`) as lines for a person."""
    r = st["ranges"]
    name = f" ({st['name']})" if st.get("name") else ""
    lines = [
        f"site job {st['id']}{name}, submitted {_when(st['submitted'])}",
        f"  events     {st['events_committed']} of {st['events_planned']} committed"
        f" (from {st['first_event']}, {st['events_per_task']} per range)",
        f"  ranges     {st['ranges_planned']} planned: "
        + ", ".join(f"{r[k]} {k}" for k in control.RANGE_STATES),
    ]
    nodes = st.get("nodes") or {}
    if isinstance(nodes, dict) and nodes:
        lines.append("  nodes      " + ", ".join(f"{n} {c}" for n, c in sorted(nodes.items())))
    elif nodes:
        lines.append(f"  nodes      {nodes}")
    refused = st.get("refused") or {}
    shown = (
        ", ".join(f"{why}: {n}" for why, n in sorted(refused.items()))
        if isinstance(refused, dict)
        else str(refused)
    )
    lines.append(
        f"  retries    {st['retries']}, duplicates {st['duplicates']}"
        + (f", refused messages: {shown}" if refused else "")
    )
    for item in st.get("abandoned") or []:
        if isinstance(item, dict):
            lines.append(f"  abandoned  range {item.get('task')}: {item.get('reason')}")
    if st.get("status_error"):
        lines.append(f"  warning    {st['status_error']}")
    state = "yes" if st["complete"] else "no"
    if not st.get("streams", True):
        state += " (streams removed; from the gather's report)"
    lines.append(f"  complete   {state}")
    return lines


def cmd_status(a: argparse.Namespace) -> int:
    site = load_site(a.config)

    async def run() -> dict[str, Any]:
        async with jetstream(site) as js:
            return await control.status(js, a.id)

    st = asyncio.run(run())
    print(json.dumps(st, indent=1) if a.json else "\n".join(render_status(st)))
    return 0


def cmd_list(a: argparse.Namespace) -> int:
    site = load_site(a.config)

    async def run() -> list[dict[str, Any]]:
        async with jetstream(site) as js:
            return await control.list_jobs(js)

    jobs = asyncio.run(run())
    if a.json:
        print(json.dumps(jobs, indent=1))
        return 0
    if not jobs:
        print("no site jobs")
    for j in jobs:
        if "error" in j:
            print(f"{j['id']}  unreadable: {j['error']}")
            continue
        done = "complete" if j["complete"] else "open"
        print(
            f"{j['id']}  {j['name'] or '-':20}  {j['events_committed']:>10}/{j['events_planned']}"
            f" events  {j['ranges_planned']:>7} ranges  {done}"
        )
    return 0


def cmd_gather(a: argparse.Namespace) -> int:
    site = load_site(a.config)
    output = check_directory(a.output, "--output")
    from sitejob.gather import run_gather  # its own module, needed only by this command

    tty = sys.stderr.isatty()
    shown = [0.0]

    def progress(info: dict[str, Any]) -> None:
        # A line that rewrites itself on a terminal; one line every 30 s in a log.
        now = time.monotonic()
        if not tty and now - shown[0] < 30:
            return
        shown[0] = now
        ranges = info.get("ranges", {})
        line = (
            f"  {info.get('events_committed', 0)}/{info.get('events_planned', '?')} events"
            f" committed, {ranges.get('retrying', 0)} ranges retrying,"
            f" {ranges.get('abandoned', 0)} abandoned"
        )
        sys.stderr.write(f"\r{line} " if tty else line + "\n")
        sys.stderr.flush()

    report = run_gather(site, a.id, output, progress=progress)
    if tty:
        sys.stderr.write("\n")
    if a.json:
        print(json.dumps(report.to_json(), indent=1))
    else:
        print(
            f"site job {a.id}: "
            + ("complete" if report.complete else f"{len(report.abandoned)} ranges abandoned")
            + f" -> {output}"
        )
    return 0 if report.complete and not report.abandoned else 1


# -- swarm site-broker ---------------------------------------------------------------


def broker_token(path: Path) -> str:
    """The token in ``path``, or a new one written there (mode 0600, never
    over an existing file).

    Raises:
        ConfigError: the file cannot be read or made, or is empty.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _existing_token(path)
    except OSError as exc:
        raise ConfigError(f"--token-file: cannot make {path}: {exc.strerror}") from None
    token = secrets.token_urlsafe(32)
    try:
        os.write(fd, (token + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    return token


def _existing_token(path: Path) -> str:
    try:
        token = path.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"--token-file: cannot read {path}: {exc.strerror}") from None
    if not token or any(c.isspace() for c in token):
        raise ConfigError(f"--token-file: {path} holds no token (one line, no blanks)")
    return token


def cmd_broker(a: argparse.Namespace) -> int:
    directory: Path = check_directory(a.dir, "--dir")
    listen: Address = a.listen
    directory.mkdir(parents=True, exist_ok=True)
    token_file: Path = a.token_file or directory / "nats.token"
    token = broker_token(token_file)
    server = NatsServer(directory, token, host=listen.host, port=listen.port)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    server.start()
    try:
        print(f"site broker {server.url} (token file {token_file}, log {directory}/nats.log)")
        sys.stdout.flush()
        while not stop.is_set():
            if server.proc is not None and server.proc.poll() is not None and not stop.is_set():
                raise BrokerError(
                    f"nats-server exited with {server.proc.returncode}; see {directory}/nats.log"
                )
            stop.wait(0.5)
    finally:
        server.stop()
    return 0


def _broker_listen(text: str) -> Address:
    try:
        return Address.parse(text, default_host="0.0.0.0")
    except AddressError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_site_commands(sub: Any) -> None:
    """Register ``site-job`` (submit, status, list, gather) and ``site-broker``."""
    job = sub.add_parser("site-job", help="site jobs: one job's events over the site's nodes")
    jsub = job.add_subparsers(dest="site_job_command", required=True, metavar="ACTION")

    def config(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--config", required=True, type=Path, help="a node configuration with a [site] table"
        )
        p.add_argument("--json", action="store_true", help="print the answer as JSON")

    s = jsub.add_parser("submit", help="cut a job into event ranges and publish them")
    s.add_argument("spec", type=Path, help="the job spec (TOML, docs/RUNNER.md)")
    config(s)
    s.add_argument(
        "--events",
        type=count_argument(1, MAX_EVENTS),
        help="events to run (default: the spec's max_events)",
    )
    s.add_argument(
        "--ack-wait",
        type=seconds_argument(control.MIN_ACK_WAIT, control.MAX_ACK_WAIT),
        default=control.DEFAULT_ACK_WAIT,
        help="seconds a range may go without a heartbeat before it is redelivered (default 30)",
    )
    s.add_argument(
        "--max-attempts",
        type=count_argument(1, control.MAX_ATTEMPTS),
        default=control.DEFAULT_MAX_ATTEMPTS,
        help="failed runs of one range before it is abandoned (default 3)",
    )
    s.set_defaults(func=cmd_submit)

    s = jsub.add_parser("status", help="events committed, ranges by state, nodes, abandoned")
    s.add_argument("id")
    config(s)
    s.set_defaults(func=cmd_status)

    s = jsub.add_parser("list", help="every site job")
    config(s)
    s.set_defaults(func=cmd_list)

    s = jsub.add_parser("gather", help="commit a job's range outputs into DIR, exactly once")
    s.add_argument("id")
    s.add_argument("--output", required=True, type=Path, help="the gather's directory")
    config(s)
    s.set_defaults(func=cmd_gather)

    s = sub.add_parser("site-broker", help="run the site's NATS server (JetStream, token auth)")
    s.add_argument("--dir", required=True, type=Path, help="its configuration, streams and log")
    s.add_argument(
        "--listen",
        type=_broker_listen,
        default=DEFAULT_BROKER,
        help=f"HOST:PORT (default {DEFAULT_BROKER}; nodes elsewhere need an address they reach)",
    )
    s.add_argument(
        "--token-file", type=Path, help="the site's token (default DIR/nats.token; made if missing)"
    )
    s.set_defaults(func=cmd_broker)
