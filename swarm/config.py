"""The node daemon's configuration file (TOML), parsed strictly.

Every key is documented in ``docs/NODE.md``.  Parsing is pure (text in,
:class:`NodeConfig` out): the TOML is decoded into the schema below
(``msgspec`` structs, unknown keys refused) whose value types are checked by
their one owner each (sizes: ``runner/sizes.py``; durations:
``swarm/options.py``; addresses: ``swarm/address.py``; repository names:
``trust/names.py``).  A bad file raises one :class:`ConfigError` naming the
key's path and what it accepts, e.g.
``repositories."sw.example.org".cache_quota: expected a positive size in
bytes, e.g. 4096, "512M", "10G", got 'lots'``, so a typo never silently
falls back to a default.  :func:`render_config` is the inverse (``tomli-w``).

The ``[image_policy]``, ``[runner]``, ``[tuning]``, ``[site]`` and ``[vm]``
tables are passed as they are to their owners' own validation
(``trust/policy.py``, ``runner/service.py``, ``swarm/node.py``,
``sitejob/config.py``, ``vm/config.py``), which name the table too.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import tomli_w

from runner.sizes import parse_size
from swarm.address import Address, AddressError
from swarm.exceptions import ConfigError
from swarm.options import ValueRangeError, parse_seconds
from trust.names import repo_name_problem

POLICIES = ("on-demand", "prefetch")
_T = TypeVar("_T")


@dataclass(frozen=True)
class RepositoryConfig:
    name: str
    origin: str | None  # base URL of the store; may be unreachable
    trust: Path  # the repository's root.json, installed out of band
    policy: str = "on-demand"  # or "prefetch"
    images: bool = True  # follow this repository's VM images too
    cache_quota: int = 10 << 30
    tag: str | None = None
    start_profile: bool = True  # record / prefetch start profiles (cvmfs_like.start_profile)


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
    site: dict[str, Any] = field(default_factory=dict)  # the site event service (sitejob)
    vm: dict[str, Any] = field(default_factory=dict)  # VMs on demand (vm/config.py)

    @property
    def token_path(self) -> Path:
        return self.api_token_file or self.data_dir / "api.token"

    def repo_dir(self, name: str) -> Path:
        return self.data_dir / "repos" / name


# -- the schema: value types, each checked by its owner ---------------------------


class _ListenAddress(Address):
    """``listen``, ``peer``: port 0 is any free port; no host is every interface."""


class _ApiAddress(Address):
    """``api``: port 0 is any free port; no host is the loopback address."""


class _PeerAddress(Address):
    """``bootstrap``: a peer to connect to, so a real port and a real host."""


class _Size(int):
    """A size (``runner/sizes.py``)."""


class _Seconds(float):
    """A duration (``swarm/options.py``); TOML has numbers, so no strings."""


class _Origin(str):
    """An origin's base URL, ``http(s)://HOST[...]``, ending in ``/``."""

    __slots__ = ()


class _Policy(str):
    """One of :data:`POLICIES`."""

    __slots__ = ()


_ADDRESSES: dict[type[Address], dict[str, Any]] = {
    _ListenAddress: {"default_host": "0.0.0.0", "any_port": True},
    _ApiAddress: {"default_host": "127.0.0.1", "any_port": True},
    _PeerAddress: {},
}
_ORIGIN = re.compile(r"^https?://[^/\s]+")


def _origin_url(value: object) -> str:
    """Raises: ValueError: not an http(s) URL (the message says so)."""
    if not isinstance(value, str) or not _ORIGIN.match(value):
        raise ValueError(f"expected an http(s) URL, got {value!r}")
    return value.rstrip("/") + "/"


