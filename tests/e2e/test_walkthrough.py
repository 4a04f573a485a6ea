"""examples/attribution-plugin/README.md and examples/owner-walkthrough/README.md, run as a
newcomer would: every ```bash block in order, in one shell, with the `openlora` under test on
PATH. Anything a walkthrough needs that it does not say is a failure here."""

import ast
import os
import re
import subprocess
from pathlib import Path

from conftest import BINARY, ROOT

EXAMPLE = ROOT / "examples" / "attribution-plugin"
OWNERS = ROOT / "examples" / "owner-walkthrough"


def bash_blocks(text: str) -> list[str]:
    return re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M)


def test_the_committed_crate_is_the_one_the_walkthrough_writes():
    text = (EXAMPLE / "README.md").read_text()
    lib = re.search(r"cat > src/lib.rs <<'EOF'\n(.*?)^EOF$", text, flags=re.S | re.M)
    assert lib, "the README writes src/lib.rs"
    assert lib.group(1) == (EXAMPLE / "src" / "lib.rs").read_text(), "README and src/lib.rs differ"


def test_the_walkthrough_runs_from_cargo_new_to_upload(tmp_path: Path):
    done = run_walkthrough(EXAMPLE / "README.md", tmp_path, min_blocks=8)
    assert "ok: every sample gave a valid, replayable decision" in done.stdout, done.stdout[-3000:]
    assert "owner:trekkie" in done.stdout and "dataset:fortunes" in done.stdout, done.stdout[-3000:]


def run_walkthrough(readme: Path, tmp_path: Path, min_blocks: int) -> subprocess.CompletedProcess:
    """Every ```bash block of `readme`, in order, in one shell, from the checkout's root."""
    blocks = bash_blocks(readme.read_text())
    assert len(blocks) >= min_blocks, blocks
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "openlora").symlink_to(BINARY.resolve())
    script = "set -euo pipefail\ntrap 'kill $(jobs -p) 2>/dev/null || true' EXIT\n" + "\n".join(blocks)
    (tmp_path / "walkthrough.sh").write_text(script)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "TMPDIR": str(scratch),
           "OPENLORA_HOME": str(tmp_path / "home")}
    env.pop("CARGO_TARGET_DIR", None)
    done = subprocess.run(
        ["bash", str(tmp_path / "walkthrough.sh")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200
    )
    assert done.returncode == 0, f"stdout:\n{done.stdout[-4000:]}\nstderr:\n{done.stderr[-4000:]}"
    return done


def test_the_owner_walkthrough_runs_from_a_key_to_explain(tmp_path: Path):
    out = run_walkthrough(OWNERS / "README.md", tmp_path, min_blocks=12).stdout
    tail = out[-4000:]
    key = re.search(r"alice's key: (olk_[0-9a-f]{16})\.\.\. \(shown once\)", out)
    assert key, tail
    assert re.search(r"olk_[0-9a-f]{16}_[0-9a-f]{64}", out) is None, "no key is printed whole"
    assert "the pricer slot, to alice: 403" in out and "the adapter list, to bob: 403" in out, tail
    assert re.search(r"dry-run: checked 3 entries, 0 failed", out), tail
    assert "contributor:bob" in out and "contributor:carol" in out, tail
    assert "day,adapter,payee,currency,amount,requests" in out, tail
    assert re.search(r"explained to the tenant: charge \d+, owner's share \d+, divided as .*contributor:bob.*"
                     r"replayed exactly", out), tail
    assert "owner:alice" in out and "audit" in out.lower(), tail
    # The dry-run's totals are what the same three requests paid once installed.
    would = re.search(r"would pay: (\{.*\})", out)
    assert would, tail
    predicted = {k: v for k, v in ast.literal_eval(would.group(1)).items() if v}
    paid: dict = {}
    lines = [line for line in out.splitlines() if line.startswith("billed req-")]
    assert len(lines) == 6, lines
    assert not any("contributor:" in line for line in lines[:3]), "before the install the owner's share is whole"
    for line in lines[3:]:
        for payee, amount in ast.literal_eval(line[line.index("["):]):
            if payee.startswith("contributor:") or payee == "owner:alice":
                paid[payee] = paid.get(payee, 0) + amount
    assert {k: v for k, v in paid.items() if v} == predicted, (paid, predicted)


THRESHOLD = ROOT / "examples" / "threshold-attributor"


def test_the_threshold_walkthrough_predicts_from_the_ledger_what_the_plugin_pays(tmp_path: Path):
    out = run_walkthrough(THRESHOLD / "README.md", tmp_path, min_blocks=5).stdout
    assert "the prediction held for all 6 requests" in out, out[-3000:]
    assert "6 entries of adapter:poems: 6 run, 0 failed, 0 skipped" in out, out[-3000:]
