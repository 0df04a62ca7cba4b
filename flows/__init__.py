"""The Prefect layer: flows, tasks' Prefect wrappers, the command line.

Importing it sets this process's Prefect defaults (`PREFECT_DEFAULTS`), so a notebook that imports a flow
gets them too; a user's own setting of any of them wins, and they take effect only where Prefect is
imported afterwards.
"""

import os

# Telemetry off: an offline host would log an error for every outbound lookup. A longer start-up wait: on a
# busy host the local API server takes more than Prefect's 20 s to start. A longer wait for SQLite's lock:
# the local API's event recorders and the run's own writes share one database file, and on a busy host
# 10 s is not always enough. The local API server inherits them.
PREFECT_DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "PREFECT_SERVER_DATABASE_TIMEOUT": "60",
}


def use_prefect_defaults() -> None:
    for name, value in PREFECT_DEFAULTS.items():
        os.environ.setdefault(name, value)


use_prefect_defaults()
