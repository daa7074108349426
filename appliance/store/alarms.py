"""Alarms: conditions a person must act on, kept in the index until they clear.

Each alarm has a stable key (e.g. "tier:s3", "recall:PV0002L9"), a message, the
action to take, and the time it was first raised. `appliance status` lists them.
"""

from __future__ import annotations

import time

from appliance.store.index import Index, Txn


def raise_alarm(index: Index, key: str, message: str, action: str) -> None:
    def put(t: Txn) -> None:
        old = t.get("alarms", key)
        t.put("alarms", key, {"message": message, "action": action,
                              "since": old["since"] if old else int(time.time())})
    index.write(put)


def clear_alarm(index: Index, key: str) -> None:
    def drop(t: Txn) -> None:
        if t.get("alarms", key) is not None:
            t.delete("alarms", key)
    index.write(drop)


def alarms(index: Index) -> dict[str, dict]:
    with index.read() as t:
        return {key.decode(): value for key, value in t.items("alarms")}
