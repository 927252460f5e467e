"""The OpenAPI document validates, and a bounded schemathesis run against a real server finds no 5xx and no
response that breaks the document. Loopback only; bounded in examples and time."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
from openapi_spec_validator import validate

from indexer.pipeline import ingest_paths

from conftest import DATA, cpu_settings, read_jsonl, write_jsonl
from server import RunningServer


def test_openapi_document_validates_and_survives_schemathesis(tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", read_jsonl(DATA / "dbpedia" / "corpus.jsonl", limit=30))
    ingest_paths([corpus], tmp_path / "data", "default", cpu_settings(), model="minilm")
    settings = cpu_settings()
    settings.data_dir = tmp_path / "data"
    settings.server.max_documents_per_request = 20
    with RunningServer(settings) as running:
        spec = httpx.get(f"{running.url}/openapi.json").json()
        validate(spec)
        for path, operations in spec["paths"].items():
            for method, operation in operations.items():
                for status, response in operation["responses"].items():
                    content = response.get("content", {}).get("application/json", {})
                    assert "schema" in content or status == "200" and path == "/metrics", (method, path, status)
        st = shutil.which("st", path=os.path.dirname(sys.executable)) or "st"
        result = subprocess.run(
            [
                st,
                "run",
                f"{running.url}/openapi.json",
                "--checks",
                "not_a_server_error,response_schema_conformance",
                "--max-examples",
                "5",
                "--max-time",
                "60",
                "--seed",
                "7",
                "--request-timeout",
                "60",
                "--report-dir",
                str(tmp_path / "reports"),
            ],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=Path(tmp_path),
        )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    print(result.stdout[-3000:])
