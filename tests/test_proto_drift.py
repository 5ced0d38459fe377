"""The committed generated code is exactly what the pinned grpcio-tools makes of the proto."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
GENERATED = ("agent_pb2.py", "agent_pb2.pyi", "agent_pb2_grpc.py", "agent_pb2_grpc.pyi")


def test_generated_code_matches_the_proto(tmp_path: Path) -> None:
    bin_dir = Path(sys.executable).parent  # protoc-gen-mypy_grpc lives beside the interpreter
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    # the same command as `make proto`, into a temporary folder
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"--python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            f"--mypy_grpc_out={tmp_path}",
            str(PROTO_ROOT / "cmdgate/v1/agent.proto"),
        ],
        check=True,
        env=env,
        capture_output=True,
    )
    stale = [
        name
        for name in GENERATED
        if (tmp_path / "cmdgate/v1" / name).read_bytes()
        != (PROTO_ROOT / "cmdgate/v1" / name).read_bytes()
    ]
    assert stale == [], f"generated code is stale: {stale}; run `make proto` and commit"


def test_only_the_cmdgate_namespace_is_installed() -> None:
    top_level = importlib.metadata.distribution("cmdgate").read_text("top_level.txt")
    assert top_level is not None and top_level.split() == ["cmdgate"]


def test_agent_and_client_never_import_each_other() -> None:
    for side, other in (("agent", "client"), ("client", "agent")):
        for source in (ROOT / side).glob("*.py"):
            assert f"cmdgate.{other}" not in source.read_text(), source
