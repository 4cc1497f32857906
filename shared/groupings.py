"""What the spend and latency reports group by and look back over: defined once for the CLI, the admin API, the
dashboard and the queries themselves.

A module of its own, importing nothing heavy, because the CLI's parser needs these lists and every service
process starts through that parser: taking them from spend.py loaded SQLAlchemy (20 MB of RSS) into processes
that never query the database.
"""

from __future__ import annotations

from datetime import timedelta

GROUPINGS = ("key", "model", "provider", "deployment", "day", "team", "project")
"""What `switchyard spend --by` and GET /v1/spend?by= group spend by."""

LATENCY_GROUPINGS = {"deployment": "deployment", "model": "model_group", "provider": "provider"}
"""What latency percentiles group by (`by=`), with the usage column each one reads."""

WINDOWS = {"5m": timedelta(minutes=5), "1h": timedelta(hours=1), "24h": timedelta(hours=24)}
"""The windows latency percentiles look back over (`window=`)."""
