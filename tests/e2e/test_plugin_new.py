"""`openlora plugin new`: for each world, the generated crate — created outside the repository —
passes its own tests, builds for wasm32-wasip2 and passes `openlora plugin check`, as generated."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import BINARY, ROOT

CONFIGS = {
    "router": '{"priority_tenants": ["acme"]}',
    "pricer": '{"currency": "EUR", "prompt_per_1k": 50000, "completion_per_1k": 150000}',
    "attributor": '{"payees": {"contributor:bob": 3, "contributor:carol": 1}}',
}


@pytest.mark.parametrize("world,sdk_copy", [("router", False), ("pricer", False), ("attributor", True)])
def test_a_new_plugin_builds_tests_and_checks_as_generated(world: str, sdk_copy: bool, tmp_path: Path):
    # One target folder for the three, so the SDK's dependencies build once.
    env = {**os.environ, "CARGO_TARGET_DIR": str(ROOT / "target" / "plugin-new")}
    name = f"my-{world}"
    sdk = []
    if sdk_copy:
        # A copy of the SDK folder, outside any checkout, builds too.
        shutil.copytree(ROOT / "sdk", tmp_path / "vendored-sdk")
        sdk = ["--sdk", str(tmp_path / "vendored-sdk")]
    made = subprocess.run([str(BINARY), "plugin", "new", "--world", world, name, *sdk], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    crate = tmp_path / name
    assert not str(crate.resolve()).startswith(str(ROOT.resolve())), "generated outside the repository"
    for cmd in (["cargo", "test", "--quiet"], ["cargo", "build", "--quiet", "--release", "--target", "wasm32-wasip2"]):
        done = subprocess.run(cmd, cwd=crate, env=env, capture_output=True, text=True, timeout=1200)
        assert done.returncode == 0, f"{cmd}: {done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    wasm = ROOT / "target" / "plugin-new" / "wasm32-wasip2" / "release" / f"{name.replace('-', '_')}.wasm"
    checked = subprocess.run([str(BINARY), "plugin", "check", str(wasm), "--world", world, "--plugin-config", CONFIGS[world]],
                             capture_output=True, text=True, timeout=120)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "ok: every sample gave a valid, replayable decision" in checked.stdout, checked.stdout
    # A second `plugin new` into the same folder changes nothing.
    again = subprocess.run([str(BINARY), "plugin", "new", "--world", world, name], cwd=tmp_path,
                           capture_output=True, text=True, timeout=60)
    assert again.returncode != 0 and "not empty" in again.stderr, again.stderr
