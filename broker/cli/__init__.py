"""The ``broker`` command's parser; each command lives in the module of its group."""

from __future__ import annotations

import argparse
import sys

from broker.cli.clients import cmd_clients_add, cmd_demo, cmd_token
from broker.cli.database import cmd_backup, cmd_disclosures, cmd_migrate, cmd_restore
from broker.cli.keys import (
    cmd_keys_generate,
    cmd_keys_init,
    cmd_keys_rekey_records,
    cmd_keys_rewrap_records,
    cmd_keys_rotate,
)
from broker.cli.ledger import cmd_ledger_status, cmd_ledger_verify
from broker.cli.serve import cmd_serve

__all__ = ["build_parser", "main"]

DESCRIPTION = (
    "The ``broker`` command: serve, migrate, backup, restore, disclosures, keys, clients, "
    "token, demo, ledger."
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="broker", description=DESCRIPTION)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="serve the API (uvicorn)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--workers", type=int, default=1)
    s.add_argument("--log-level", default="info")
    s.add_argument("--access-log", action="store_true", help="log request lines (paths only)")
    s.set_defaults(func=cmd_serve)

    m = sub.add_parser("migrate", help="bring the database schema to head (alembic)")
    m.add_argument(
        "--grant-to",
        metavar="ROLE",
        help="PostgreSQL: then give ROLE, the role the broker serves as, exactly the grants "
        "this release needs (what deploy/sql/app_role.sql does), revoking any others",
    )
    m.set_defaults(func=cmd_migrate)

    b = sub.add_parser(
        "backup",
        help="a consistent copy of the database, safe while serving (SQLite: online backup; "
        "PostgreSQL: pg_dump); never overwrites, holds no key",
    )
    b.add_argument("dest", help="the backup file to write (must not exist)")
    b.set_defaults(func=cmd_backup)
    r = sub.add_parser(
        "restore",
        help="put a backup back (PostgreSQL: into an empty database; SQLite: the broker "
        "stopped), bring its schema up, and record the restore in the ledger",
    )
    r.add_argument("source", help="a file `broker backup` wrote")
    r.add_argument(
        "--replace",
        action="store_true",
        help="SQLite: rename the database there (and its -wal, -shm) aside first",
    )
    r.set_defaults(func=cmd_restore)

    h = sub.add_parser(
        "disclosures",
        help="hold every disclosure (503) in an incident or after a restore, resume them, "
        "or show the holds (exit 1 while on hold)",
    )
    h.add_argument("action", choices=["hold", "resume", "status"])
    h.set_defaults(func=cmd_disclosures)

    k = sub.add_parser("keys", help="key management").add_subparsers(dest="keys_cmd", required=True)
    ki = k.add_parser("init", help="create the broker's own keys in BROKER_KEY_DIR")
    ki.set_defaults(func=cmd_keys_init)
    kr = k.add_parser(
        "rotate",
        help="replace the broker's token or payload signing key (the old one's public "
        "half stays published so what it signed still verifies) or its records key "
        "(the old one still unwraps until `keys rewrap-records --forget-retired`), its "
        "subject-commitment key (the old one is kept to find earlier ledger entries) or its "
        "ledger checkpoint key (the old one cosigns a hand-over auditors follow)",
    )
    kr.add_argument("which", choices=["token", "payload", "records", "subject", "checkpoint"])
    kr.add_argument(
        "--lost-key",
        metavar="VKEY",
        help="checkpoint only, when its private key is lost: the verifier key it had (text "
        "or @FILE, as GET /v1/ledger/key gave it); the new key alone signs the hand-over",
    )
    kr.set_defaults(func=cmd_keys_rotate)
    kw = k.add_parser(
        "rewrap-records",
        help="after `keys rotate records`, with the new key on every host: rewrap every "
        "survivor's data key under the current records key",
    )
    kw.add_argument(
        "--forget-retired",
        action="store_true",
        help="then, if nothing is left under a retired key, delete the retired records keys",
    )
    kw.set_defaults(func=cmd_keys_rewrap_records)
    kk = k.add_parser(
        "rekey-records",
        help="give every survivor a new data key and re-encrypt her held records under it "
        "(after a database copy may have leaked with a records key); safe while serving",
    )
    kk.set_defaults(func=cmd_keys_rekey_records)
    kg = k.add_parser("generate", help="make an agency's signing and encryption key pairs")
    kg.add_argument("--out", required=True)
    kg.add_argument("--name", default="agency")
    kg.add_argument("--enc-curve", choices=["X25519", "P-256"], default="X25519")
    kg.set_defaults(func=cmd_keys_generate)

    c = sub.add_parser("clients", help="credentials").add_subparsers(
        dest="clients_cmd", required=True
    )
    ca = c.add_parser("add", help="issue a client from the shell (bootstrap the first admin)")
    ca.add_argument("--role", required=True, choices=["admin", "agency", "advocate", "auditor"])
    ca.add_argument("--name", required=True)
    ca.add_argument("--jwks", required=True, help="public JWKS file of the client's signing key")
    ca.add_argument("--agency-id", default=None, help="default: a new 'Broker operations' agency")
    ca.set_defaults(func=cmd_clients_add)

    t = sub.add_parser("token", help="get an access token with a private_key_jwt assertion")
    t.add_argument("--client-id", required=True)
    t.add_argument("--key", required=True, help="the client's private signing JWK file")
    t.add_argument("--url", default="http://127.0.0.1:8000")
    t.set_defaults(func=cmd_token)

    d = sub.add_parser("demo", help="walk through the whole loop against a running broker")
    d.add_argument("--url", default="http://127.0.0.1:8000")
    d.set_defaults(func=cmd_demo)

    lg = sub.add_parser("ledger", help="ledger tools").add_subparsers(
        dest="ledger_cmd", required=True
    )
    lv = lg.add_parser("verify", help="verify a ledger export offline (or fetch it from a broker)")
    lv.add_argument("export", nargs="?", help="JSONL export file, or - for stdin")
    lv.add_argument("--vkey", help="note verifier key text, or @FILE")
    lv.add_argument("--checkpoint", help="a checkpoint note saved earlier (file)")
    lv.add_argument("--origin", default=None)
    lv.add_argument("--url", help="fetch the export from this broker instead of a file")
    lv.add_argument(
        "--strict", action="store_true", help="also check every entry is RFC 8785 canonical"
    )
    lv.add_argument("--client-id")
    lv.add_argument("--key", help="auditor's private signing JWK file (with --url)")
    lv.set_defaults(func=cmd_ledger_verify)
    ls = lg.add_parser(
        "status",
        help="tree size, entries waiting, and whether this key folder may sign checkpoints "
        "(exit 1 if not)",
    )
    ls.set_defaults(func=cmd_ledger_status)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        rc = int(args.func(args))
    except KeyboardInterrupt:
        return 130
    except (FileExistsError, FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return rc


if __name__ == "__main__":
    sys.exit(main())
