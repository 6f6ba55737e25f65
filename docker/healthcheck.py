"""Container health check: exit status 0 when URL answers 200 within 2 s.

    python healthcheck.py [URL]

Without a URL, what the container runs decides what must answer: the gateway's /healthz on
REASONREC_PORT (the image's default command), vLLM's /health on its --port for
`serve_vllm.py`, the trainer's /metrics on REASONREC_TRAINER_METRICS_PORT for `reasonrec
trainer`. Python rather than curl: the image has Python and no curl.
"""

import os
import sys
import urllib.request
from pathlib import Path


def default_url(command: list[str]) -> str:
    """The URL that answers for a container running `command` (its first process's arguments;
    behind an init such as tini they follow the init's own)."""
    if any(arg.endswith("serve_vllm.py") for arg in command):
        port = command[command.index("--port") + 1] if "--port" in command[:-1] else "8000"
        return f"http://127.0.0.1:{port}/health"
    if "trainer" in command:
        port = os.environ.get("REASONREC_TRAINER_METRICS_PORT", "9101")
        return f"http://127.0.0.1:{port}/metrics"
    return f"http://127.0.0.1:{os.environ.get('REASONREC_PORT', '8000')}/healthz"


def running() -> list[str]:
    try:
        raw = Path("/proc/1/cmdline").read_bytes()
    except OSError:
        return []
    return [arg.decode(errors="replace") for arg in raw.split(b"\0") if arg]


def main(argv: list[str]) -> int:
    url = argv[0] if argv else default_url(running())
    try:
        with urllib.request.urlopen(url, timeout=2):  # other statuses raise HTTPError
            return 0
    except OSError as exc:
        print(f"{url}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
