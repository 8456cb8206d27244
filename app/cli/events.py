"""`kaya streams`, `kaya dlq`, `kaya replay` and `kaya tail`: operating the event side.

    kaya streams                    -> KAYA_EVENTS, KAYA_DLQ: messages, each consumer's lag
    kaya dlq list|show|replay|purge -> the dead letters (kaya.app.events.dlq)
    kaya replay PROJECTION          -> rebuild a read model, then swap it in (events.rebuild)
    kaya tail [SUBJECT]             -> events as they are published

What an operator needs when a consumer falls behind, gives up on events or has
built a read model wrong, without stopping the node: the work is done by library
functions in kaya.app.events (tests call them); these handlers connect, call, and
print what they return.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import orjson

from kaya.app.cli import common
from kaya.app.cli.common import CliError


def register(sub: common.Subcommands) -> None:
    streams = sub.add_parser("streams", help="streams, consumers and their lag")
    common.remote(streams)
    streams.add_argument("--json", action="store_true", help="machine-readable output")
    streams.set_defaults(handler=_streams)

    dlq = sub.add_parser("dlq", help="dead letters: list, show, replay, purge")
    dlq.add_argument("action", choices=["list", "show", "replay", "purge"])
    dlq.add_argument("consumer", nargs="?", help="only this consumer's dead letters")
    dlq.add_argument(
        "--seq", type=common.positive_int, help="one dead letter, by its KAYA_DLQ sequence"
    )
    common.remote(dlq)
    dlq.add_argument("--data-dir", metavar="DIR", help="the node's data dir (for replay)")
    common.with_app(dlq)
    dlq.set_defaults(handler=_dlq)

    replay = sub.add_parser("replay", help="rebuild a read model from the event store")
    replay.add_argument("projection", metavar="PROJECTION", help="e.g. analytics")
    replay.add_argument("--dry-run", action="store_true", help="rebuild and compare only")
    common.common(replay, node=True)
    common.with_app(replay)
    replay.set_defaults(handler=_replay)

    tail = sub.add_parser("tail", help="follow events as they are published")
    tail.add_argument("subject", nargs="?", default="kaya.evt.>", metavar="SUBJECT")
    tail.add_argument("--all", action="store_true", help="from the start of the stream")
    tail.add_argument("--count", type=common.count, default=0, help="stop after N events")
    common.remote(tail)
    tail.set_defaults(handler=_tail)


async def _streams(args: argparse.Namespace) -> int:
    from kaya.app.events.inspect import describe_streams

    async with common.session(common.url(args)) as nc:
        streams = await describe_streams(nc.jetstream())
    if args.json:
        common.print_json(streams)
        return 0
    for stream in streams:
        if stream.get("missing"):
            print(f"{stream['stream']}: not created yet (start a node)")
            continue
        print(
            f"{stream['stream']}  subjects {','.join(stream['subjects'])}  "
            f"messages {stream['messages']}  bytes {stream['bytes']}  "
            f"seq {stream['first_seq']}..{stream['last_seq']}"
        )
        for c in stream["consumers"]:
            print(
                f"  consumer {c['name']:<16} lag {c['lag']:<8} pending {c['pending']:<8}"
                f" ack-pending {c['ack_pending']:<6} redelivered {c['redelivered']}"
            )
    return 0


async def _dlq(args: argparse.Namespace) -> int:
    from kaya.actors.wire import DLQ_STREAM, TOKEN
    from kaya.app.events import dlq

    if args.consumer is not None and not TOKEN.fullmatch(args.consumer):
        raise CliError(f"consumer {args.consumer!r} must be 1-64 characters of [A-Za-z0-9_-]")
    if args.action == "show" and args.seq is None:
        raise CliError("kaya dlq show needs --seq N")
    async with common.session(common.url(args), stream=DLQ_STREAM) as nc:
        js = nc.jetstream()
        # a server no node ever ran on has no KAYA_DLQ: say so (likely the wrong --url),
        # rather than "0 dead letters" or "no dead letter with sequence N"
        await js.stream_info(DLQ_STREAM)
        if args.action == "list":
            letters = await dlq.list_dead_letters(js, args.consumer)
            for letter in letters:
                print(orjson.dumps(letter.summary()).decode())
            print(f"{len(letters)} dead letters", file=sys.stderr)
        elif args.action == "show":
            try:
                letter = await dlq.show_dead_letter(js, args.seq)
            except LookupError as exc:
                raise CliError(str(exc), exit_code=1) from None
            common.print_json(
                {
                    **letter.summary(),
                    "headers": letter.headers,
                    "data": letter.data.decode(errors="replace"),
                }
            )
        elif args.action == "purge":
            removed = await dlq.purge_dead_letters(js, args.consumer)
            print(f"purged {removed} dead letters")
        else:
            return await _dlq_replay(args, nc)
    return 0


async def _dlq_replay(args: argparse.Namespace, nc: Any) -> int:
    from kaya.app.events import dlq
    from kaya.app.events.consumers import Context
    from kaya.store import open_event_store

    config = common.config(args)
    app = common.app(config)
    path = common.store_path(config)

    async def publish(subject: str, data: bytes, headers: Any) -> None:
        await nc.publish(subject, data, headers=dict(headers) if headers else None)

    sealer = secret = None
    if config.security.enabled:  # a reaction may open sealed fields (an owner's pseudonym)
        from kaya.actors.sealing import Sealer
        from kaya.app.security.keys import KEYS_BUCKET, KeyVault, master_key, pseudonym_key

        master = master_key(config.security_dir)
        secret = pseudonym_key(master)
        vault = KeyVault(nc, await nc.jetstream().key_value(KEYS_BUCKET), master)
        sealer = Sealer(vault)
    async with open_event_store(path) as store:
        context = Context(store, publish, sealer=sealer, pseudonym_key=secret)
        for consumer in app.consumers:
            consumer.bind(context)
        outcome = await dlq.replay_dead_letters(
            nc.jetstream(),
            store,
            {c.name: c for c in app.consumers},
            consumer=args.consumer,
            seq=args.seq,
            registry=app.registry,
        )
    print(
        f"replayed {len(outcome.replayed)}, already applied {len(outcome.skipped)},"
        f" failed {len(outcome.failed)}"
    )
    for seq, reason in outcome.failed.items():
        print(f"  seq {seq}: {reason}", file=sys.stderr)
    if outcome.failed:
        raise CliError(
            f"{len(outcome.failed)} dead letters still fail; fix the cause, retry", exit_code=1
        )
    return 0


async def _replay(args: argparse.Namespace) -> int:
    from kaya.app.events.consumers import Context
    from kaya.app.events.rebuild import rebuild_projection
    from kaya.store import open_event_store

    config = common.config(args)
    app = common.app(config)
    models = {c.name: c for c in app.projections}
    consumer = models.get(args.projection)
    if consumer is None:  # before the store is open: one line, not an exception group
        known = ", ".join(sorted(models)) or "none"
        raise CliError(f"no read model named {args.projection!r} (known: {known})")
    async with open_event_store(common.store_path(config)) as store:
        consumer.bind(Context(store))
        view = app.views.get(args.projection)

        async def read_view(target: Any) -> Any:
            return None if view is None else await view(Context(target), {})

        def progress(done: int, total: int) -> None:
            width = 40
            filled = int(width * done / total) if total else width
            print(
                f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} events",
                end="",
                file=sys.stderr,
                flush=True,
            )

        outcome = await rebuild_projection(
            store,
            consumer,
            view=read_view,
            progress=progress,
            swap=not args.dry_run,
            registry=app.registry,
        )
    print(file=sys.stderr)
    same = {
        None: "not compared (the live model was at another position)",
        True: "identical to the live read model",
        False: "DIFFERENT from the live read model",
    }
    swapped = "; swapped in" if outcome.swapped else " (dry run: live model untouched)"
    print(
        f"rebuilt {args.projection} from {outcome.events} events up to position"
        f" {outcome.position}: {same[outcome.identical_before_swap]}{swapped}"
    )
    return 0


async def _tail(args: argparse.Namespace) -> int:
    from kaya.actors.wire import EVENTS_STREAM
    from kaya.app.events.inspect import tail_events

    _check_events_subject(args.subject)
    async with common.session(common.url(args), stream=EVENTS_STREAM) as nc:
        seen = 0
        async for event in tail_events(nc, args.subject, from_start=args.all):
            print(orjson.dumps(tail_line(event)).decode(), flush=True)
            seen += 1
            if args.count and seen >= args.count:
                break
    return 0


def tail_line(event: dict[str, Any]) -> dict[str, Any]:
    """An event as `kaya tail` prints it: its `data` a JSON object, as `kaya history` prints
    it (a body that is not JSON stays the text it was)."""
    try:
        data = orjson.loads(event["data"])
    except orjson.JSONDecodeError:
        return event
    return {**event, "data": data}


def _check_events_subject(subject: str) -> None:
    """A subject filter within KAYA_EVENTS (kaya.evt.>): anything else cannot match."""
    tokens = subject.split(".")
    valid = all(t and not any(c.isspace() for c in t) for t in tokens) and all(
        t != ">" for t in tokens[:-1]
    )
    if not valid:
        raise CliError(f"{subject!r} is not a NATS subject (dot-separated tokens, no spaces)")
    if tokens[:2] != ["kaya", "evt"] or len(tokens) < 3:
        raise CliError(
            f"{subject!r} is not within kaya.evt.> (the events stream), e.g. kaya.evt.account.>"
        )
