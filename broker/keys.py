"""`tether keys DIR [--clients NAME ...]`: make ZeroMQ CURVE keys for the broker and its clients.

Layout (what `broker.keys_dir` points at):

    DIR/server.key, DIR/server.key_secret       the broker's key pair
    DIR/clients/<name>.key, <name>.key_secret   one pair per client name (broker.curve_client_name)
    DIR/authorized/<name>.key                   public keys the broker admits; delete one to revoke

Secret files are written with mode 0600. Existing keys are never overwritten.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path


def make_keys(keys_dir: str | Path, clients: list[str]) -> list[Path]:
    """Create the server pair (if missing) and one pair per client; returns the files created."""
    import zmq.auth

    root = Path(keys_dir)
    (root / "clients").mkdir(parents=True, exist_ok=True)
    (root / "authorized").mkdir(exist_ok=True)
    created: list[Path] = []
    targets = [(root, "server")] + [(root / "clients", name) for name in clients]
    for where, name in targets:
        if (where / f"{name}.key_secret").exists():
            continue
        public, secret = zmq.auth.create_certificates(str(where), name)
        os.chmod(secret, 0o600)
        created += [Path(public), Path(secret)]
        if where != root:
            shutil.copyfile(public, root / "authorized" / f"{name}.key")
    return created


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tether keys", description="Create CURVE keys for the broker and clients.")
    parser.add_argument("dir", help="keys directory (broker.keys_dir)")
    parser.add_argument("--clients", nargs="+", default=["client"], help="client key names (default: client)")
    args = parser.parse_args(argv)
    bad = [name for name in args.clients if not name or "/" in name or name.startswith(".")]
    if bad:
        print(f"invalid client names: {bad}", file=sys.stderr)
        return 2
    created = make_keys(args.dir, args.clients)
    for path in created:
        print(path)
    if not created:
        print(f"all keys already exist in {args.dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