def _decode_hook(base: Path) -> Callable[[type, Any], Any]:
    """msgspec's ``dec_hook``: each schema value type from its TOML value.
    A ``ValueError`` here becomes a ``ValidationError`` at the value's path."""

    def decode(kind: type, value: Any) -> Any:
        if kind is Path:
            if not isinstance(value, str):
                raise ValueError(f"expected a path (a string), got {value!r}")
            if not value:
                raise ValueError("expected a path, got an empty string")
            path = Path(value)
            return path if path.is_absolute() else base / path
        if issubclass(kind, Address):
            address = kind.parse(value, **_ADDRESSES[kind])
            if kind is _PeerAddress and address.is_unspecified:
                raise AddressError(f"{address} is not a peer's address")
            return address
        if kind is _Size:
            return _Size(parse_size(value))
        if kind is _Seconds:
            if isinstance(value, str):  # "30" is a typo for 30
                raise ValueRangeError(f"expected a number of seconds, got {value!r}")
            return _Seconds(parse_seconds(value))
        if kind is _Origin:
            return _Origin(_origin_url(value))
        if kind is _Policy:
            if value not in POLICIES:
                raise ValueError(f"expected one of {', '.join(POLICIES)}, got {value!r}")
            return _Policy(value)
        raise NotImplementedError(kind)

    return decode


