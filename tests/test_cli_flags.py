"""`kaya run`'s flags as a newcomer needs them: another node already holds the ports."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from kaya.app.config import ConfigError, load_config, with_overrides
from tests.servers import VENV_BIN, free_port, start_kaya, stop_pid

REPO = Path(__file__).resolve().parent.parent


def test_flags_win_over_the_file_and_are_checked_like_it(tmp_path: Path) -> None:
    path = tmp_path / "kaya.toml"
    path.write_text('[nats]\nmonitor_port = 8222\n[metrics]\naddress = "127.0.0.1:9464"\n')
    config = with_overrides(
        load_config(path), monitor_port=0, metrics_address="127.0.0.1:0", app="m:a"
    )
    assert config.nats.monitor_port == 0
    assert config.metrics.address == "127.0.0.1:0"
    assert config.node.app == "m:a"
    with pytest.raises(ConfigError, match=r"nats\.monitor_port"):
        with_overrides(load_config(path), monitor_port=70000)


def test_kaya_version() -> None:
    out = subprocess.run(
        [str(VENV_BIN / "kaya"), "--version"], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0
    assert out.stdout.strip() == "kaya 0.1.0"


@pytest.fixture
def held_ports() -> Iterator[tuple[int, int]]:
    """Two ports some other process holds (a monitor port and a metrics port)."""
    sockets = []
    for _ in range(2):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen()
        sockets.append(s)
    try:
        yield sockets[0].getsockname()[1], sockets[1].getsockname()[1]
    finally:
        for s in sockets:
            s.close()


@pytest.mark.slow
def test_a_busy_monitor_and_metrics_port_are_moved_by_flags(
    tmp_path: Path, held_ports: tuple[int, int]
) -> None:
    monitor, metrics = held_ports
    config = tmp_path / "kaya.toml"
    config.write_text(
        f'[node]\ndata_dir = "{tmp_path / "data"}"\napp = "examples.bank:app"\n'
        f"[nats]\nport = {free_port()}\nmonitor_port = {monitor}\n"
        f'[metrics]\naddress = "127.0.0.1:{metrics}"\n'
    )
    kaya = str(VENV_BIN / "kaya")
    refused = subprocess.run(
        [kaya, "run", "--config", str(config)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1].startswith("error:")
    node = start_kaya(
        config,
        argv=[
            kaya,
            "run",
            "--config",
            str(config),
            "--monitor-port",
            "0",
            "--metrics-address",
            "127.0.0.1:0",
        ],
    )
    try:
        assert "ready on nats://" in node.ready_line
    finally:
        assert stop_pid(node.proc) == 0


@pytest.mark.slow
def test_a_node_whose_server_is_not_there_exits_with_one_line(tmp_path: Path) -> None:
    config = tmp_path / "kaya.toml"
    dead = f"nats://127.0.0.1:{free_port()}"
    config.write_text(
        f'[node]\ndata_dir = "{tmp_path / "data"}"\napp = "examples.bank:app"\n'
        f'[nats]\nurl = "{dead}"\nstartup_timeout = 2\n'
    )
    out = subprocess.run(
        [str(VENV_BIN / "kaya"), "run", "--config", str(config)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == (
        f"error: cannot connect to NATS at {dead} within 2 s"
    )


def test_the_node_name_comes_from_the_flag_or_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One config for every pod of a StatefulSet: each node named by its environment."""
    from kaya.app.cli import build_parser
    from kaya.app.cli.common import config

    path = tmp_path / "kaya.toml"
    path.write_text('[node]\nname = "from-file"\n')

    def name(*argv: str) -> str:
        return config(build_parser().parse_args(["run", "--config", str(path), *argv])).node.name

    assert name() == "from-file"
    monkeypatch.setenv("KAYA_NODE_NAME", "kaya-2")
    assert name() == "kaya-2"
    assert name("--node-name", "kaya-7") == "kaya-7"  # the flag wins
    with pytest.raises(ConfigError, match=r"node\.name"):
        name("--node-name", "not a name")
