"""The Prefect server settings this project relies on, applied unless the user set them.

Every `mqi` command that may start a Prefect server (the temporary one that
`mqi run` / `mqi demo` start when PREFECT_API_URL is unset, or `mqi server`)
gets these, because the defaults are wrong for us:
- GPU leases must survive a server restart, or a restart leaks GPU slots for
  good (the default lease storage is in memory);
- analytics only adds "database is locked" noise on SQLite and phones home;
- flow runs must never be vacuumed: the server is the record of every case;
- expired GPU leases (a holder died) are reclaimed every few seconds, not 15;
- task-run states and events are written in batches of up to 100 and 200 once a
  second, not one transaction per task-run state: on SQLite every write can make
  a concurrent one fail with 503 (measured with 10 cases on 4 GPUs: a third of
  the GPU slot increments), so fewer, larger writes leave room for the others.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

SERVER_DEFAULTS = {
    "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": "prefect.server.concurrency.lease_storage.filesystem",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_DB_VACUUM_ENABLED": "events",
    "PREFECT_SERVER_API_HOST": "127.0.0.1",
    "PREFECT_SERVER_SERVICES_REPOSSESSOR_LOOP_SECONDS": "3",
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE": "100",
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_FLUSH_INTERVAL": "1",
    "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_BATCH_SIZE": "200",
    "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_FLUSH_INTERVAL": "1",
}


def own_address(port: int) -> dict[str, str]:
    """The settings that tell a server on 127.0.0.1:`port` where it is, for its UI and its links.

    Without them its UI asks the API at PREFECT_API_URL, else at PREFECT_SERVER_API_PORT
    (4200), whatever `--port` it was started with: a server on another port serves a UI
    that cannot reach it, or shows another server's runs.
    """
    ui = f"http://127.0.0.1:{port}"
    return {
        "PREFECT_SERVER_API_PORT": str(port),
        "PREFECT_SERVER_UI_API_URL": f"{ui}/api",
        "PREFECT_UI_URL": ui,
    }


def apply_server_defaults(env: MutableMapping[str, str] = os.environ) -> dict[str, str]:
    """Set each default the environment does not already set; return what was applied."""
    applied = {key: value for key, value in SERVER_DEFAULTS.items() if key not in env}
    env.update(applied)
    return applied