class _RepositoryTable(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``[repositories."NAME"]``."""

    trust: Path  # required: the repository's root.json, installed out of band
    origin: _Origin | None = None
    policy: _Policy = _Policy("on-demand")
    images: bool = True
    cache_quota: _Size = _Size(10 << 30)
    tag: str | None = None
    start_profile: bool = True


class _NodeTable(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The file's top level; defaults as in ``docs/NODE.md``."""

    data_dir: Path = Path("/var/lib/swarm")
    listen: _ListenAddress = _ListenAddress("0.0.0.0", 6881)
    api: _ApiAddress = _ApiAddress("127.0.0.1", 7000)
    peer: _ListenAddress | None = None  # default: the listen host, port 6880
    bootstrap: list[_PeerAddress] = []
    mount: Path | None = None
    dht: bool = True
    lsd: bool = False
    refresh_interval: _Seconds = _Seconds(60.0)
    fetch_timeout: _Seconds = _Seconds(30.0)
    api_token_file: Path | None = None
    repositories: dict[str, Any] = {}  # each table checked on its own, so errors name it
    image_policy: dict[str, Any] = {}
    runner: dict[str, Any] = {}
    tuning: dict[str, Any] = {}
    site: dict[str, Any] = {}
    vm: dict[str, Any] = {}


# msgspec's names of TOML types, as a person reads them
_TYPE_NAMES = {
    "object": "a table",
    "array": "a list",
    "str": "a string",
    "int": "a whole number",
    "float": "a number",
    "bool": "true or false",
}
_AT = re.compile(r"^(?P<message>.*?)(?: - at `\$(?P<at>[^`]*)`)?$", re.DOTALL)
_STEP = re.compile(r"\.([A-Za-z_][A-Za-z0-9_]*)|\[([0-9]+)\]")


def _value_at(raw: object, at: str) -> object:
    """The raw value at msgspec's path ``at`` (``.bootstrap[0]``)."""
    for name, index in _STEP.findall(at):
        if name and isinstance(raw, Mapping):
            raw = raw.get(name)
        elif index and isinstance(raw, list) and int(index) < len(raw):
            raw = raw[int(index)]
        else:
            return None
    return raw


def _decode(raw: object, schema: type[_T], key: str, base: Path) -> _T:
    """``raw`` (what TOML gave at ``key``) as ``schema``.

    Raises:
        ConfigError: one line: the path of the bad value from ``key`` on, and
            what it accepts.
    """
    try:
        return msgspec.convert(raw, schema, dec_hook=_decode_hook(base))
    except msgspec.ValidationError as exc:
        found = _AT.match(str(exc))
        assert found is not None  # the pattern matches any text
        message, at = found["message"], found["at"] or ""
        path = ".".join(p for p in (key, at.lstrip(".")) if p).replace(".[", "[")
        known = ", ".join(f.name for f in msgspec.structs.fields(schema))  # type: ignore[arg-type]
        if m := re.fullmatch(r"Object contains unknown field `(.*)`", message):
            where = f"{path}.{m[1]}" if path else m[1]
            raise ConfigError(f"{where}: unknown key (known: {known})") from None
        if m := re.fullmatch(r"Object missing required field `(.*)`", message):
            raise ConfigError(f"{path}.{m[1]}: missing (required)") from None
        if m := re.fullmatch(r"Expected `(.*)`, got `.*`", message):
            names = [_TYPE_NAMES.get(t, t) for t in m[1].split(" | ") if t != "null"]
            got = _value_at(raw, at)
            raise ConfigError(f"{path}: expected {' or '.join(names)}, got {got!r}") from None
        raise ConfigError(f"{path}: {message}") from None


def parse_config(text: str, *, base: Path = Path("/"), source: str = "config") -> NodeConfig:
    """Parse the TOML text of a node configuration.

    Relative paths are taken relative to ``base`` (the file's directory).

    Raises:
        ConfigError: invalid TOML, unknown keys, bad values; the message names
            the key's path and what it accepts.
    """
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    top = _decode(raw, _NodeTable, "", base)
    repos: dict[str, RepositoryConfig] = {}
    for name, table in top.repositories.items():
        key = f'repositories."{name}"'
        problem = repo_name_problem(name)
        if problem is not None:
            raise ConfigError(f"{key}: {problem}")
        r = _decode(table, _RepositoryTable, key, base)
        repos[name] = RepositoryConfig(
            name=name,
            origin=None if r.origin is None else str(r.origin),
            trust=r.trust,
            policy=str(r.policy),
            images=r.images,
            cache_quota=int(r.cache_quota),
            tag=r.tag,
            start_profile=r.start_profile,
        )
    return NodeConfig(
        data_dir=top.data_dir,
        listen=top.listen,
        api=top.api,
        peer=top.peer or Address(top.listen.host, 6880),
        bootstrap=tuple(top.bootstrap),
        mount=top.mount,
        repositories=repos,
        dht=top.dht,
        lsd=top.lsd,
        refresh_interval=float(top.refresh_interval),
        fetch_timeout=float(top.fetch_timeout),
        api_token_file=top.api_token_file,
        image_policy=top.image_policy,
        runner=top.runner,
        tuning=top.tuning,
        site=top.site,
        vm=top.vm,
    )


def parse_origin(value: object, key: str) -> str:
    """An origin's base URL (``http(s)://HOST[...]``), ending in ``/``.

    Raises:
        ConfigError: naming ``key``: not an http(s) URL.
    """
    try:
        return _origin_url(value)
    except ValueError as exc:
        raise ConfigError(f"{key}: {exc}") from None


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


def _toml_value(value: object, key: str) -> object:
    """``value`` as tomli-w writes it (paths as strings, tuples as lists)."""
    if isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, Path | Address):
        return str(value)
    if isinstance(value, list | tuple):
        return [_toml_value(v, f"{key}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        return {str(k): _toml_value(v, f"{key}.{k}") for k, v in value.items()}
    raise ConfigError(f"{key}: cannot write {value!r} to a config file")


def render_config(
    settings: Mapping[str, object],
    repositories: Mapping[str, Mapping[str, object]],
    *,
    tuning: Mapping[str, object] | None = None,
) -> str:
    """The TOML text of a node configuration (what :func:`parse_config` reads).

    Raises:
        ConfigError: a value that has no TOML form here, naming its key.
    """
    document: dict[str, object] = {k: _toml_value(v, k) for k, v in settings.items()}
    if repositories:
        document["repositories"] = {
            name: _toml_value(table, f'repositories."{name}"')
            for name, table in repositories.items()
        }
    if tuning:
        document["tuning"] = _toml_value(tuning, "tuning")
    return tomli_w.dumps(document)
