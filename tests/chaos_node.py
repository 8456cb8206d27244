"""A node for chaos tests: `kaya run` whose account handler fails at random.

    python -m tests.chaos_node --config PATH [--fail-rate 0.05] [--seed N]

Like `kaya run`, it prints one line containing `ready` and the NATS URL once it
serves, and stops cleanly on SIGTERM or SIGINT. Its `account` entity raises
RuntimeError from `decide` with probability `--fail-rate`: the runtime answers
`internal` and changes nothing, which callers (the transfer saga included) must
treat as "try again".
"""

from __future__ import annotations

import argparse
import random
import signal
import sys
from collections.abc import Sequence

import anyio

from examples.bank import make_app
from examples.bank.account import Account, AccountCommand, AccountEvent, AccountState
from kaya.app.config import load_config
from kaya.app.node import open_node
from kaya.app.observability.logs import configure_logging


class FlakyAccount(Account):
    """The reference account, with a handler that crashes now and then."""

    def __init__(self, fail_rate: float, seed: int) -> None:
        super().__init__()
        self.fail_rate = fail_rate
        self._random = random.Random(seed)

    def decide(self, state: AccountState, command: AccountCommand) -> Sequence[AccountEvent]:
        if self._random.random() < self.fail_rate:
            raise RuntimeError(f"chaos: {type(command).__name__} failed at random")
        return super().decide(state, command)


async def serve(args: argparse.Namespace) -> None:
    config = load_config(args.config)
    configure_logging(level=config.log.level, fmt=config.log.format, node=config.node.name)
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with open_node(config, make_app(FlakyAccount(args.fail_rate, args.seed))) as node:
            print(f"chaos node ready on {node.url} (fail rate {args.fail_rate})", flush=True)
            async for _ in signals:
                break


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos_node")
    parser.add_argument("--config", required=True, metavar="PATH")
    parser.add_argument("--fail-rate", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    anyio.run(serve, args, backend="asyncio", backend_options={"use_uvloop": True})
    return 0


if __name__ == "__main__":
    sys.exit(main())
