"""The server as ``make serve`` runs it: a process on a free port, SIGTERM, the command-line client, TLS."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from benchmarks.random_export import make_random_artifact, raw_item_id
from protos.genrec.v1 import recommender_pb2 as pb
from protos.genrec.v1 import recommender_pb2_grpc as pb_grpc
from serving.client import main as client_main
from serving.server import SERVICE_NAME, ServerConfig
from tests.serving_fixtures import ServerThread

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    return make_random_artifact(tmp_path_factory.mktemp("art") / "export", num_items=30, num_users=3)[1]


def start_process(artifact: Path, *flags: str, grace_s: float = 5) -> tuple[subprocess.Popen, int, list[str]]:
    """Starts ``python -m serving.server`` on a free port; returns once its log says SERVING."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "serving.server", "--artifact", str(artifact), "--port", "0", "--grace-s", str(grace_s),
         *flags],
        cwd=ROOT, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    log: list[str] = []
    port = 0
    watchdog = threading.Timer(120, proc.kill)  # a server that never says SERVING fails the test, not hangs it
    watchdog.start()
    for line in proc.stderr:
        log.append(line)
        if match := re.search(r"listening on 127\.0\.0\.1:(\d+)", line):
            port = int(match.group(1))
        if "SERVING model" in line:
            watchdog.cancel()
            return proc, port, log
    watchdog.cancel()
    proc.kill()
    raise AssertionError("server did not start:\n" + "".join(log))


def test_serves_until_sigterm_then_goes_not_serving_and_exits_cleanly(artifact, capsys):
    proc, port, log = start_process(artifact)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=SERVICE_NAME),
                                                              timeout=30)
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING

            # The command-line client prints a known user's recommendations with titles.
            assert client_main(["--address", f"127.0.0.1:{port}", "--user", "1", "--top-k", "4"]) == 0
            out = capsys.readouterr().out
            assert len(re.findall(r"^\s+\d+\s+-?\d\.\d{4}\s+10\d\d\s+Item \d+$", out, re.MULTILINE)) == 4
            assert "model random-30x16-seed0" in out
            assert client_main(["--address", f"127.0.0.1:{port}", "--user", "nobody"]) == 1
            assert "INVALID_ARGUMENT: user_id" in capsys.readouterr().err
            # AppendEvents, then Generate: five streamed rows.
            assert client_main(["--address", f"127.0.0.1:{port}", "--user", "1", "--append", "1003@4000000000",
                                "--generate", "5"]) == 0
            captured = capsys.readouterr()
            assert "now has" in captured.err
            assert len(re.findall(r"^\s+[1-5]\s+-?\d\.\d{4}\s+10\d\d\s+Item \d+$", captured.out, re.MULTILINE)) == 5

            proc.send_signal(signal.SIGTERM)
            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
            assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    rest = proc.stderr.read()
    assert "got SIGTERM" in rest and "stopped" in rest, "".join(log) + rest


