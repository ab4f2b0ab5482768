"""``swarm job submit|list|status``: the node's job queue through its API (docs/RUNNER.md).

::

    swarm job submit SPEC --config NODE_TOML [--json]
    swarm job list --config NODE_TOML [--json]
    swarm job status ID --config NODE_TOML [--json]

A spec is an elastic job or, with a ``[vm]`` table, a VM job; the node's
masonry thread runs both. The node is found as ``swarm vm`` finds it
(``DATA_DIR/node.json``, else the configured ``api`` address); ``submit``
sends the token of ``api_token_file``. Every request has a deadline. Errors
are one line: a spec the node refuses exits 2 (the field named), an unknown
job 1, a node that cannot be reached 6.
"""

from __future__ import annotations

import argparse
import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from runner.exceptions import JobSpecError, UnknownJob
from runner.spec import read_spec_file
from swarm.exceptions import ConfigError, FetchError

REQUEST_DEADLINE = 30.0


def _call(config: Path, method: str, path: str, body: bytes | None = None) -> Any:
    """One request to the node's job API; the JSON answer.

    Raises:
        ConfigError: the config or the token cannot be read, or the node
            refused the spec (its one-line reason).
        UnknownJob: no such job.
        FetchError: the node cannot be reached or did not answer in time.
    """
    from vm.cli import _node  # the one reader of a node's API address and token file

    base, token_path = _node(config)
    headers = {"Content-Type": "application/toml"}
    if method == "POST":
        try:
            headers["Authorization"] = "Bearer " + token_path.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"api_token_file: cannot read {token_path}: {exc.strerror}") from None
    req = urllib.request.Request(base + path, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=REQUEST_DEADLINE) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as exc:
        try:
            message = str(json.loads(exc.read())["error"])
        except (ValueError, KeyError, TypeError):
            message = f"HTTP {exc.code}"
        if exc.code == 404:
            raise UnknownJob(message) from None
        raise ConfigError(f"node API {base}: {message}") from None
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        raise FetchError(f"node API {base} unreachable: {getattr(exc, 'reason', exc)}") from None
    except ValueError as exc:
        raise FetchError(f"node API {base}: not JSON: {exc}") from None


def render_job(job: dict[str, Any]) -> str:
    """One job on one line."""
    kind = job.get("kind") or "elastic"
    line = f"job {job['id']} {job.get('name') or '-'} ({kind}): {job['state']}"
    if job.get("vm"):
        line += f", vm {job['vm']}"
    if job.get("started_at") and job["state"] == "running":
        line += f", since {time.strftime('%H:%M:%S', time.localtime(job['started_at']))}"
    if job.get("refused"):
        line += f"; not started: {job['refused']}"
    if job.get("reason"):
        line += f"; rejected: {job['reason']}"
    report = job.get("report") or {}
    if kind == "vm" and report:
        out = report.get("outcome") or {}
        code = out.get("code")
        line += f", vm {report.get('vm')}; outcome: {code if code is not None else '-'}"
        line += f" {out.get('outcome') or out.get('error') or ''}".rstrip()
    elif report:
        line += f"; {report.get('events_done', 0)} events"
        line += ", complete" if report.get("complete") else ", incomplete"
    return line


def _show(doc: Any, as_json: bool) -> None:
    if as_json:
        print(json.dumps(doc, indent=2))
    elif isinstance(doc, list):
        for job in doc:
            print(render_job(job))
    else:
        print(render_job(doc))


def cmd_submit(a: argparse.Namespace) -> int:
    try:
        raw = read_spec_file(a.spec)
    except JobSpecError as exc:
        raise ConfigError(str(exc)) from None
    _show(_call(a.config, "POST", "v1/jobs", raw), a.json)
    return 0


def cmd_list(a: argparse.Namespace) -> int:
    _show(_call(a.config, "GET", "v1/jobs"), a.json)
    return 0


def cmd_status(a: argparse.Namespace) -> int:
    _show(_call(a.config, "GET", f"v1/jobs/{a.id}"), a.json)
    return 0


def add_job_client_commands(jsub: Any) -> None:
    """Register ``submit``, ``list``, ``status`` on ``swarm job``'s subcommands."""

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("--config", type=Path, required=True, help="the node's configuration")
        q.add_argument("--json", action="store_true", help="the node's JSON answer")

    s = jsub.add_parser("submit", help="queue a job on a node (elastic, or a VM: [vm] table)")
    s.add_argument("spec", type=Path)
    common(s)
    s.set_defaults(func=cmd_submit)
    s = jsub.add_parser("list", help="a node's jobs: queued, running, done, rejected")
    common(s)
    s.set_defaults(func=cmd_list)
    s = jsub.add_parser("status", help="one job of a node (a VM job: its VM and outcome)")
    s.add_argument("id", metavar="ID")
    common(s)
    s.set_defaults(func=cmd_status)
