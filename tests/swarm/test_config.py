"""The node configuration parser: defaults, every key, and errors that name the key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import urllib3

from cvmfs_like.exceptions import StoreError
from cvmfs_like.publish import publish
from cvmfs_like.store import OriginStore
from swarm.address import Address
from swarm.config import load_config, parse_config, render_config
from swarm.exceptions import ConfigError
from tests.harness import OriginServer
from tests.trees import build_sample_tree
from trust.keys import init_keys

FULL = """
data_dir = "/var/lib/swarm"
listen = "0.0.0.0:6881"
api = "127.0.0.1:7000"
bootstrap = ["10.1.0.1:6881"]
mount = "/swarm"
[repositories."sw.example.org"]
origin = "http://origin.example.org/"
trust = "/etc/swarm/sw.example.org.root.json"
"""


def test_the_documented_example_parses_with_defaults() -> None:
    cfg = parse_config(FULL)
    assert str(cfg.listen) == "0.0.0.0:6881" and str(cfg.api) == "127.0.0.1:7000"
    assert [str(b) for b in cfg.bootstrap] == ["10.1.0.1:6881"]
    assert cfg.peer.port == 6880 and cfg.mount == Path("/swarm")
    repo = cfg.repositories["sw.example.org"]
    assert repo.origin == "http://origin.example.org/" and repo.policy == "on-demand"
    assert repo.trust == Path("/etc/swarm/sw.example.org.root.json")
    assert cfg.dht and not cfg.lsd
    assert cfg.token_path == Path("/var/lib/swarm/api.token")


def test_relative_paths_are_relative_to_the_file(tmp_path: Path) -> None:
    (tmp_path / "node.toml").write_text(
        'data_dir = "state"\n[repositories."r"]\ntrust = "r.root.json"\npolicy = "prefetch"\n'
    )
    cfg = load_config(tmp_path / "node.toml")
    assert cfg.data_dir == tmp_path / "state"
    assert cfg.repositories["r"].trust == tmp_path / "r.root.json"
    assert cfg.repositories["r"].policy == "prefetch"
    assert cfg.repositories["r"].origin is None  # peers are enough


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("listen = 6881", "listen"),
        ('listen = "nowhere"', "listen"),
        ('bootstrap = "10.0.0.1:1"', "bootstrap"),
        ('bootstrap = ["0.0.0.0:6881"]', "bootstrap[0]"),
        ("lsdd = true", "lsdd"),
        ('[repositories."a/b"]\ntrust = "x"', 'repositories."a/b"'),
        ('[repositories."r"]\norigin = "http://o/"', 'repositories."r".trust'),
        ('[repositories."r"]\ntrust = "x"\npolicy = "eager"', 'repositories."r".policy'),
        ('[repositories."r"]\ntrust = "x"\norigin = "ftp://o/"', 'repositories."r".origin'),
        ('[repositories."r"]\ntrust = "x"\ncache_quota = "lots"', "cache_quota"),
        ('[repositories."r"]\ntrust = "x"\nprefetch = true', 'repositories."r"'),
        ("refresh_interval = -1", "refresh_interval"),
        ("dht = 1", "dht"),
        ("this is not toml", "not valid TOML"),
    ],
)
def test_bad_values_name_the_key(text: str, names: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(names)):
        parse_config(text)


def test_unreadable_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"missing\.toml"):
        load_config(tmp_path / "missing.toml")


def test_tuning_knobs_are_checked_against_the_session_config() -> None:
    from swarm.daemon import _tuning
    from swarm.torrent import SessionConfig

    cfg = parse_config('[tuning]\nunchoke_slots = 16\nseed_choking = "round_robin"\n')
    kw = _tuning(cfg.tuning, SessionConfig)
    assert SessionConfig(**kw).settings()["unchoke_slots_limit"] == 16
    with pytest.raises(ConfigError, match=r"tuning\.unchoke: unknown"):
        _tuning({"unchoke": 1}, SessionConfig)
    with pytest.raises(ConfigError, match=r"tuning\.unchoke_slots: expected int"):
        _tuning({"unchoke_slots": "many"}, SessionConfig)
    with pytest.raises(ConfigError, match="listen"):
        _tuning({"listen": "0.0.0.0:1"}, SessionConfig)  # not a tuning knob


def test_render_config_is_read_back_as_written(tmp_path: Path) -> None:
    text = render_config(
        {
            "data_dir": tmp_path / "d",
            "listen": "10.0.0.2:6881",
            "bootstrap": ["10.0.0.1:6881"],
            "lsd": True,
            "refresh_interval": 5,
        },
        {"r.example.org": {"trust": "/etc/r.json", "policy": "prefetch"}},
        tuning={"unchoke_slots": 8},
    )
    cfg = parse_config(text)
    assert cfg.data_dir == tmp_path / "d" and cfg.lsd and cfg.refresh_interval == 5.0
    assert [str(b) for b in cfg.bootstrap] == ["10.0.0.1:6881"]
    assert cfg.repositories["r.example.org"].policy == "prefetch"
    assert cfg.tuning == {"unchoke_slots": 8}
    with pytest.raises(ConfigError, match="bad"):
        render_config({"bad": object()}, {})


# -- one repository-name rule and one address type (issue 9) ------------------------


@pytest.mark.parametrize("name", ["sw_example.org", "a" * 200 + "_", "x_y"])
def test_the_node_config_refuses_a_repository_name_no_publisher_can_create(
    tmp_path: Path, name: str
) -> None:
    with pytest.raises(StoreError):  # the publisher's store cannot hold it...
        OriginStore(tmp_path / "store", name)
    with pytest.raises(ConfigError, match=re.escape(f'repositories."{name}"')):
        parse_config(f'[repositories."{name}"]\ntrust = "x"\n')  # ...so no node follows it


@pytest.mark.parametrize("name", ["sw.example.org", "a-", "x.-y", "A" * 253])
def test_every_name_a_publisher_can_create_is_accepted_everywhere(
    tmp_path: Path, name: str
) -> None:
    """Key directory, store, origin and node config take the same names: a
    name the store holds gets keys, is served and can be followed."""
    keys = tmp_path / "keys"
    init_keys(keys, name)
    publish(build_sample_tree(tmp_path / "src"), OriginStore(tmp_path / "store", name), keys)
    with OriginServer(tmp_path / "store") as origin:
        r = urllib3.PoolManager().request("GET", f"{origin.url}{name}/metadata/timestamp.json")
        assert r.status == 200
    cfg = parse_config(f'[repositories."{name}"]\ntrust = "x"\norigin = "{origin.url}"\n')
    assert list(cfg.repositories) == [name]


@pytest.mark.parametrize("text", ['"::6881"', '"::1:6881"', '"fe80::1:80"'])
def test_an_ipv6_address_without_brackets_is_refused(text: str) -> None:
    with pytest.raises(ConfigError, match=r"^listen: .*\[") as err:
        parse_config(f"listen = {text}")
    assert "\n" not in str(err.value)


def test_a_bootstrap_peer_on_port_0_is_refused() -> None:
    """Port 0 means "any free port" to a listener; no peer can be reached there."""
    with pytest.raises(ConfigError, match=r"^bootstrap\[1\]: .*port from 1 to 65535"):
        parse_config('bootstrap = ["10.0.0.1:6881", "10.0.0.2:0"]')
    assert parse_config('api = "127.0.0.1:0"').api.port == 0  # any free port: fine


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        ("10.1.0.1:6881", "10.1.0.1", 6881),
        ("[::1]:7000", "::1", 7000),
        ("node-1.example.org:65535", "node-1.example.org", 65535),
    ],
)
def test_an_address_is_read_back_as_written(text: str, host: str, port: int) -> None:
    cfg = parse_config(render_config({"bootstrap": [text], "listen": text}, {}))
    assert cfg.bootstrap == (Address(host, port),) and str(cfg.bootstrap[0]) == text
    assert cfg.listen == Address(host, port) and str(cfg.listen) == text
    assert Address.parse(str(cfg.listen)) == cfg.listen


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        ("data_dir = 3", "data_dir: expected a path (a string), got 3"),
        ("dht = 1", "dht: expected true or false, got 1"),
        ('bootstrap = "10.0.0.1:1"', "bootstrap: expected a list, got '10.0.0.1:1'"),
        ("repositories = 3", "repositories: expected a table, got 3"),
        ('[repositories."r"]\ntrust = 1', 'repositories."r".trust: expected a path'),
        ('[repositories."r"]\ntrust = "x"\ntag = 1', 'repositories."r".tag: expected a string'),
        (
            '[repositories."sw.example.org"]\ntrust = "x"\ncache_quota = "lots"',
            'repositories."sw.example.org".cache_quota: expected a positive size in bytes',
        ),
        ("refresh_interval = '3'", "refresh_interval: expected a number of seconds"),
        ("runner = 1", "runner: expected a table, got 1"),
    ],
)
def test_every_error_names_the_path_and_the_expected_type(toml: str, expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(toml)
    assert str(err.value).startswith(expected), str(err.value)
