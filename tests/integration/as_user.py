"""Run one distfork action as another local user (tests/integration/test_hardening.py).

    python as_user.py UID GID HOME cli ARGS...            `distfork ARGS` as that user
    python as_user.py UID GID HOME driver ADDRESS MARKER  init(ADDRESS), fork a task that writes MARKER

The interpreter lives under /root (mode 0700), which another user cannot
even execute, so runuser(1) cannot start it: this script starts as root,
imports what it needs, then drops to the user for good (setgroups, setresgid,
setresuid) before it touches a key, a socket or a file. From then on the
kernel treats it as that user in every way that matters here (file modes,
socket ownership); its default credentials are that user's own, under HOME.
"""

from __future__ import annotations

import os
import sys

import cloudpickle  # noqa: F401 - imported before we lose access to /root
import zmq.auth.thread  # noqa: F401
import zmq.utils.monitor  # noqa: F401

import distfork
import distfork.broker  # noqa: F401
import distfork.cli
import distfork.driver  # noqa: F401
import distfork.status  # noqa: F401
import distfork.worker  # noqa: F401

REFUSED_EXIT = 3


def main() -> None:
    uid, gid, home, action, *args = sys.argv[1:]
    os.setgroups([])
    os.setresgid(int(gid), int(gid), int(gid))
    os.setresuid(int(uid), int(uid), int(uid))
    os.environ.update(HOME=home, XDG_CONFIG_HOME=os.path.join(home, ".config"))
    for name in ("DISTFORK_KEYS_DIR", "DISTFORK_DEFAULT_KEYS"):
        os.environ.pop(name, None)
    if action == "cli":
        distfork.cli.cli.main(args=args, prog_name="distfork")
    address, marker = args

    def touch() -> str:
        with open(marker, "w") as f:
            f.write(f"ran as uid {os.getuid()}")
        return "ran"

    try:
        distfork.init(address=address, connect_timeout_s=10)
        print(distfork.wait(distfork.fork(touch), timeout=20), flush=True)
    except (distfork.AuthenticationError, distfork.BrokerUnavailableError) as exc:
        print(f"REFUSED {type(exc).__name__}: {exc}", flush=True)
        sys.exit(REFUSED_EXIT)
    finally:
        distfork.shutdown()


if __name__ == "__main__":
    main()
