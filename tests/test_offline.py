"""Never touch the network unless asked: a dry run of hub-named teachers contacts no hub even
with HF_HUB_OFFLINE unset (the hub endpoint is pointed at a local socket that counts connections)."""
import os
import socket
import subprocess
import sys
import threading
import time

import yaml

RECIPE = {
    "output_dir": "unused",
    "student": {"name": "vit", "args": {"model": "vit_tiny", "depth": 2}, "resolution": 224},
    "teachers": {
        "clip": {"plugin": "clip", "args": {"model": "ViT-B-16", "pretrained": "openai"}},
        "dino": {"plugin": "dinov2", "args": {"model": "facebook/dinov2-small"}},
        "sam": {"plugin": "sam", "args": {"model": "facebook/sam-vit-base"}},
    },
    "data": {"source": {"name": "synthetic", "args": {}}, "batch_size": 2},
    "train": {"steps": 10},
}


class CountingServer:
    """A TCP listener on localhost that accepts and counts connections (answers nothing)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self._stop = True
        self._thread.join()
        self.sock.close()


def test_dry_run_of_hub_models_contacts_no_hub_even_online(tmp_path):
    recipe = tmp_path / "hub.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    server = CountingServer()
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    endpoint = f"http://127.0.0.1:{server.port}"
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(tmp_path / "hf_home"), OMP_NUM_THREADS="1",
               HF_HUB_ETAG_TIMEOUT="2", HF_HUB_DOWNLOAD_TIMEOUT="2")
    try:
        start = time.perf_counter()
        out = subprocess.run([sys.executable, "-m", "radio_core.run", str(recipe), "--dry-run", "--world-size", "2"],
                             env=env, capture_output=True, text=True, timeout=300)
        elapsed = time.perf_counter() - start
    finally:
        server.close()
    assert out.returncode == 0, out.stderr[-2000:]
    assert "teacher dino" in out.stdout and "teacher sam" in out.stdout and "teacher clip" in out.stdout
    assert server.connections == 0, f"{server.connections} connection(s) to the hub endpoint"
    assert endpoint not in out.stderr and "Retry" not in out.stderr
    assert elapsed < 120
