"""Reply envelopes: kept as a name for the code that imports it; `kaya.actors.wire` owns them."""

from kaya.actors.wire import (
    AnyReply,
    CommandDone,
    ErrorBody,
    ErrorReply,
    StateReply,
    command_done,
    decode_reply,
    error_from,
    error_reply,
    state_reply,
)

__all__ = [
    "AnyReply",
    "CommandDone",
    "ErrorBody",
    "ErrorReply",
    "StateReply",
    "command_done",
    "decode_reply",
    "error_from",
    "error_reply",
    "state_reply",
]
