"""`tether keys DIR [--actors NAME ...] [--learners NAME ...] [--tools NAME ...]`: CURVE keys.

Layout (what `broker.keys_dir` points at):

    DIR/server.key, DIR/server.key_secret         the broker's key pair
    DIR/clients/<name>.key, <name>.key_secret     one pair per client name (broker.curve_client_name;
                                                  by default a daemon uses the key named after its role)
    DIR/authorized/<role>/<name>.key              public keys the broker admits, by role: a key under
                                                  authorized/actor/ may register only as an actor.
                                                  Delete one to revoke it.

By default one key per role is made, named actor, learner and tool. Secret files are written
with mode 0600. Existing keys are never overwritten.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from tether.common.transport import ROLES


def make_keys(keys_dir: str | Path, clients: dict[str, list[str]]) -> list[Path]:
    """Create the server pair (if missing) and one pair per client name, authorized for its role
    (`clients` maps role -> names); returns the files created."""
    import zmq.auth

    root = Path(keys_dir)
    (root / "clients").mkdir(parents=True, exist_ok=True)
    created: list[Path] = []
    if not (root / "server.key_secret").exists():
        public, secret = zmq.auth.create_certificates(str(root), "server")
        os.chmod(secret, 0o600)
        created += [Path(public), Path(secret)]
    for role, names in clients.items():
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r} (one of {', '.join(ROLES)})")
        (root / "authorized" / role).mkdir(parents=True, exist_ok=True)
        for name in names:
            if not (root / "clients" / f"{name}.key_secret").exists():
                public, secret = zmq.auth.create_certificates(str(root / "clients"), name)
                os.chmod(secret, 0o600)
                created += [Path(public), Path(secret)]
            authorized = root / "authorized" / role / f"{name}.key"
            if not authorized.exists():
                shutil.copyfile(root / "clients" / f"{name}.key", authorized)
                created.append(authorized)
    return created


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tether keys", description="Create CURVE keys for the broker and clients.")
    parser.add_argument("dir", help="keys directory (broker.keys_dir)")
    for role in ROLES:
        parser.add_argument(f"--{role}s", nargs="+", default=[role], metavar="NAME",
                            help=f"client key names authorized as {role} (default: {role})")
    args = parser.parse_args(argv)
    clients = {role: getattr(args, f"{role}s") for role in ROLES}
    bad = [name for names in clients.values() for name in names if not name or "/" in name or name.startswith(".")]
    if bad:
        print(f"invalid client names: {bad}", file=sys.stderr)
        return 2
    created = make_keys(args.dir, clients)
    for path in created:
        print(path)
    if not created:
        print(f"all keys already exist in {args.dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