def test_ready_file_names_the_bound_ports_once_serving(artifact, tmp_path):
    """``--ready-file``: a launcher that asked for port 0 reads the ports from a JSON file, written
    once the server is SERVING, instead of parsing the log."""
    ready = tmp_path / "ready.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "serving.server", "--artifact", str(artifact), "--port", "0", "--metrics-port", "0",
         "--ready-file", str(ready)],
        cwd=ROOT, stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        give_up = time.monotonic() + 120
        while not ready.exists() and proc.poll() is None and time.monotonic() < give_up:
            time.sleep(0.05)
        ports = json.loads(ready.read_text())
        assert ports["host"] == "127.0.0.1" and ports["port"] > 0 and ports["metrics_port"] > 0
        assert [p.name for p in tmp_path.iterdir()] == ["ready.json"]  # no temporary file left beside it
        with grpc.insecure_channel(f"127.0.0.1:{ports['port']}") as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME),
                                                              timeout=30)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_missing_artifact_fails_in_one_line_before_listening(tmp_path):
    """``make serve ARTIFACT=/nonexistent`` announced "listening on ..." before its error (issue #19):
    the export is now read and checked before the port opens."""
    proc = subprocess.run([sys.executable, "-m", "serving.server", "--artifact", str(tmp_path / "none"), "--port", "0"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0, proc.stderr
    assert "listening" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    [error] = proc.stderr.strip().splitlines()
    assert f"ERROR serving: no export at {tmp_path / 'none'}" in error, proc.stderr


def test_generations_that_could_hold_every_rpc_slot_are_refused_in_one_line(artifact):
    """Each Generate stream holds one of --max-concurrent-rpcs while it runs: with --max-generations as
    large, generations alone could make the server refuse every Recommend and health check."""
    proc = subprocess.run([sys.executable, "-m", "serving.server", "--artifact", str(artifact), "--port", "0",
                           "--max-generations", "64", "--max-concurrent-rpcs", "64"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "listening" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    [error] = proc.stderr.strip().splitlines()
    assert "--max-generations (64) must be below --max-concurrent-rpcs (64)" in error, proc.stderr


def test_refuses_a_port_in_use(artifact):
    """A second server on a busy port fails loudly instead of sharing it (gRPC's SO_REUSEPORT is off)."""
    with ServerThread(ServerConfig(artifact=artifact, port=0)) as first:
        second = ServerThread(ServerConfig(artifact=artifact, port=first.port))
        with pytest.raises(RuntimeError, match="Failed to bind"):
            second.start()
        second.loop.call_soon_threadsafe(second.loop.stop)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
def test_tls(artifact, tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    config = ServerConfig(artifact=artifact, port=0, tls_cert=cert, tls_key=key)
    with ServerThread(config) as server:
        creds = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        with grpc.secure_channel(server.address, creds) as channel:
            response = pb_grpc.RecommenderServiceStub(channel).Recommend(
                pb.RecommendRequest(history=[pb.Event(item_id=raw_item_id(3), timestamp=1)], top_k=2), timeout=10)
            assert len(response.items) == 2
        with grpc.insecure_channel(server.address) as channel, pytest.raises(grpc.RpcError) as info:
            pb_grpc.RecommenderServiceStub(channel).Recommend(pb.RecommendRequest(user_id="1", top_k=2), timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_sigterm_with_active_generations_exits_within_the_grace_period(tmp_path):
    """Issue #20, 1: with Generate streams active, SIGTERM never finished. Now the streams get the
    grace period, are cancelled, and the process exits 0 within the grace period + 2 s.
    (benchmarks.serve --suite shutdown measures the same with 100 generations on an ML-1M-sized model.)"""
    grace = 1.0
    _, path = make_random_artifact(tmp_path / "export", num_items=3000, num_users=2, history_len=(5, 5))
    proc, port, log = start_process(path, "--max-batch-size", "4", "--max-generations", "16",
                                    "--max-generate-items", "2900", grace_s=grace)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel, ThreadPoolExecutor(8) as pool:
            stub = pb_grpc.RecommenderServiceStub(channel)
            request = pb.GenerateRequest(context=pb.RecommendRequest(user_id="1"), num_items=2900)
            streams = [stub.Generate(request, timeout=60) for _ in range(8)]
            assert all(next(s).step == 0 for s in streams)  # all eight are generating

            def drain(stream) -> str:
                try:
                    return f"OK after {sum(1 for _ in stream) + 1} items"
                except grpc.RpcError as e:
                    return e.code().name

            ended = [pool.submit(drain, s) for s in streams]
            time.sleep(0.5)
            proc.send_signal(signal.SIGTERM)
            started = time.monotonic()
            assert proc.wait(timeout=grace + 2) == 0
            assert time.monotonic() - started < grace + 2
            # Cut short by the shutdown (none of them could have finished 2900 steps meanwhile).
            assert {f.result(timeout=10) for f in ended} <= {"CANCELLED", "UNAVAILABLE"}
    finally:
        if proc.poll() is None:
            proc.kill()
    rest = proc.stderr.read()
    assert "stopped" in rest and "Traceback" not in rest, "".join(log) + rest
