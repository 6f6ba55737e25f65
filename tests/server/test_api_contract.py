"""The OpenAPI document is the truth: schemathesis, every check, against `reasonrec serve` on the
test's Redis, with API and admin keys set. Its config (tests/server/api_contract/) lists the one
rule a JSON schema cannot state and the generator hook for the time window."""

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent / "api_contract"
SCHEMATHESIS = str(Path(sys.executable).parent / "schemathesis")


def test_every_operation_keeps_to_its_openapi_document(live_server, tmp_path):
    url = live_server(REASONREC_API_KEYS="k1", REASONREC_ADMIN_KEYS="adm")
    command = [
        SCHEMATHESIS,
        "--config-file",
        str(HERE / "schemathesis.toml"),
        "run",
        f"{url}/openapi.json",
        *("--checks", "all"),
        *("--max-examples", "40"),
        *("--seed", "13"),
        *("--header", "Authorization: Bearer adm"),
        "--no-color",
    ]
    # The hooks module is imported by name: from the repository root.
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=600, cwd=HERE.parents[2]
    )
    report = result.stdout[-6000:] + result.stderr[-2000:]
    assert result.returncode == 0, report
    assert " passed" in result.stdout and "failures" not in result.stdout.split("SUMMARY")[-1], (
        report
    )
