"""`switchyard ingress`: run one ingress instance under uvicorn."""

from __future__ import annotations

import argparse

import uvicorn

from switchyard.services.ingress.app import Gateway, create_app, reply_partition_from_env
from switchyard.services.ingress.http_writes import HttpProtocol
from switchyard.shared import gc_settings, tracing
from switchyard.shared.config import load_config
from switchyard.shared.logs import setup_logging
from switchyard.shared.settings import load_settings


def run(args: argparse.Namespace) -> None:
    setup_logging("ingress")
    tracing.setup_tracing("ingress")
    settings = load_settings()
    config = load_config(args.config)
    gateway = Gateway(settings, config, reply_partition_from_env(args.reply_partition))
    app = create_app(gateway)
    gc_settings.freeze_startup_objects()
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False,
                loop="uvloop", http=HttpProtocol, timeout_graceful_shutdown=10,
                server_header=False)
    tracing.shutdown()
