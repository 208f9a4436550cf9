"""Checkpoints never run code, no model code is trusted, and the smoke profile opens no network socket."""

import os
import pickle
import re
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from gradient_bottleneck.paths import REPO_ROOT
from gradient_bottleneck.train import load_checkpoint

SOURCE_FOLDERS = ("src", "notebooks", "data", "tests")


class MarkerPayload:
    """Unpickling this object calls open(marker, "w"), a harmless stand-in for arbitrary code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_checkpoint_is_rejected_unexecuted(tmp_path):
    marker = tmp_path / "payload_ran"
    path = tmp_path / "last.pt"
    torch.save({"model": {}, "step": 1, "extra": MarkerPayload(marker)}, path)

    with pytest.raises(RuntimeError, match=f"checkpoint {re.escape(str(path))}"):
        load_checkpoint(path)
    assert not marker.exists()

    # Control: a plain unpickler does run the payload, so the check above can fail.
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_legacy_pickle_checkpoint_is_rejected(tmp_path):
    marker = tmp_path / "payload_ran"
    path = tmp_path / "step_000010.pt"
    path.write_bytes(pickle.dumps({"model": MarkerPayload(marker)}, protocol=2))

    with pytest.raises(RuntimeError, match="corrupted or truncated"):
        load_checkpoint(path)
    assert not marker.exists()


def python_sources() -> list[Path]:
    files = []
    for folder in SOURCE_FOLDERS:
        files += sorted((REPO_ROOT / folder).rglob("*.py")) + sorted((REPO_ROOT / folder).rglob("*.ipynb"))
    return [path for path in files if ".ipynb_checkpoints" not in path.parts and path != Path(__file__)]


def test_no_source_trusts_remote_code():
    pattern = re.compile(r"trust_remote_code\s*=\s*True")
    offenders = [str(path.relative_to(REPO_ROOT)) for path in python_sources()
                 if pattern.search(path.read_text(encoding="utf-8", errors="replace"))]
    assert offenders == []


def test_every_torch_load_uses_weights_only():
    calls = []
    for path in sorted((REPO_ROOT / "src").rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        for match in re.finditer(r"torch\.load\(", text):
            # The argument list of this call: up to the matching closing bracket.
            depth, end = 0, match.end() - 1
            for end in range(match.end() - 1, len(text)):
                depth += {"(": 1, ")": -1}.get(text[end], 0)
                if depth == 0:
                    break
            calls.append((path.name, text[match.start():end + 1]))
    unsafe = [(name, call) for name, call in calls if "weights_only=True" not in call]
    assert calls, "no torch.load call found; the pattern no longer matches the sources"
    assert unsafe == []


# A sitecustomize module that every Python process started with it on PYTHONPATH imports at start-up:
# it records each non-loopback connect, connect_ex, sendto and name lookup in a log file and raises
# instead of opening the connection. The Jupyter kernel talks to papermill over loopback TCP and
# ZeroMQ, which stays allowed.
GUARD = textwrap.dedent('''
    import os
    import socket

    LOG = os.environ["SOCKET_GUARD_LOG"]
    ALLOWED_HOSTS = set(filter(None, os.environ.get("SOCKET_GUARD_ALLOW", "").split(",")))

    with open(LOG, "a") as handle:
        handle.write(f"loaded {os.getpid()}\\n")


    def _check(kind, family, address):
        host = address[0] if isinstance(address, tuple) else address
        if family == socket.AF_UNIX or host in ALLOWED_HOSTS:
            return
        with open(LOG, "a") as handle:
            handle.write(f"blocked {kind} {address!r}\\n")
        raise OSError(f"socket guard: {kind} to {address!r} blocked during the offline test")


    _connect, _connect_ex, _sendto = socket.socket.connect, socket.socket.connect_ex, socket.socket.sendto
    _getaddrinfo = socket.getaddrinfo


    def connect(self, address):
        _check("connect", self.family, address)
        return _connect(self, address)


    def connect_ex(self, address):
        _check("connect_ex", self.family, address)
        return _connect_ex(self, address)


    def sendto(self, data, *args):
        _check("sendto", self.family, args[-1])
        return _sendto(self, data, *args)


    def getaddrinfo(host, *args, **kwargs):
        if host is not None:
            _check("getaddrinfo", None, (host.decode() if isinstance(host, bytes) else host,))
        return _getaddrinfo(host, *args, **kwargs)


    socket.socket.connect, socket.socket.connect_ex, socket.socket.sendto = connect, connect_ex, sendto
    socket.getaddrinfo = getaddrinfo
''')

LOOPBACK = "127.0.0.1,::1,localhost"


def guarded_env(tmp_path: Path, allow: str) -> tuple[dict, Path]:
    guard_dir = tmp_path / "guard"
    guard_dir.mkdir(exist_ok=True)
    (guard_dir / "sitecustomize.py").write_text(GUARD)
    log = tmp_path / "socket_guard.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(guard_dir), str(REPO_ROOT / "src")]),
           "SOCKET_GUARD_LOG": str(log), "SOCKET_GUARD_ALLOW": allow, "CI": "1", "MPLBACKEND": "Agg",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return env, log


def test_socket_guard_blocks_and_records(tmp_path):
    """The guard itself: with loopback removed from the allowed hosts, a loopback connect is caught."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        env, log = guarded_env(tmp_path, allow="")
        raw = f"import socket; socket.socket().connect(('127.0.0.1', {port}))"
        resolved = f"import socket; socket.create_connection(('localhost', {port}), timeout=5)"
        results = [subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
                   for code in (raw, resolved)]
    for done in results:
        assert done.returncode != 0
        assert "socket guard" in done.stderr
    text = log.read_text()
    assert f"blocked connect ('127.0.0.1', {port})" in text
    assert "blocked getaddrinfo ('localhost',)" in text


def test_smoke_notebook_opens_no_network_socket(tmp_path):
    """Notebook 01 in the smoke profile, from an empty cache (tokenizer, training, figures), offline."""
    env, log = guarded_env(tmp_path, allow=LOOPBACK)
    env["GRADIENT_BOTTLENECK_CACHE"] = str(tmp_path / "cache")
    notebook = "01_vocabulary_gradients"
    command = [sys.executable, "-m", "papermill", "--log-level", "WARNING", "--kernel", "python3",
               str(REPO_ROOT / "notebooks" / f"{notebook}.ipynb"), str(tmp_path / f"{notebook}.ipynb"),
               "-f", str(REPO_ROOT / "profiles" / "smoke" / f"{notebook}.yaml"),
               "-p", "output_dir", str(tmp_path / "results")]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "results" / f"{notebook}.json").is_file()
    lines = log.read_text().splitlines()
    # papermill and the kernel both imported the guard.
    assert sum(line.startswith("loaded ") for line in lines) >= 2, lines
    assert [line for line in lines if line.startswith("blocked ")] == []
