"""The ``swarm vm`` subcommands: start, list, status, stop, migrate, through the nodes' APIs.

::

    swarm vm start IMAGE --config NODE_TOML [--cores N] [--memory SIZE]
                   [--lifetime S] [--user-data FILE] [--json]
    swarm vm list --config NODE_TOML [--json]
    swarm vm status ID --config NODE_TOML [--json]
    swarm vm stop ID --config NODE_TOML [--grace S] [--json]
    swarm vm migrate ID --config NODE_TOML --to OTHER_NODE_TOML [--json]

The node is found as ``swarm status`` finds it (``DATA_DIR/node.json``, else
the configured ``api`` address); changing commands send the token of
``api_token_file`` (default ``DATA_DIR/api.token``). Every request has a
deadline. Errors are one line: a bad option or value exits 2, a VM the node
refuses (the site policy's reason, an unknown image, no cores, backed off)
exits 1, a node that cannot be reached exits 6.

``migrate`` reads both nodes' configurations (API and token of each): it
asks the source for the destination's request (``POST /v1/vms/ID/migration``:
the VM, its user_data, the source's public key for this migration; refused
at once if qemu blocks the migration, a guest with the 9p software mount
mounted), asks the destination to wait for the VM with it (``POST
/v1/vms/incoming``: qemu with a TLS-only NBD export of an empty overlay over
its own copy of the signed base image, behind relays that admit only the
migration's key holder; it answers with its own public key), then the source
to send it (``POST /v1/vms/ID/migrate`` with that key: the overlay mirrored,
then the memory, both over TLS with the key both sides derived). If the
source fails, the waiting destination is told to give up (``POST
/v1/vms/ID/stop``) and the error is the source's, in one line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from runner.sizes import size_argument
from swarm.exceptions import ConfigError, FetchError
from swarm.options import count_argument, seconds_argument
from swarm.status import VmReport, render_vm
from vm.config import MAX_GRACE, MAX_LIFETIME, MAX_USER_DATA, parse_image_name
from vm.exceptions import VmConfigError, VmError

REQUEST_DEADLINE = 30.0  # seconds; a start may first probe KVM and build an overlay


def _node(config: Path) -> tuple[str, Path]:
    """The node API's base URL and its token file.

    Raises:
        ConfigError: the configuration cannot be read.
    """
    from swarm.config import load_config

    cfg = load_config(config)
    try:
        base = str(json.loads((cfg.data_dir / "node.json").read_text())["api"])
    except (OSError, ValueError, KeyError):
        host = "127.0.0.1" if cfg.api.host in ("0.0.0.0", "::") else cfg.api.host
        base = f"http://{host}:{cfg.api.port}/"
    return base.rstrip("/") + "/", cfg.token_path


def call(
    config: Path, method: str, path: str, body: Any = None, *, deadline: float = REQUEST_DEADLINE
) -> Any:
    """One request to the node's API; the JSON answer.

    Raises:
        ConfigError: the config or the token cannot be read.
        FetchError: the node cannot be reached or did not answer in time.
        VmError: the node answered with an error (its message).
    """
    base, token_path = _node(config)
    headers = {"Content-Type": "application/json"}
    if method == "POST":
        try:
            headers["Authorization"] = "Bearer " + token_path.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"api_token_file: cannot read {token_path}: {exc.strerror}") from None
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=deadline) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read())["error"]
        except (ValueError, KeyError, TypeError):
            message = f"HTTP {exc.code}"
        if exc.code == 400:
            raise VmConfigError(message) from None
        if exc.code == 404 and not path.startswith("v1/vms/"):
            message = f"the node at {base} has no VM service ([vm] enabled = false)"
        raise VmError(message) from None
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        why = getattr(exc, "reason", exc)
        raise FetchError(f"node API {base} unreachable: {why}") from None
    except ValueError as exc:
        raise FetchError(f"node API {base}: not JSON: {exc}") from None


def _show(doc: Any, as_json: bool) -> None:
    if as_json:
        print(json.dumps(doc, indent=2))
    elif isinstance(doc, list):
        for v in doc:
            print(render_vm(VmReport(**v)))
    else:
        print(render_vm(VmReport(**doc)))


def cmd_start(a: argparse.Namespace) -> int:
    body: dict[str, Any] = {"image": str(parse_image_name(a.image))}
    if a.cores is not None:
        body["cores"] = a.cores
    if a.memory is not None:
        body["memory"] = a.memory
    if a.lifetime is not None:
        body["lifetime"] = a.lifetime
    if a.user_data is not None:
        try:
            data = a.user_data.read_bytes()
        except OSError as exc:
            raise VmConfigError(f"--user-data: cannot read {a.user_data}: {exc.strerror}") from None
        if len(data) > MAX_USER_DATA:
            raise VmConfigError(f"--user-data: {len(data)} bytes (at most {MAX_USER_DATA})")
        try:
            body["user_data"] = data.decode()
        except UnicodeDecodeError:
            raise VmConfigError(f"--user-data: {a.user_data} is not text") from None
    _show(call(a.config, "POST", "v1/vms", body), a.json)
    return 0


def cmd_list(a: argparse.Namespace) -> int:
    _show(call(a.config, "GET", "v1/vms"), a.json)
    return 0


def cmd_status(a: argparse.Namespace) -> int:
    _show(call(a.config, "GET", f"v1/vms/{a.id}"), a.json)
    return 0


def cmd_stop(a: argparse.Namespace) -> int:
    body = {} if a.grace is None else {"grace": a.grace}
    grace = MAX_GRACE if a.grace is None else a.grace
    started = time.monotonic()
    doc = call(a.config, "POST", f"v1/vms/{a.id}/stop", body, deadline=grace + 60)
    if not a.json:
        print(f"stopped after {time.monotonic() - started:.1f} s")
    _show(doc, a.json)
    return 0


MIGRATE_DEADLINE = 700.0  # the source's mirror and memory deadlines, and some


def cmd_migrate(a: argparse.Namespace) -> int:
    """Ask the destination to wait for the VM, then the source to send it."""
    from urllib.parse import urlsplit

    source, _ = _node(a.config)
    dest, _ = _node(a.to)
    # The source makes the destination's request: the VM, its user_data and its
    # public key for this migration (no secret crosses the API; token both ways).
    incoming = call(a.config, "POST", f"v1/vms/{a.id}/migration", {})
    incoming["source"] = source
    waiting = call(a.to, "POST", "v1/vms/incoming", incoming, deadline=120)
    host = waiting["host"]
    if host in ("0.0.0.0", "::", ""):  # it listens everywhere: reach it as its API is reached
        host = urlsplit(dest).hostname or "127.0.0.1"
    target = {
        "host": host,
        "nbd_port": waiting["nbd_port"],
        "migrate_port": waiting["migrate_port"],
        "to": dest,
        "key": waiting["key"],
    }
    started = time.monotonic()
    try:
        moved = call(a.config, "POST", f"v1/vms/{a.id}/migrate", target, deadline=MIGRATE_DEADLINE)
    except (VmError, FetchError):
        # the VM runs on at the source: the destination stops waiting for it
        with contextlib.suppress(VmError, FetchError, ConfigError):
            call(a.to, "POST", f"v1/vms/{a.id}/stop", {"grace": 0})
        raise
    if a.json:
        print(json.dumps(moved, indent=2))
        return 0
    pause = moved.get("migration_downtime_ms")
    print(
        f"vm {a.id} migrated to {dest} in {time.monotonic() - started:.1f} s"
        + (f" (guest paused {pause} ms)" if pause is not None else "")
    )
    return 0


def add_vm_commands(sub: Any) -> None:
    """Register ``swarm vm`` on the ``swarm`` parser's subcommands."""
    p = sub.add_parser("vm", help="VMs on this node: start, list, status, stop (docs/VMS.md)")
    vsub = p.add_subparsers(dest="vm_command", required=True)

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("--config", type=Path, required=True, help="the node's configuration")
        q.add_argument("--json", action="store_true", help="the node's JSON answer")

    s = vsub.add_parser("start", help="start a VM from a signed image in the node's mount")
    s.add_argument("image", metavar="IMAGE", help="REPO/NAME/VERSION")
    common(s)
    s.add_argument("--cores", type=count_argument(1, 4096), help="default: [vm] cores")
    s.add_argument("--memory", type=size_argument, help='e.g. "256M"; default: [vm] memory')
    s.add_argument(
        "--lifetime",
        type=seconds_argument(minimum=1.0, maximum=MAX_LIFETIME),
        help="seconds (capped at the lease's end)",
    )
    s.add_argument("--user-data", type=Path, help="a script the guest runs (its payload)")
    s.set_defaults(func=cmd_start)
    s = vsub.add_parser("list", help="the node's VMs")
    common(s)
    s.set_defaults(func=cmd_list)
    s = vsub.add_parser("status", help="one VM: state, accelerator, outcome")
    s.add_argument("id", metavar="ID")
    common(s)
    s.set_defaults(func=cmd_status)
    s = vsub.add_parser("stop", help="stop a VM: STOP + power button, grace, quit, kill")
    s.add_argument("id", metavar="ID")
    common(s)
    s.add_argument(
        "--grace",
        type=seconds_argument(minimum=0.0, maximum=MAX_GRACE),
        help="seconds before it is ended (default: [vm] grace)",
    )
    s.set_defaults(func=cmd_stop)
    s = vsub.add_parser("migrate", help="move a running VM to another node (live migration)")
    s.add_argument("id", metavar="ID")
    common(s)
    s.add_argument("--to", type=Path, required=True, help="the destination node's configuration")
    s.set_defaults(func=cmd_migrate)
