"""A teacher replica in its own process, as the pool, compose and DDP tests need one."""

from __future__ import annotations

import subprocess

import httpx

from teacher_client import TeacherClient
from teacher_service.cli import free_port, serve_command


class Replica:
    def __init__(self, model_dir) -> None:
        self.model_dir, self.port, self.http_port = model_dir, free_port(), free_port()
        self.process: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> Replica:
        command = serve_command(self.model_dir, self.port, "--http-port", str(self.http_port))
        self.process = subprocess.Popen(command)
        with TeacherClient(self.address, timeout=60) as client:
            client.wait_until_serving(timeout=120)
        return self

    def requests(self) -> float:
        text = httpx.get(f"http://127.0.0.1:{self.http_port}/metrics").text
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("teacher_requests_total{") and 'frontend="grpc"' in line
        )

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()
