#!/usr/bin/env python3
"""Config-scale fixture for scripts/bench.sh: writes KEYS virtual keys and KEYS x len(MODELS)
assignments straight into a (stopped) control plane's SQLite database in one transaction, then
bumps config_state.version so that the control plane builds a new snapshot when it starts (or on
its next version poll).

Keys are `vk-scale-000000` ... (plaintext known, stored as sha256 like control-plane/src/ids.rs);
key i gets one assignment per model, with the model's name as alias and a limit high enough never
to reject.

    bench_scale_fill.py DB_PATH KEYS MODEL_NAME...
"""
import hashlib
import random
import sqlite3
import sys
import time

BASE32 = "abcdefghijklmnopqrstuvwxyz234567"
TPS = 1_000_000


def main() -> None:
    db_path, keys, models = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    if not models:
        sys.exit("bench_scale_fill.py: give at least one model name")
    rng = random.Random(42)

    def new_id(prefix: str) -> str:
        return prefix + "-" + "".join(rng.choices(BASE32, k=20))

    started = time.monotonic()
    db = sqlite3.connect(db_path, isolation_level=None)
    db.execute("PRAGMA synchronous=OFF")
    db.execute("BEGIN IMMEDIATE")
    model_ids = []
    for name in models:
        row = db.execute("SELECT id FROM provider_models WHERE name = ?", (name,)).fetchone()
        if row is None:
            sys.exit(f"bench_scale_fill.py: no model named {name!r} in {db_path}")
        model_ids.append((row[0], name))
    now = int(time.time() * 1_000_000)
    key_rows, assignment_rows = [], []
    for i in range(keys):
        plaintext = f"vk-scale-{i:06d}"
        vkey_id = new_id("vkey")
        key_rows.append(
            (
                vkey_id,
                f"scale-{i:06d}",
                hashlib.sha256(plaintext.encode()).digest(),
                f"{plaintext[:5]}…{plaintext[-4:]}",
                True,
                None,
                now,
                now,
            )
        )
        for model_id, alias in model_ids:
            assignment_rows.append((new_id("asg"), vkey_id, model_id, alias, TPS, None, None, 1, now, now))
    db.executemany(
        "INSERT INTO virtual_keys (id, name, key_sha256, key_hint, enabled, expires_at, created_at, updated_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        key_rows,
    )
    db.executemany(
        "INSERT INTO assignments (id, vkey_id, model_id, alias, tps, burst, tpm, weight, created_at, updated_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        assignment_rows,
    )
    db.execute("UPDATE config_state SET version = version + 1 WHERE id = 1")
    db.execute("COMMIT")
    version = db.execute("SELECT version FROM config_state WHERE id = 1").fetchone()[0]
    db.close()
    print(
        f"inserted {len(key_rows)} keys and {len(assignment_rows)} assignments in "
        f"{time.monotonic() - started:.1f} s; config version {version}",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
