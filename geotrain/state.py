"""The local state db: what this machine asked for, in SQLite under GEOTRAIN_HOME.

Runs, their sites, every node we asked a provider for, and events. A node is
recorded *before* the provider is called, so `geotrain down` can always find
what might exist, even after a crash mid-provision. Every call opens its own
connection: the CLI, a detached controller and tests may share the file.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from geotrain.errors import GeotrainError, RunNotFound

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY, name TEXT, recipe_path TEXT, recipe_json TEXT, store TEXT,
    state TEXT, created_at REAL, started_at REAL, first_step_at REAL, finished_at REAL,
    controller_pid INTEGER, rounds_total INTEGER, rounds_done INTEGER DEFAULT 0,
    eval_loss REAL, error TEXT);
CREATE TABLE IF NOT EXISTS sites (
    run_id TEXT, name TEXT, provider TEXT, region TEXT, state TEXT, pid INTEGER,
    round INTEGER, step INTEGER, loss REAL, tokens_per_s REAL, bytes_sent INTEGER,
    updated_at REAL, PRIMARY KEY (run_id, name));
CREATE TABLE IF NOT EXISTS nodes (
    id INTEGER PRIMARY KEY AUTOINCREMENT, run_id TEXT, site TEXT, provider TEXT,
    region TEXT, instance_id TEXT, pid INTEGER, state TEXT, created_at REAL,
    terminated_at REAL);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, run_id TEXT, at REAL, source TEXT,
    kind TEXT, message TEXT, data TEXT);
CREATE TABLE IF NOT EXISTS requests (
    id INTEGER PRIMARY KEY AUTOINCREMENT, run_id TEXT, at REAL, kind TEXT, args TEXT,
    taken_at REAL);
"""

RUN_STATES = ("running", "succeeded", "failed", "stopped")

# Columns added after the first release: added to an existing db when missing, so an old
# state.db keeps working. (table, column, type)
ADDED_COLUMNS = (
    ("sites", "placements_tried", "TEXT"),  # JSON: every placement tried and why it failed
    ("sites", "placement", "TEXT"),  # JSON: the placement the site runs on
    ("sites", "usd_per_hour", "REAL"),  # its catalog price, x nodes
    ("sites", "launched_at", "REAL"),
    ("runs", "spend_usd", "REAL"),  # estimated spend so far (compute + egress)
    ("sites", "member", "TEXT"),  # the site's name in the run store (differs after a migration)
    # The controller's start time (procs.start_time) next to controller_pid: a pid is trusted
    # (status), refused (resume) or signalled (down) only while both match. NULL in rows
    # written before it was recorded: those are checked by command line (runs._legacy_controller).
    ("runs", "controller_started", "INTEGER"),
    # Why the site was last lost (preempted, its node failed to boot: ...) and when: what
    # `status` shows while its replacement starts.
    ("sites", "lost_reason", "TEXT"),
    ("sites", "lost_at", "REAL"),
    # The run's control key (geotrain/store/control.py), base64 of its Ed25519 private
    # half: it signs run.json, stop, finish and store switches. Never leaves this db.
    ("runs", "control_key", "TEXT"),
    # Each member's signing key (JSON {member: base64 Ed25519 private key}); the public
    # halves are the roster in run.json / control/roster.json. Never leaves this db.
    ("runs", "member_keys", "TEXT"),
)


def private_dir(path: Path) -> Path:
    """`mkdir -p path`, owner-only: the directory itself is made (or tightened to) 0700.
    GEOTRAIN_HOME and log directories; other users of the machine read nothing there."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    _tighten(path, 0o700)
    return path


def open_private(path: Path, mode: str = "ab"):
    """Open `path` for appending, created (or tightened to) 0600: logs."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        if os.fstat(fd).st_mode & 0o077:
            os.fchmod(fd, 0o600)
    except PermissionError:  # not ours: left as it is
        pass
    return os.fdopen(fd, mode)


def _tighten(path: Path, mode: int) -> None:
    try:
        if path.stat().st_mode & 0o077:
            os.chmod(path, mode)
    except PermissionError:  # not ours: left as it is
        pass
    except FileNotFoundError:  # SQLite removed its -wal/-shm/-journal since we looked
        pass


OWNER_FILE = "owner"  # this GEOTRAIN_HOME's owner id, created once (owner_id)
OWNER_RE = re.compile(r"[0-9a-f]{16}")


def owner_id(home: Path) -> str:
    """The owner id of this GEOTRAIN_HOME: 16 random lowercase hex digits, created
    once in `<home>/owner` (mode 0600) and the same ever after. Written as a tag on
    every node launched from this home (`geotrain-owner`; fits GCP's label rules),
    so `geotrain down --orphans` sweeps only this operator's nodes."""
    path = home / OWNER_FILE
    if not path.exists():
        private_dir(home)
        tmp = home / f".{OWNER_FILE}.tmp-{secrets.token_hex(4)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(8) + "\n")
            try:
                os.link(tmp, path)  # first writer wins: two processes agree on one id
            except FileExistsError:
                pass
        finally:
            tmp.unlink(missing_ok=True)
    value = path.read_text().strip()
    if not OWNER_RE.fullmatch(value):
        raise GeotrainError(f"{path} does not hold an owner id (16 lowercase hex digits); "
                            "restore it, or remove it to start a new one (down --orphans then no "
                            "longer sweeps nodes launched under the old one)")
    return value


def iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, timezone.utc).isoformat()


