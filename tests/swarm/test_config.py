"""The node configuration parser: defaults, every key, and errors that name the key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from swarm.config import load_config, parse_config
from swarm.exceptions import ConfigError

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
    from swarm.config import render_config

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
