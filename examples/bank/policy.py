"""Who may do what in the bank, once callers carry JWTs (`[security.jwt] enabled`).

An account's owner may act on their own account: the token's `sub` is the owner's
identity, the same string `Open` puts in `owner`. A caller whose token has the claim
`"admin": true` may act on any account and see anything. A transfer acts on its
source account: whoever may read the source may start it and follow it (the target's
owner learns of a transfer from their notifications). The analytics view holds
totals only, nothing about anyone: every authenticated caller may read it.
"""

from __future__ import annotations

from typing import Any

from examples.bank.account import AccountState, Open
from examples.bank.transfer import Start, TransferState
from kaya import ActsOn, Caller, Decision, Policy


def is_admin(caller: Caller) -> bool:
    return caller.claims.get("admin") is True


class BankPolicy(Policy):
    def command(self, caller: Caller, entity: str, state: Any, command: Any) -> Decision:
        if is_admin(caller):
            return True
        if entity == "account":
            if isinstance(command, Open):  # only in one's own name
                return command.owner == caller.subject
            return isinstance(state, AccountState) and state.owner == caller.subject
        if entity == "transfer" and isinstance(command, Start):
            return ActsOn("account", command.source)
        return False

    def query(self, caller: Caller, entity: str, state: Any) -> Decision:
        if is_admin(caller):
            return True
        if entity == "account":
            return isinstance(state, AccountState) and state.owner == caller.subject
        if entity == "transfer" and isinstance(state, TransferState) and state.source:
            return ActsOn("account", state.source)
        return False

    def view(self, caller: Caller, name: str, params: dict[str, Any]) -> bool:
        return name == "analytics" or is_admin(caller)