class StateDB:
    def __init__(self, home: Path):
        private_dir(home)
        self.path = home / "state.db"
        # Owner-only before SQLite first opens it: its -wal and -shm files take the db's mode.
        os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
        for suffix in ("", "-wal", "-shm", "-journal"):
            extra = self.path.with_name(self.path.name + suffix)
            if extra.exists():
                _tighten(extra, 0o600)
        with self._conn() as c:
            c.executescript(SCHEMA)
            for table, column, kind in ADDED_COLUMNS:
                have = {r["name"] for r in c.execute(f"PRAGMA table_info({table})")}
                if column not in have:
                    try:
                        c.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
                    except sqlite3.OperationalError as e:  # another process added it first
                        if "duplicate column" not in str(e):
                            raise

    @contextmanager
    def _conn(self) -> Iterator[sqlite3.Connection]:
        conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode=WAL")
        try:
            yield conn
        finally:
            conn.close()

    def _update(self, table: str, where: dict, **values: Any) -> None:
        sets = ", ".join(f"{k} = ?" for k in values)
        cond = " AND ".join(f"{k} = ?" for k in where)
        with self._conn() as c:
            c.execute(f"UPDATE {table} SET {sets} WHERE {cond}", [*values.values(), *where.values()])

    # -- runs ------------------------------------------------------------------------

    def add_run(self, run_id: str, name: str, recipe_path: str, recipe: dict, store: str,
                rounds_total: int, sites: list[dict]) -> None:
        now = time.time()
        with self._conn() as c:
            c.execute("INSERT INTO runs (id, name, recipe_path, recipe_json, store, state, created_at,"
                      " started_at, rounds_total) VALUES (?, ?, ?, ?, ?, 'running', ?, ?, ?)",
                      (run_id, name, recipe_path, json.dumps(recipe), store, now, now, rounds_total))
            for s in sites:
                c.execute("INSERT INTO sites (run_id, name, provider, region, state, updated_at)"
                          " VALUES (?, ?, ?, ?, 'pending', ?)",
                          (run_id, s["name"], s["provider"], s.get("region"), now))

    def update_run(self, run_id: str, **values: Any) -> None:
        self._update("runs", {"id": run_id}, **values)

    def run(self, run_id: str) -> dict:
        with self._conn() as c:
            row = c.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
            if row is None:
                # A unique prefix is enough, as with git hashes.
                rows = c.execute("SELECT * FROM runs WHERE id LIKE ?", (run_id + "%",)).fetchall()
                if len(rows) != 1:
                    raise RunNotFound(f"no run {run_id!r} in {self.path}"
                                      + (" (ambiguous prefix)" if rows else ""))
                row = rows[0]
        return dict(row)

    def runs(self) -> list[dict]:
        with self._conn() as c:
            return [dict(r) for r in c.execute("SELECT * FROM runs ORDER BY created_at")]

    # -- sites and nodes -------------------------------------------------------------

    def update_site(self, run_id: str, name: str, **values: Any) -> None:
        self._update("sites", {"run_id": run_id, "name": name}, updated_at=time.time(), **values)

    def sites(self, run_id: str) -> list[dict]:
        with self._conn() as c:
            return [dict(r) for r in c.execute(
                "SELECT * FROM sites WHERE run_id = ? ORDER BY rowid", (run_id,))]

    def add_node(self, run_id: str, site: str, provider: str, region: str | None) -> int:
        """Record the intent to create a node; returns its row id."""
        with self._conn() as c:
            cur = c.execute("INSERT INTO nodes (run_id, site, provider, region, state, created_at)"
                            " VALUES (?, ?, ?, ?, 'requested', ?)",
                            (run_id, site, provider, region, time.time()))
            return int(cur.lastrowid)

    def update_node(self, node_id: int, **values: Any) -> None:
        self._update("nodes", {"id": node_id}, **values)

    def nodes(self, run_id: str, live_only: bool = False) -> list[dict]:
        q = "SELECT * FROM nodes WHERE run_id = ?"
        if live_only:
            q += " AND state != 'terminated'"
        with self._conn() as c:
            return [dict(r) for r in c.execute(q + " ORDER BY id", (run_id,))]

    # -- requests: what the CLI asks of a run's controller ---------------------------------
    # They stay on this machine (the db is owner-only): a node, which can write the run
    # store, can never make the controller do anything.

    def add_request(self, run_id: str, kind: str, **args: Any) -> float:
        """Queue a request (finish, migrate-site, migrate-store) for the run's controller;
        returns its time."""
        now = time.time()
        with self._conn() as c:
            c.execute("INSERT INTO requests (run_id, at, kind, args) VALUES (?, ?, ?, ?)",
                      (run_id, now, kind, json.dumps(args)))
        return now

    def take_requests(self, run_id: str) -> list[dict]:
        """The run's requests not taken yet, oldest first, marked taken (each is handed
        out once, even to two controllers racing)."""
        with self._conn() as c:
            c.execute("BEGIN IMMEDIATE")
            rows = c.execute("SELECT id, at, kind, args FROM requests WHERE run_id = ? AND "
                             "taken_at IS NULL ORDER BY id", (run_id,)).fetchall()
            c.execute("UPDATE requests SET taken_at = ? WHERE run_id = ? AND taken_at IS NULL",
                      (time.time(), run_id))
            c.execute("COMMIT")
        return [dict(json.loads(r["args"]), kind=r["kind"], at=r["at"]) for r in rows]

    # -- events ------------------------------------------------------------------------

    def add_event(self, run_id: str, source: str, kind: str, message: str, **data: Any) -> None:
        with self._conn() as c:
            c.execute("INSERT INTO events (run_id, at, source, kind, message, data) VALUES (?, ?, ?, ?, ?, ?)",
                      (run_id, time.time(), source, kind, message, json.dumps(data)))

    def events(self, run_id: str) -> list[dict]:
        with self._conn() as c:
            return [dict(r) for r in c.execute(
                "SELECT at, source, kind, message FROM events WHERE run_id = ? ORDER BY id", (run_id,))]
