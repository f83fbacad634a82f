"""Set-up notices of the libraries under hft-ray (MLflow creating its database tables, Ray's
token-authentication warning) go to a log file, not the terminal: a newcomer's first screen holds
hft-ray's own lines. `--verbose` shows them."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

# Loggers whose records are one-off set-up notices, not something a user acts on.
SETUP_LOGGERS = (
    "mlflow.store.db.utils",                                   # "Creating initial MLflow database tables..."
    "alembic.runtime.migration",                               # MLflow's schema migrations
    "ray._private.authentication.authentication_token_setup",  # "Token authentication is enabled ..."
)


def driver_log_path() -> Path:
    """$HFT_RAY_DRIVER_LOG, or hft-ray/driver.log in the temporary folder (appended by every run)."""
    return Path(os.environ.get("HFT_RAY_DRIVER_LOG") or Path(tempfile.gettempdir()) / "hft-ray" / "driver.log")


def route_setup_notices(verbose: bool) -> Path | None:
    """Send the set-up loggers' records to the driver log instead of stderr (unless `verbose`);
    returns the log's path."""
    if verbose:
        return None
    path = driver_log_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s pid=%(process)d %(levelname)s %(name)s: %(message)s"))
    for name in SETUP_LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers = [handler]
        logger.propagate = False  # MLflow's and Ray's own handlers write to stderr
    return path
