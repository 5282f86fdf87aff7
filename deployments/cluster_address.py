"""Where this machine's shardline cluster is, and how a later command joins it.

`shardline serve` starts its cluster with `ray.init()`, which, unlike `ray start`,
writes no record of its address; and Ray sends its auth token only when it finds
a cluster by itself, never to an address it is given. So the server records its
cluster in Ray's address file (and removes the record when the cluster goes), and
every command that joins a cluster (`status`, `serve --address`, ...) goes
through `join`: "auto" means RAY_ADDRESS, else that record; the token Ray's
clients use (~/.ray/auth_token, RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH) goes with
the connection whichever way the address came.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Optional

# The address this process recorded for the cluster it started, until that cluster stops.
_recorded: Optional[str] = None


def record(address: str) -> None:
    """Name `address` in Ray's address file, where `ray.init(address="auto")` and `join` look."""
    global _recorded
    from ray._private.utils import write_ray_address

    write_ray_address(address)
    _recorded = address


def forget() -> None:
    """Remove our record (not one that a later `ray start` wrote over it)."""
    global _recorded
    from ray._private.utils import get_ray_address_file, read_ray_address

    if _recorded is not None and read_ray_address() == _recorded:
        try:
            os.remove(get_ray_address_file(None))
        except FileNotFoundError:
            pass
    _recorded = None


def resolve(address: str) -> str:
    """An explicit address as it is; "auto": RAY_ADDRESS, else the recorded cluster.

    Ray's own "auto" would then fall back to any gcs_server process it can see (another user's
    included: the PID namespace is shared even where the network is not) and hang on one it
    cannot reach; this raises ValueError instead.
    """
    if address != "auto":
        return address
    from ray._private.utils import read_ray_address

    found = os.environ.get("RAY_ADDRESS") or read_ray_address()
    if not found:
        raise ValueError("no Ray cluster at 'auto': none was started on this machine (RAY_ADDRESS is unset)")
    return found


def _send_token_if_available() -> None:
    """Turn Ray's token authentication on for this process when a token is on hand and no
    RAY_AUTH_MODE says otherwise (Ray does it only for a cluster it finds by itself)."""
    from ray._private.authentication import authentication_token_setup as auth

    log = logging.getLogger(auth.__name__)
    level = log.level
    log.setLevel(logging.ERROR)  # its "token authentication is enabled" notice is for new clusters
    try:
        auth.maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    finally:
        log.setLevel(level)


def join(address: str, **init_kwargs: Any) -> str:
    """ray.init onto the cluster at `address` ("auto" as in `resolve`); returns the address.

    ValueError (one line) when nothing answers there.
    """
    import ray

    address = resolve(address)
    _send_token_if_available()
    try:
        ray.init(address=address, **init_kwargs)
    except ConnectionError as e:
        raise ValueError(f"no Ray cluster at {address!r}: {str(e).splitlines()[0]}") from None
    return address
