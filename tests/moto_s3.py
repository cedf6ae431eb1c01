"""An S3-compatible server for the tests: moto's standalone server (PyPI `moto[server]`) on a free
127.0.0.1 port, configured the way a KubeRay pod is, by the standard AWS variables only."""
from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

BUCKET = "melo-ray-test"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class S3Server:
    """A running moto server and the variables that point a client at it."""

    server: object  # moto.server.ThreadedMotoServer
    port: int

    @property
    def env(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{self.port}", "AWS_ACCESS_KEY_ID": "melo-test",
                "AWS_SECRET_ACCESS_KEY": "melo-test", "AWS_REGION": "us-east-1"}

    def new_prefix(self) -> str:
        """A fresh, empty s3:// root in the test bucket."""
        return f"s3://{BUCKET}/{uuid.uuid4().hex[:12]}"


def start_server() -> Iterator[S3Server]:
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request otherwise

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    running = S3Server(server, port)
    env = running.env
    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name=env["AWS_REGION"],
                          aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
    client.create_bucket(Bucket=BUCKET)
    try:
        yield running
    finally:
        running.server.stop()  # a test may have replaced it (stopped and started again)
