"""A real ComfyUI server for the integration tests (COMFYUI_PATH = a ComfyUI checkout,
COMFYUI_PYTHON = the python of its environment, default this one).

The server runs on 127.0.0.1 with --cpu in a temporary base directory whose custom_nodes holds
a link to this pack, whose input holds the pack's sample image and whose models folder the tests
fill. Large allocations are returned to the OS when freed (fixed malloc mmap threshold), so the
server's RSS follows the memory it holds.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMFYUI_PATH = os.environ.get("COMFYUI_PATH")
COMFYUI_PYTHON = os.environ.get("COMFYUI_PYTHON", sys.executable)
SAMPLE_NAME = "coz_sample.png"  # what the shipped workflows load


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_base_dir(base: Path) -> Path:
    """custom_nodes/<pack> -> this repo, an empty input/ (the pack puts its sample there), empty models/."""
    (base / "custom_nodes").mkdir(parents=True, exist_ok=True)
    link = base / "custom_nodes" / "comfyui-chain-of-zoom"
    if not link.exists():
        link.symlink_to(ROOT, target_is_directory=True)
    (base / "input").mkdir(exist_ok=True)
    (base / "models").mkdir(exist_ok=True)
    return base


class ComfyServer:
    def __init__(self, base: Path, extra_args: tuple[str, ...] = ()) -> None:
        self.base = base
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = base / f"server-{self.port}.log"
        env = dict(os.environ, PYTHONUNBUFFERED="1", MALLOC_MMAP_THRESHOLD_="131072",
                   HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        cmd = [COMFYUI_PYTHON, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--base-directory", str(base), "--disable-api-nodes", "--disable-auto-launch", *extra_args]
        self.proc = subprocess.Popen(cmd, cwd=COMFYUI_PATH, env=env, stdout=self.log.open("w"),
                                     stderr=subprocess.STDOUT)
        self._wait_ready(180)

    def _wait_ready(self, timeout: float) -> None:
        end = time.time() + timeout
        while time.time() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited during startup:\n{self.log.read_text()[-4000:]}")
            try:
                self.get("/system_stats")
                return
            except OSError:
                time.sleep(0.5)
        raise TimeoutError(f"ComfyUI did not answer within {timeout} s:\n{self.log.read_text()[-4000:]}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    # --- HTTP ---------------------------------------------------------------------------------

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=120) as r:
            return json.loads(r.read() or b"null")

    def post(self, path: str, data=None):
        req = urllib.request.Request(self.url + path, data=json.dumps(data or {}).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                raw = r.read()
                return json.loads(raw) if raw else None
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"POST {path} -> {e.code}: {e.read().decode(errors='replace')[:4000]}") from e

    def submit(self, prompt: dict) -> str:
        return self.post("/prompt", {"prompt": prompt, "client_id": uuid.uuid4().hex})["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 300) -> dict:
        """The history entry once the prompt finished (status, outputs, messages)."""
        end = time.time() + timeout
        while time.time() < end:
            entry = self.get(f"/history/{prompt_id}").get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None and (
                    entry["status"].get("status_str") in ("success", "error")):
                return entry
            time.sleep(0.2)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout} s")

    def run(self, prompt: dict, timeout: float = 300) -> dict:
        entry = self.wait(self.submit(prompt), timeout)
        if entry["status"]["status_str"] != "success":
            raise AssertionError(f"prompt failed: {json.dumps(entry['status'])[:6000]}")
        return entry

    def rss(self) -> int:
        """Resident memory of the server process, bytes."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")


def output_files(entry: dict, node_id: str) -> list[str]:
    return [i["filename"] for i in entry["outputs"].get(node_id, {}).get("images", [])]


def loop_prompt(steps: int, size: int, zoom: float = 2.0) -> dict:
    """Load Image -> Zoom Loop Start -> ComfyUI's Image Sharpen -> Zoom Loop End -> Preview."""
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": SAMPLE_NAME}},
        "2": {"class_type": "CoZZoomLoopStart", "inputs": {
            "image": ["1", 0], "steps": steps, "zoom": zoom, "width": size, "height": size,
            "center_x": 0.5, "center_y": 0.5}},
        "3": {"class_type": "ImageSharpen", "inputs": {"image": ["2", 2], "sharpen_radius": 1, "sigma": 1.0,
                                                       "alpha": 0.5}},
        "4": {"class_type": "CoZZoomLoopEnd", "inputs": {"loop": ["2", 0], "image": ["3", 0]}},
        "5": {"class_type": "ImageScale", "inputs": {"image": ["4", 1], "upscale_method": "nearest-exact",
                                                     "width": 32, "height": 32, "crop": "disabled"}},
        "6": {"class_type": "PreviewImage", "inputs": {"images": ["5", 0]}},
    }
