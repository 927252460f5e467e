"""The OpenAPI document validates, and a bounded schemathesis run with every check against a real server with keys
set finds no 5xx, no response that breaks the document, no wrong status and no refused key ignored. Loopback only;
bounded in examples and time."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
from openapi_spec_validator import validate

from tests.helpers.data import DATA, cpu_settings, ingest_records, read_jsonl
from tests.helpers.server import RunningServer

# What the API answers beyond the checks' defaults, by design (README, "Errors"): 422 is a body against the schema,
# 400 an input the schema cannot state (repeated ids in one upsert, both or neither of similar's id and text, a
# dimension the model lacks, a blank query, k over server.max_k), 413 a request over the server's size limits. A
# response-time limit would assert wall-clock time on a shared machine: it is the request timeout instead. A
# similar request's 404 names the document of its body, which a collection just created does not hold: the
# resource-availability check reads any 404 after a create as the collection lost, so it skips that operation
# (every check is enabled here rather than by --checks all, which would override that one exception).
SCHEMATHESIS_CONFIG = """
[checks]
enabled = true
max_response_time = 60

[checks.positive_data_acceptance]
expected-statuses = ["2xx", "3xx", "400", "401", "403", "404", "409", "413", "429", "5xx"]

[checks.negative_data_rejection]
expected-statuses = ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429", "5xx"]

[[operations]]
include-path = "/collections/{collection}/similar"
checks.ensure_resource_availability.enabled = false
"""


def test_openapi_document_validates_and_survives_schemathesis(tmp_path):
    ingest_records(tmp_path, read_jsonl(DATA / "dbpedia" / "corpus.jsonl", limit=30))
    settings = cpu_settings()
    settings.data_dir = tmp_path / "data"
    settings.server.max_documents_per_request = 20
    settings.server.api_key, settings.server.read_api_key = "w", "r"
    config = tmp_path / "schemathesis.toml"
    config.write_text(SCHEMATHESIS_CONFIG)
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
                "--config-file",
                str(config),
                "run",
                f"{running.url}/openapi.json",
                "--header",
                "Authorization: Bearer w",
                "--max-examples",
                "5",
                "--max-time",
                "45",
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
