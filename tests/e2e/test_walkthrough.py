"""examples/attribution-plugin/README.md, run as a newcomer would: every ```bash block in order,
in one shell, with the `openlora` under test on PATH. Anything the walkthrough needs that it does
not say is a failure here."""

import os
import re
import subprocess
from pathlib import Path

from conftest import BINARY, ROOT

EXAMPLE = ROOT / "examples" / "attribution-plugin"


def bash_blocks(text: str) -> list[str]:
    return re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M)


def test_the_committed_crate_is_the_one_the_walkthrough_writes():
    text = (EXAMPLE / "README.md").read_text()
    lib = re.search(r"cat > src/lib.rs <<'EOF'\n(.*?)^EOF$", text, flags=re.S | re.M)
    assert lib, "the README writes src/lib.rs"
    assert lib.group(1) == (EXAMPLE / "src" / "lib.rs").read_text(), "README and src/lib.rs differ"


def test_the_walkthrough_runs_from_cargo_new_to_upload(tmp_path: Path):
    blocks = bash_blocks((EXAMPLE / "README.md").read_text())
    assert len(blocks) >= 8, blocks
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "openlora").symlink_to(BINARY.resolve())
    script = "set -euo pipefail\ntrap 'kill $(jobs -p) 2>/dev/null || true' EXIT\n" + "\n".join(blocks)
    (tmp_path / "walkthrough.sh").write_text(script)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "TMPDIR": str(scratch),
        "OPENLORA_HOME": str(tmp_path / "home"),
        "CARGO_TARGET_DIR": "",
    }
    env.pop("CARGO_TARGET_DIR")
    done = subprocess.run(
        ["bash", str(tmp_path / "walkthrough.sh")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200
    )
    assert done.returncode == 0, f"stdout:\n{done.stdout[-4000:]}\nstderr:\n{done.stderr[-4000:]}"
    assert "ok: every sample gave a valid, replayable decision" in done.stdout, done.stdout[-3000:]
    assert "owner:trekkie" in done.stdout and "dataset:fortunes" in done.stdout, done.stdout[-3000:]
