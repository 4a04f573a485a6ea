"""examples/clients against a live server on the embedded model: the curl script and the
`openai` client example run and print billing."""

import os
import subprocess
import sys

from conftest import ROOT, Server


def test_client_examples_run_against_the_embedded_model():
    s = Server.embedded()
    try:
        env = {**os.environ, "OPENLORA_URL": s.url}
        curl = subprocess.run(["bash", str(ROOT / "examples/clients/curl.sh")], env=env, capture_output=True,
                              text=True, timeout=120)
        assert curl.returncode == 0, curl.stderr
        assert '"billing"' in curl.stdout and "data: [DONE]" in curl.stdout, curl.stdout[-2000:]
        py = subprocess.run([sys.executable, str(ROOT / "examples/clients/openai_client.py"), "--url", s.url],
                            capture_output=True, text=True, timeout=120)
        assert py.returncode == 0, py.stderr
        assert "billing:" in py.stdout and "owner:trekkie" in py.stdout, py.stdout
    finally:
        assert s.stop() == 0, s.logs()
