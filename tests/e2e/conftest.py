"""Starts real `openlora serve` processes on loopback for the end-to-end tests."""

import io
import os
import signal
import socket
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
MODEL = FIXTURES / "models" / "gqa-llama3-f32"
ADAPTERS = FIXTURES / "adapters" / "gqa-llama3-f32"
ADAPTER_NAMES = ["r4-qv", "r8-mlp", "r16-all-rslora", "r64-ko-layer1"]
API_KEY = "sk-openlora-test"
ADMIN_TOKEN = "admin-token-for-tests-0123456789"
BINARY = Path(os.environ.get("OPENLORA_BIN", ROOT / "target" / "debug" / "openlora"))


def gpu_env() -> dict:
    """The environment a server on `cuda:0` runs in: `OPENLORA_CUDA_LIBS` names a folder of CUDA
    libraries (the stand-in's) to load first, and only that folder: another NVRTC on the path must
    not be the one loaded."""
    libs = os.environ.get("OPENLORA_CUDA_LIBS")
    return {"LD_LIBRARY_PATH": libs} if libs else {}


def gpu_server(**kw) -> "Server":
    """A `Server` on `cuda:0`; skips the test where no CUDA device (nor the stand-in) is present,
    unless `OPENLORA_REQUIRE_GPU` is set."""
    try:
        return Server(device="cuda:0", env=gpu_env(), **kw)
    except RuntimeError as e:
        if os.environ.get("OPENLORA_REQUIRE_GPU"):
            raise
        pytest.skip(f"no CUDA device: {str(e)[-300:]}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One `openlora serve` process with its own config and data directory."""

    def __init__(self, extra: str = "", config: str | None = None, device: str | None = None,
                 env: dict | None = None, top: str = "", **limits):
        self.device = device
        self.env = {**os.environ, **(env or {})}
        self.dir = Path(tempfile.mkdtemp(prefix="openlora-e2e-"))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        adapters = "\n".join(f'"{n}" = "{ADAPTERS / n}"' for n in ADAPTER_NAMES)
        lim = "\n".join(f"{k} = {v}" for k, v in limits.items())
        if config is None:
            config = f"""
model = "{MODEL}"
model_name = "base"
admin_token = "{ADMIN_TOKEN}"

[adapters]
{adapters}

[api_keys]
"{API_KEY}" = "acme"

[limits]
{lim}

{extra}
"""
        config = f'listen = "127.0.0.1:{self.port}"\ndata_dir = "{self.dir / "data"}"\n{top}\n' + config
        (self.dir / "openlora.toml").write_text(config)
        self.log = open(self.dir / "server.log", "w+")
        self.start()

    def start(self):
        """Starts the process (again, after a stop: same config, data and port) and waits until ready."""
        device = ["--device", self.device] if self.device else []
        self.proc = subprocess.Popen(
            [str(BINARY), "serve", "--config", str(self.dir / "openlora.toml"), *device],
            stdout=self.log, stderr=subprocess.STDOUT, env={**self.env, "OPENLORA_HOME": str(self.dir)},
        )
        deadline = time.time() + 60
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.logs()}")
            try:
                if httpx.get(f"{self.url}/ready", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"server not ready: {self.logs()}")

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        """Runs `openlora ARGS --config <this server's config>`."""
        return subprocess.run(
            [str(BINARY), *args, "--config", str(self.dir / "openlora.toml")],
            capture_output=True, text=True, timeout=120, env={**self.env, "OPENLORA_HOME": str(self.dir)},
        )

    @classmethod
    def embedded(cls, **kw) -> "Server":
        """A server on the embedded default model and demo adapters, no keys."""
        return cls(config=f'admin_token = "{ADMIN_TOKEN}"\n', **kw)

    def logs(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def metric(self, name: str, labels: str = "") -> float:
        """The value of one Prometheus sample (0 if absent)."""
        text = httpx.get(f"{self.url}/metrics").text
        key = f"{name}{{{labels}}}" if labels else name
        for line in text.splitlines():
            if line.startswith(key + " "):
                return float(line.split()[-1])
        return 0.0

    def stop(self, sig=signal.SIGTERM, timeout=30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)


def adapter_tar(src: Path, name: str, corrupt: bool = False) -> bytes:
    """The PEFT folder `src` as a tar upload under `name/` (`corrupt`: its weights cut in half)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for f in ["adapter_config.json", "adapter_model.safetensors"]:
            data = (src / f).read_bytes()
            if corrupt and f.endswith(".safetensors"):
                data = data[: len(data) // 2]
            info = tarfile.TarInfo(f"{name}/{f}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def plugin_wasm(package: str) -> bytes:
    """Builds a workspace plugin crate for wasm32-wasip2 (as the Rust tests do) and returns it."""
    target = ROOT / "target" / "plugin-wasm"
    subprocess.run(
        ["cargo", "build", "--locked", "--quiet", "--target", "wasm32-wasip2", "--profile", "plugin",
         "-p", package, "--target-dir", str(target)],
        cwd=ROOT, check=True,
    )
    return (target / "wasm32-wasip2" / "plugin" / f"{package.replace('-', '_')}.wasm").read_bytes()


@pytest.fixture(scope="session")
def server():
    s = Server(max_body_bytes=65536, max_prompt_tokens=200)
    yield s
    assert s.stop() == 0, s.logs()


@pytest.fixture
def fresh_server():
    """A server of the test's own, for tests that limit or stop it."""
    servers = []

    def make(**limits):
        s = Server(**limits)
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.stop(signal.SIGKILL)
