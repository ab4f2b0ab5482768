"""The node daemon's configuration file (TOML), parsed strictly.

Every key is documented in ``docs/NODE.md``.  Parsing is pure (text in,
:class:`NodeConfig` out); a bad file raises :class:`ConfigError` naming the
key and what was wrong, and unknown keys are errors too, so a typo never
silently falls back to a default.
"""

from __future__ import annotations

import ipaddress
import json
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runner.sizes import SizeError, parse_size
from swarm.exceptions import ConfigError
from swarm.options import ValueRangeError, parse_seconds

_REPO_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
POLICIES = ("on-demand", "prefetch")


@dataclass(frozen=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_address(text: object, key: str, *, default_host: str = "0.0.0.0") -> Address:
    """``HOST:PORT`` (IPv4, ``[IPv6]`` or a name) -> :class:`Address`.

    Raises:
        ConfigError: not a string of that shape, or the port is out of range.
    """
    if not isinstance(text, str):
        raise ConfigError(f'{key}: expected "HOST:PORT", got {text!r}')
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(f"{key}: bad address {text!r}: use HOST:PORT, e.g. 10.1.0.1:6881")
    host = host.strip("[]") or default_host
    return Address(host, int(port))


@dataclass(frozen=True)
class RepositoryConfig:
    name: str
    origin: str | None  # base URL of the store; may be unreachable
    trust: Path  # the repository's root.json, installed out of band
    policy: str = "on-demand"  # or "prefetch"
    images: bool = True  # follow this repository's VM images too
    cache_quota: int = 10 << 30
    tag: str | None = None


@dataclass(frozen=True)
class NodeConfig:
    data_dir: Path
    listen: Address
    api: Address
    peer: Address  # the peer exchange (TUF metadata, .torrent files); one port per site
    bootstrap: tuple[Address, ...]
    mount: Path | None
    repositories: dict[str, RepositoryConfig]
    dht: bool = True
    lsd: bool = False
    refresh_interval: float = 60.0
    fetch_timeout: float = 30.0
    api_token_file: Path | None = None
    image_policy: dict[str, Any] = field(default_factory=dict)
    runner: dict[str, Any] = field(default_factory=dict)
    tuning: dict[str, Any] = field(default_factory=dict)  # libtorrent session knobs

    @property
    def token_path(self) -> Path:
        return self.api_token_file or self.data_dir / "api.token"

    def repo_dir(self, name: str) -> Path:
        return self.data_dir / "repos" / name


_TOP_KEYS = {
    "data_dir",
    "listen",
    "api",
    "peer",
    "bootstrap",
    "mount",
    "dht",
    "lsd",
    "refresh_interval",
    "fetch_timeout",
    "api_token_file",
    "repositories",
    "image_policy",
    "runner",
    "tuning",
}
_REPO_KEYS = {"origin", "trust", "policy", "images", "cache_quota", "tag"}


def _typed(value: object, kind: type, key: str) -> Any:
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {kind.__name__}, got {value!r}")
    return value


def _size(value: object, key: str) -> int:
    try:
        return parse_size(value)
    except SizeError as exc:
        raise ConfigError(f"{key}: {exc}") from None


def _seconds(value: object, key: str) -> float:
    if isinstance(value, str):  # TOML has numbers: "30" is a typo for 30
        raise ConfigError(f"{key}: expected a number of seconds, got {value!r}")
    try:
        return parse_seconds(value)
    except ValueRangeError as exc:
        raise ConfigError(f"{key}: {exc}") from None


def _path(value: object, key: str, base: Path) -> Path:
    text = _typed(value, str, key)
    if not text:
        raise ConfigError(f"{key}: empty path")
    p = Path(text)
    return p if p.is_absolute() else (base / p)


def parse_origin(value: object, key: str) -> str:
    """An origin's base URL (``http(s)://HOST[...]``), ending in ``/``.

    Raises:
        ConfigError: naming ``key``: not an http(s) URL.
    """
    url: str = _typed(value, str, key)
    if not re.match(r"^https?://[^/\s]+", url):
        raise ConfigError(f"{key}: expected an http(s) URL, got {url!r}")
    return url.rstrip("/") + "/"


def parse_config(text: str, *, base: Path = Path("/"), source: str = "config") -> NodeConfig:
    """Parse the TOML text of a node configuration.

    Relative paths are taken relative to ``base`` (the file's directory).

    Raises:
        ConfigError: invalid TOML, unknown keys, bad values; the message names
            the key.
    """
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    unknown = set(raw) - _TOP_KEYS
    if unknown:
        known = ", ".join(sorted(_TOP_KEYS))
        raise ConfigError(f"{source}: unknown key(s) {', '.join(sorted(unknown))} (known: {known})")
    data_dir = _path(raw.get("data_dir", "/var/lib/swarm"), "data_dir", base)
    listen = parse_address(raw.get("listen", "0.0.0.0:6881"), "listen")
    api = parse_address(raw.get("api", "127.0.0.1:7000"), "api", default_host="127.0.0.1")
    peer = parse_address(raw.get("peer", f"{listen.host}:6880"), "peer")
    boot_raw = raw.get("bootstrap", [])
    if not isinstance(boot_raw, list):
        raise ConfigError(f'bootstrap: expected a list of "HOST:PORT", got {boot_raw!r}')
    bootstrap = tuple(parse_address(b, f"bootstrap[{i}]") for i, b in enumerate(boot_raw))
    for i, b in enumerate(bootstrap):
        try:
            if ipaddress.ip_address(b.host).is_unspecified:
                raise ConfigError(f"bootstrap[{i}]: {b} is not a peer's address")
        except ValueError:
            pass  # a host name
    mount = _path(raw["mount"], "mount", base) if "mount" in raw else None
    repos_raw = raw.get("repositories", {})
    if not isinstance(repos_raw, dict):
        raise ConfigError('repositories: expected tables [repositories."NAME"]')
    repos: dict[str, RepositoryConfig] = {}
    for name, r in repos_raw.items():
        key = f'repositories."{name}"'
        if not _REPO_NAME.match(name) or ".." in name:
            raise ConfigError(f"{key}: bad repository name (letters, digits, '.', '_', '-')")
        if not isinstance(r, dict):
            raise ConfigError(f"{key}: expected a table")
        unknown = set(r) - _REPO_KEYS
        if unknown:
            raise ConfigError(f"{key}: unknown key(s) {', '.join(sorted(unknown))}")
        if "trust" not in r:
            raise ConfigError(f"{key}.trust: missing (the repository's root.json)")
        policy = _typed(r.get("policy", "on-demand"), str, f"{key}.policy")
        if policy not in POLICIES:
            raise ConfigError(f"{key}.policy: {policy!r} is not one of {', '.join(POLICIES)}")
        repos[name] = RepositoryConfig(
            name=name,
            origin=parse_origin(r["origin"], f"{key}.origin") if "origin" in r else None,
            trust=_path(r["trust"], f"{key}.trust", base),
            policy=policy,
            images=_typed(r.get("images", True), bool, f"{key}.images"),
            cache_quota=_size(r.get("cache_quota", "10G"), f"{key}.cache_quota"),
            tag=_typed(r["tag"], str, f"{key}.tag") if "tag" in r else None,
        )
    image_policy = raw.get("image_policy", {})
    if not isinstance(image_policy, dict):
        raise ConfigError("image_policy: expected a table")
    runner = raw.get("runner", {})
    if not isinstance(runner, dict):
        raise ConfigError("runner: expected a table")
    tuning = raw.get("tuning", {})
    if not isinstance(tuning, dict):
        raise ConfigError("tuning: expected a table")
    refresh = _seconds(raw.get("refresh_interval", 60.0), "refresh_interval")
    fetch_timeout = _seconds(raw.get("fetch_timeout", 30.0), "fetch_timeout")
    token_file = raw.get("api_token_file")
    return NodeConfig(
        data_dir=data_dir,
        listen=listen,
        api=api,
        peer=peer,
        bootstrap=bootstrap,
        mount=mount,
        repositories=repos,
        dht=_typed(raw.get("dht", True), bool, "dht"),
        lsd=_typed(raw.get("lsd", False), bool, "lsd"),
        refresh_interval=refresh,
        fetch_timeout=fetch_timeout,
        api_token_file=None if token_file is None else _path(token_file, "api_token_file", base),
        image_policy=image_policy,
        runner=runner,
        tuning=tuning,
    )


def load_config(path: Path) -> NodeConfig:
    """Read and parse a configuration file.

    Raises:
        ConfigError: unreadable file or invalid content.
    """
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    return parse_config(text, base=path.resolve().parent, source=str(path))


def _toml_value(value: object, key: str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value))  # a TOML basic string
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v, key) for v in value) + "]"
    raise ConfigError(f"{key}: cannot write {value!r} to a config file")


def render_config(
    settings: dict[str, object],
    repositories: dict[str, dict[str, object]],
    *,
    tuning: dict[str, object] | None = None,
) -> str:
    """The TOML text of a node configuration (what :func:`parse_config` reads).

    Raises:
        ConfigError: a value that has no TOML form here.
    """
    lines = [f"{k} = {_toml_value(v, k)}" for k, v in settings.items()]
    for name, table in repositories.items():
        lines.append(f'\n[repositories."{name}"]')
        lines += [f"{k} = {_toml_value(v, k)}" for k, v in table.items()]
    if tuning:
        lines.append("\n[tuning]")
        lines += [f"{k} = {_toml_value(v, k)}" for k, v in tuning.items()]
    return "\n".join(lines) + "\n"
