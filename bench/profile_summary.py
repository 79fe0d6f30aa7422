"""Summarise a py-spy ``--format raw`` profile of a broker worker.

``python -m bench.run --profile DIR`` leaves one raw profile per disclosure
stream; ``python -m bench.profile_summary DIR/profile-held-records.txt`` prints
where the worker's CPU went: by library, by the deepest broker function on the
stack, and by cost bucket of the disclosure path. Samples of anyio's idle
worker threads are dropped (py-spy counts a thread parked in
``Condition.wait`` as busy); SQLAlchemy's sync ORM work shows up as stacks
rooted in a greenlet, which are kept and labelled.
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

BUCKETS: dict[str, tuple[str, ...]] = {
    "SQLAlchemy statement construction (select/where/join/operators)": (
        "ColumnOperators.__eq__",
        "Select.where",
        "Select.join",
        "Select.outerjoin",
        "select (sqlalchemy/sql/_selectable",
        "Select.__init__",
        "Update.where",
        "Update.values",
        "update (sqlalchemy",
        "ColumnOperators.in_",
        "and_ (sqlalchemy",
    ),
    "SQLAlchemy cache-key generation": ("_generate_cache_key",),
    "SQLAlchemy compile (statement-cache miss)": ("SQLCompiler.__init__",),
    "SQLAlchemy ORM result loading": ("orm/loading.py",),
    "SQLAlchemy unit-of-work flush (INSERTs)": ("Session.flush",),
    "asyncpg protocol I/O": (
        "PreparedStatement.__do_execute",
        "Connection.execute (asyncpg",
        "Connection._do_execute",
    ),
    "transaction BEGIN/COMMIT": ("Transaction.start", "Transaction.__commit"),
    "pool checkout (BEGIN, or the closed-socket check in autocommit)": (
        "_ConnectionFairy._checkout",
    ),
    "SQLAlchemy session lifecycle (request_session: open, commit, close)": ("request_session",),
    "resolve: caller standing + survivor + grants (one statement)": ("resolve (broker",),
    "FastAPI dependency solving (incl. auth query)": ("solve_dependencies",),
    "auth: token check (bearer_principal: verified-token cache, rate limit)": ("bearer_principal",),
    "auth: authenticate on other routes (token + client/agency query)": ("authenticate (",),
    "JWE/JWS seal_payload (joserfc + cryptography)": ("seal_payload",),
    "ledger append_entry (RFC 8785 + HMAC)": ("append_entry",),
    "records endpoint fetch (httpx/httpcore)": ("fetch_record",),
    "failed `import sniffio` in httpcore (filesystem search)": ("current_async_library",),
    "thread-pool hop for sync dependencies": ("run_in_threadpool",),
    "sequencer (background)": ("broker/ledger/sequencer.py",),
    "held record decrypt": ("open_record",),
    "decide()": ("broker/disclosure/decision.py",),
}


def _samples(path: Path) -> Iterator[tuple[list[str], int]]:
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or "WorkerThread.run" in stack:
            continue
        yield stack.split(";"), int(count)


def _library(frame: str) -> str:
    match = re.search(r"\(([^):]+):\d+\)$", frame)
    path = match.group(1) if match else frame
    return path.split("/")[0] or path


def summarise(path: Path, top: int = 15) -> str:
    libs: Counter[str] = Counter()
    owners: Counter[str] = Counter()
    buckets: Counter[str] = Counter()
    total = 0
    for frames, n in _samples(path):
        total += n
        stack = ";".join(frames)
        libs[_library(frames[-1])] += n
        owner = next((f for f in reversed(frames) if "(broker/" in f), None)
        if owner is None:
            rooted = frames[0].startswith(("Session.", "TransactionalContext"))
            owner = "(greenlet: SQLAlchemy ORM sync work)" if rooted else "(no broker frame)"
        owners[re.sub(r":\d+\)$", ")", owner)] += n
        for bucket, needles in BUCKETS.items():
            if any(needle in stack for needle in needles):
                buckets[bucket] += n
    if not total:
        return f"{path}: no samples"
    out = [f"{path}: {total} samples of the worker's main thread"]
    for title, counter in (
        ("by library of the sampled frame", libs),
        ("by deepest broker function on the stack", owners),
        ("by cost bucket (a sample may fall in several)", buckets),
    ):
        out.append(f"\n{title}:")
        out += [f"  {v / total:6.1%}  {k}" for k, v in counter.most_common(top)]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    if not args:
        print("usage: python -m bench.profile_summary PROFILE.txt [...]", file=sys.stderr)
        return 2
    for name in args:
        print(summarise(Path(name)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
