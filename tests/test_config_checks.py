"""Config cross-checks: settings that are each valid but impossible together stop start-up.

Each such pair would otherwise fail later and far from its cause (JetStream refusing a
stream, a port already taken by the node itself) or, worse, silently break a guarantee
(dedup that misses the relay's republishes, redeliveries while a consumer retries). The
message is one line naming both keys, from the file and from the command line alike.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from kaya.app.config import Config, ConfigError, load_config, parse_config, with_overrides
from tests.servers import VENV_BIN

REPO = Path(__file__).resolve().parent.parent

IMPOSSIBLE = [
    pytest.param(
        "[events]\nduplicate_window = 60\n",
        ("events.duplicate_window", "events.relay_rewind"),
        id="dedup-window-within-rewind",
    ),
    pytest.param(
        "[events]\nduplicate_window = 150\nrelay_rewind = 150\n",
        ("events.duplicate_window", "events.relay_rewind"),
        id="dedup-window-equals-rewind",
    ),
    pytest.param(
        "[events]\nrelay_rewind = 600\n",
        ("events.duplicate_window", "events.relay_rewind"),
        id="rewind-beyond-default-window",
    ),
    pytest.param(
        "[events]\nmax_age = 120\nduplicate_window = 200\nrelay_rewind = 100\n",
        ("events.duplicate_window", "events.max_age"),
        id="dedup-window-beyond-max-age",
    ),
    pytest.param(
        "[events]\ndlq_max_age = 60\n",
        ("events.duplicate_window", "events.dlq_max_age"),
        id="dedup-window-beyond-dlq-max-age",
    ),
    pytest.param(
        "[events]\nack_timeout = 400\n",
        ("events.ack_timeout", "events.duplicate_window"),
        id="relay-ack-timeout-beyond-window",
    ),
    pytest.param(
        "[consumers]\nbackoff_initial = 6\n",
        ("consumers.backoff_initial", "consumers.backoff_max"),
        id="backoff-initial-above-max",
    ),
    pytest.param(
        "[consumers]\nbackoff_max = 10\n",
        ("consumers.backoff_max", "consumers.ack_wait"),
        id="backoff-max-reaches-ack-wait",
    ),
    pytest.param(
        "[consumers]\nack_wait = 2\n",
        ("consumers.backoff_max", "consumers.ack_wait"),
        id="ack-wait-below-backoff-max",
    ),
    pytest.param(
        "[nats]\nport = 8222\n",
        ("nats.port", "nats.monitor_port"),
        id="nats-port-is-monitor-port",
    ),
    pytest.param(
        '[metrics]\naddress = "127.0.0.1:4222"\n',
        ("metrics.address", "nats.port"),
        id="metrics-on-nats-port",
    ),
    pytest.param(
        '[metrics]\naddress = "0.0.0.0:8222"\n',
        ("metrics.address", "nats.monitor_port"),
        id="metrics-on-monitor-port-any-host",
    ),
    pytest.param(
        '[metrics]\naddress = ":4222"\n',
        ("metrics.address", "nats.port"),
        id="metrics-default-host-on-nats-port",
    ),
]


@pytest.mark.parametrize(("toml", "keys"), IMPOSSIBLE)
def test_an_impossible_combination_is_one_message_naming_both_keys(
    toml: str, keys: tuple[str, str]
) -> None:
    with pytest.raises(ConfigError) as raised:
        parse_config(toml, source="kaya.toml")
    message = str(raised.value)
    assert message.startswith("kaya.toml: "), message
    assert "\n" not in message
    for key in keys:
        assert key in message, message


@pytest.mark.parametrize(
    "toml",
    [
        pytest.param("", id="defaults"),
        pytest.param("[events]\nduplicate_window = 151\n", id="window-just-above-rewind"),
        pytest.param("[events]\nrelay_rewind = 0\nduplicate_window = 10\n", id="no-rewind"),
        pytest.param("[events]\nmax_age = 300\n", id="max-age-equal-to-window"),
        pytest.param("[events]\nmax_age = 0\ndlq_max_age = 0\n", id="no-max-age"),
        pytest.param(
            "[consumers]\nbackoff_initial = 5\nbackoff_max = 5\nack_wait = 5.5\n",
            id="backoff-flat-below-ack-wait",
        ),
        pytest.param("[nats]\nport = 8222\nmonitor_port = 0\n", id="monitor-off"),
        pytest.param(
            '[nats]\nurl = "nats://10.0.0.1:4222"\nport = 8222\n[metrics]\naddress = ":8222"\n',
            id="external-server-ports-unused",
        ),
        pytest.param('[metrics]\naddress = "127.0.0.1:0"\n', id="metrics-any-free-port"),
        pytest.param('[metrics]\naddress = "127.0.0.2:4222"\n', id="metrics-other-host"),
    ],
)
def test_possible_combinations_are_accepted(toml: str) -> None:
    assert isinstance(parse_config(toml), Config)


@pytest.mark.parametrize(
    "address", ["localhost", "127.0.0.1:", "127.0.0.1:http", "127.0.0.1:70000", "1.2.3.4:-1"]
)
def test_a_metrics_address_without_a_port_is_refused(address: str) -> None:
    with pytest.raises(ConfigError, match=r"metrics\.address"):
        parse_config(f'[metrics]\naddress = "{address}"\n')


def test_flags_that_make_a_combination_impossible_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "kaya.toml"
    path.write_text('[metrics]\naddress = "127.0.0.1:9464"\n')
    with pytest.raises(ConfigError) as raised:
        with_overrides(load_config(path), nats_port=9464)
    assert str(raised.value).startswith("command line: ")
    assert "metrics.address" in str(raised.value)
    assert "nats.port" in str(raised.value)
    with pytest.raises(ConfigError, match=r"nats\.port.*nats\.monitor_port"):
        with_overrides(load_config(path), monitor_port=4222)
    # moving one of them is how an operator fixes it
    fixed = with_overrides(load_config(path), nats_port=9464, metrics_address="127.0.0.1:0")
    assert fixed.nats.port == 9464


def kaya(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """`kaya ARGS` in `cwd` (what it writes stays there), the example app importable."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [str(VENV_BIN / "kaya"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.parametrize(
    "command",
    [
        ("run",),
        ("server-config",),
        ("history", "account", "a"),
        ("replay", "analytics"),
        ("slo", "export"),
        ("catalog",),
        ("get", "account", "a"),
    ],
)
def test_every_command_that_loads_the_config_stops_with_one_line(
    tmp_path: Path, command: tuple[str, ...]
) -> None:
    path = tmp_path / "kaya.toml"
    path.write_text(
        f'[node]\ndata_dir = "{tmp_path / "data"}"\napp = "examples.bank:app"\n'
        "[events]\nduplicate_window = 60\n"
    )
    result = kaya(*command, "--config", str(path), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: "), result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert "events.duplicate_window" in result.stderr
    assert "events.relay_rewind" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kaya.toml"]  # nothing made
