"""The pack inside a real ComfyUI (skipped unless COMFYUI_PATH points to a checkout):
registration in /object_info, the shipped workflows through the HTTP API, the loop under the
default and LRU caches with its memory per iteration, cancellation mid-chain, and the UI
workflows in the real frontend (headless Chromium)."""
from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from comfy_fixtures import (COMFYUI_PATH, COMFYUI_PYTHON, ROOT, SAMPLE_NAME, ComfyServer, loop_prompt,
                            make_base_dir, output_files)
from node_fixtures import load_pack

pytestmark = pytest.mark.skipif(not COMFYUI_PATH, reason="set COMFYUI_PATH to a ComfyUI checkout")

WORKFLOWS = ROOT / "workflows"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_base_dir(tmp_path_factory.mktemp("comfy"))


@pytest.fixture(scope="module")
def server(base):
    s = ComfyServer(base)
    yield s
    s.stop()


def test_every_node_is_registered_with_its_types(server):
    assert {"coz", "LLM", "diffusers", "upscale_models"} <= set(server.get("/models"))  # model folders
    info = server.get("/object_info")
    pack = load_pack()
    for key, cls in pack.NODE_CLASS_MAPPINGS.items():
        assert key in info, f"{key} missing from /object_info"
        entry = info[key]
        assert entry["category"].startswith("CoZ/") and entry["display_name"] == pack.NODE_DISPLAY_NAME_MAPPINGS[key]
        assert entry["description"] == cls.DESCRIPTION
        assert tuple(entry["output"]) == tuple(cls.RETURN_TYPES)
        assert tuple(entry["output_name"]) == tuple(cls.RETURN_NAMES)
        spec = cls.INPUT_TYPES()
        for group in ("required", "optional"):
            for name, (kind, *opts) in spec.get(group, {}).items():
                served = entry["input"][group][name]
                if isinstance(kind, list):  # a choice; file lists depend on the models folder
                    assert isinstance(served[0], list), f"{key}.{name}"
                else:
                    assert served[0] == kind, f"{key}.{name}"
                assert served[1]["tooltip"] == opts[0]["tooltip"]


HOST_PROBE = """
import sys
sys.path.insert(0, sys.argv[1])
import comfy.options
from comfy.cli_args import args
args.cpu = True  # as the server runs here
import comfy.model_management as mm, folder_paths, torch
from node_fixtures import load_pack
load_pack()
from coz_pack.nodes import host
assert host.IN_COMFY
assert {"coz", "LLM"} <= set(folder_paths.folder_names_and_paths)
from coz_pack.coz_core import policy
assert host.torch_device() == mm.get_torch_device()  # --cpu
assert host.pick_dtype("auto") == policy.auto_dtype(torch.device("cpu"))  # one policy with the CLI
from transformers import AutoTokenizer, CLIPTokenizer
tok = host.host_tokenizers()
assert CLIPTokenizer.from_pretrained(str(tok["clip_g"]))("a cat").input_ids[0] == 49406
assert AutoTokenizer.from_pretrained(str(tok["t5"]))("a cat").input_ids[-1] == 1
# the VLM node's model: its fast path's device memory (caches, graphs) is dropped when ComfyUI unloads it
import tempfile
from pathlib import Path
from qwen_fixtures import make_tiny_qwen
from coz_pack.nodes.vlm import LoadVLM
llm = Path(tempfile.mkdtemp())
make_tiny_qwen(llm / "tiny-qwen")
folder_paths.add_model_folder_path("LLM", str(llm))
source, _ = LoadVLM().load("tiny-qwen", "none", "fp32", 16)
host.load_all(source.managed)
source.vlm._cache = "device state"
mm.unload_all_models()
assert source.vlm._cache is None, "not released on unload"
bar = host.Progress(3)
bar.update(1, preview=torch.rand(1, 8, 8, 3))
mm.interrupt_current_processing(True)
try:
    bar.update(2)
    raise SystemExit("no interrupt")
except mm.InterruptProcessingException:
    print("host ok")
"""


def test_host_adapter_inside_comfy():
    """nodes/host.py with ComfyUI importable: its device, dtype, folders, tokenizers, the VLM's
    device memory released when ComfyUI unloads it, and the progress bar raising ComfyUI's interrupt."""
    out = subprocess.run([COMFYUI_PYTHON, "-c", HOST_PROBE, str(Path(__file__).parent)], cwd=COMFYUI_PATH,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "host ok" in out.stdout, out.stdout[-2000:] + out.stderr[-4000:]


@pytest.mark.parametrize("cache", ["default", "lru"])
def test_loop_under_each_cache_and_its_memory_per_iteration(base, cache):
    """The loop runs and repeats its body under ComfyUI's default and LRU caches; the server's
    memory grows per iteration by about the tensors the executor keeps (scale, the body's
    intermediates, the scale's slice of the output batch), not more."""
    s = ComfyServer(base, ("--cache-lru", "10") if cache == "lru" else ())
    try:
        size = 768
        image_bytes = size * size * 3 * 4
        s.run(loop_prompt(1, size))  # warm up (imports, first allocations)
        s.run(loop_prompt(2, size))
        rss = {}
        for steps in (2, 10):
            s.run(loop_prompt(steps, size + 8))  # another size: nothing cached from before
            entry = s.run(loop_prompt(steps, size))
            rss[steps] = s.rss()
            assert len(output_files(entry, "6")) == steps + 1  # all scales, one batch
        per_iteration = (rss[10] - rss[2]) / 8
        ratio = per_iteration / image_bytes
        print(f"\n[{cache}] RSS per loop iteration: {per_iteration / 2**20:.1f} MiB = {ratio:.2f} scales "
              f"of {size}x{size}")
        # the executor's cache holds 3 scales per iteration here (the kept scale, Image Sharpen's
        # input = the zoomed input, the scale's slice of the output batch; the region is a view);
        # the rest is the allocator's and the server's own bookkeeping
        assert 2.5 < ratio < 6
        # the repeated prompt is served from the cache: nothing runs again
        t = time.time()
        entry = s.run(loop_prompt(10, size))
        assert time.time() - t < 2 and entry["status"]["status_str"] == "success"
    finally:
        s.stop()


def test_comfy_upscale_model_in_the_loop_body_and_as_backbone(server, base):
    """ComfyUI's own Load Upscale Model (spandrel) on the pack's converted Real-ESRGAN file: as the
    loop body (Upscale Image (using Model) on the native crop) and through the adapter node in the
    all-in-one chain; both give every scale at the process size."""
    load_pack()
    from coz_pack.coz_core.sr.realesrgan import ensure_converted

    name = ensure_converted("animevideov3", base / "models" / "upscale_models").name
    prompt = {
        "1": {"class_type": "LoadImage", "inputs": {"image": SAMPLE_NAME}},
        "2": {"class_type": "UpscaleModelLoader", "inputs": {"model_name": name}},
        "3": {"class_type": "CoZZoomLoopStart", "inputs": {
            "image": ["1", 0], "steps": 2, "zoom": 2.0, "width": 48, "height": 48, "center_x": 0.34, "center_y": 0.75}},
        "4": {"class_type": "ImageUpscaleWithModel", "inputs": {"upscale_model": ["2", 0], "image": ["3", 3]}},
        "5": {"class_type": "CoZZoomLoopEnd", "inputs": {"loop": ["3", 0], "image": ["4", 0]}},
        "6": {"class_type": "SaveImage", "inputs": {"images": ["5", 1], "filename_prefix": "body"}},
        "7": {"class_type": "CoZUpscaleModelToSR", "inputs": {"upscale_model": ["2", 0], "tile": 0}},
        "8": {"class_type": "CoZZoomChain", "inputs": {
            "image": ["1", 0], "sr_model": ["7", 0], "mode": "recursive", "steps": 2, "zoom": 4.0, "width": 48,
            "height": 48, "center_x": 0.34, "center_y": 0.75, "color": "wavelet", "user_prompt": "", "seed": 0}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 1], "filename_prefix": "adapter"}},
    }
    entry = server.run(prompt)
    for node in ("6", "9"):
        files = entry["outputs"][node]["images"]
        assert len(files) == 3
        with Image.open(base / "output" / files[-1]["filename"]) as im:
            assert im.size == (48, 48)


@pytest.fixture(scope="module")
def tiny_sd3(base, tmp_path_factory):
    """The tiny SD3 in the real file layouts, placed in the server's models folder."""
    from tests.sd3_fixtures import shared_tiny_sd3
    from test_nodes_sd3 import place_tiny_sd3

    place_tiny_sd3(shared_tiny_sd3(tmp_path_factory), base / "models")
    return "diffusers/sd3-tiny"


def test_sd3_model_under_comfy_model_management(server, base, tiny_sd3):
    """The SD3 loader's modules go through ComfyUI's ModelPatcher / load_models_gpu: the loop with
    SR Step -> Color Fix in the body and the all-in-one chain, on the same loaded model."""
    own = "(from the SD3 model)"
    prompt = {
        "1": {"class_type": "LoadImage", "inputs": {"image": SAMPLE_NAME}},
        "2": {"class_type": "CoZLoadSD3", "inputs": {
            "sd3": tiny_sd3, "coz_lora": "model_20001.pkl", "coz_vae_encoder": "vae_encoder_20001.pt",
            "clip_l": own, "clip_g": own, "t5": own, "use_t5": True, "text_encoders": True, "precision": "fp32"}},
        "3": {"class_type": "CoZZoomLoopStart", "inputs": {
            "image": ["1", 0], "steps": 2, "zoom": 2.0, "width": 32, "height": 32, "center_x": 0.5, "center_y": 0.5}},
        "4": {"class_type": "CoZSRStep", "inputs": {"sr_model": ["2", 0], "zoomed": ["3", 2], "region": ["3", 3],
                                                    "prompt": "a photo", "seed": 1}},
        "5": {"class_type": "CoZColorFix", "inputs": {"image": ["4", 0], "reference": ["3", 2], "method": "adain"}},
        "6": {"class_type": "CoZZoomLoopEnd", "inputs": {"loop": ["3", 0], "image": ["5", 0]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 1], "filename_prefix": "sd3_loop"}},
        "8": {"class_type": "CoZZoomChain", "inputs": {
            "image": ["1", 0], "sr_model": ["2", 0], "mode": "recursive", "steps": 2, "zoom": 2.0, "width": 32,
            "height": 32, "center_x": 0.5, "center_y": 0.5, "color": "wavelet", "user_prompt": "a photo", "seed": 1}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 1], "filename_prefix": "sd3_chain"}},
    }
    entry = server.run(prompt)
    assert len(entry["outputs"]["7"]["images"]) == 3 and len(entry["outputs"]["9"]["images"]) == 3
    assert "Requested to load" in server.log.read_text()  # ComfyUI's model management loaded it


@pytest.mark.parametrize("cache", ["classic", "lru:10"])
def test_loop_cache_holds_exactly_what_it_must(base, cache):
    """In ComfyUI's own executor, the bytes its output cache holds grow per loop iteration by the
    new scale, Image Sharpen's input (the zoomed input: ComfyUI keeps every node's outputs) and the
    scale's slice of the output batch: 3 images. The loop's own state adds nothing."""
    size = 256
    out = subprocess.run([COMFYUI_PYTHON, str(Path(__file__).parent / "comfy_cache_probe.py"), cache, "2", "10"],
                         cwd=COMFYUI_PATH, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "COZ_PACK": str(ROOT), "COZ_INPUT": str(base / "input"),
                              "COZ_SIZE": str(size)})
    assert out.returncode == 0, out.stderr[-4000:]
    held = json.loads(out.stdout.strip().splitlines()[-1])
    per_iteration = (held["10"] - held["2"]) / 8 / (size * size * 3 * 4)
    print(f"\n[{cache}] cache growth per loop iteration: {per_iteration:.3f} scales of {size}x{size}")
    assert per_iteration == pytest.approx(3.0, abs=0.05)


def chain_prompt(steps: int, size: int) -> dict:
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": SAMPLE_NAME}},
        "2": {"class_type": "CoZZoomChain", "inputs": {
            "image": ["1", 0], "mode": "bicubic", "steps": steps, "zoom": 1.05, "width": size, "height": size,
            "center_x": 0.5, "center_y": 0.5, "color": "wavelet", "user_prompt": "", "seed": 0}},
        "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}},
    }


def test_cancel_keeps_the_chains_finished_scales(server):
    """Zoom Chain returns the scales done when cancelled; the graph goes on with them."""
    steps = 64
    prompt_id = server.submit(chain_prompt(steps, 1536))
    time.sleep(3.0)
    server.post("/interrupt")
    entry = server.wait(prompt_id, 120)
    events = {name: data for name, data in entry["status"]["messages"]}
    assert "execution_success" in events and "execution_interrupted" not in events
    shown = len(entry["outputs"]["3"]["images"])  # PreviewImage of the last finished scale
    assert shown == 1


@pytest.mark.parametrize("what", ["loop"])
def test_cancel_stops_mid_chain(server, what):
    """The loop cannot hand back partial results: ComfyUI stops the run where the cancel lands."""
    prompt = loop_prompt(64, 1024, zoom=1.05)
    node = None
    t = time.time()
    prompt_id = server.submit(prompt)
    time.sleep(3.0)
    server.post("/interrupt")
    entry = server.wait(prompt_id, 120)
    elapsed = time.time() - t
    events = {name: data for name, data in entry["status"]["messages"]}
    assert "execution_interrupted" in events and "execution_success" not in events
    interrupted = events["execution_interrupted"]
    if node:
        assert interrupted["node_id"] == node  # inside the chain node, not before or after it
    else:
        assert interrupted["node_type"] in ("CoZZoomLoopEnd", "CoZZoomLoopStart", "ImageSharpen")
    assert "6" not in entry["outputs"] and "3" not in entry["outputs"]
    assert elapsed < 30


# the runs here (CPU, tiny models): smaller sizes, fewer steps, the tiny models' names
TINY_SD3 = {"sd3": "diffusers/sd3-tiny", "clip_l": "clip_l.safetensors", "clip_g": "clip_g.safetensors",
            "t5": "t5xxl_fp16.safetensors", "precision": "fp32"}
TINY_VLM = {"model": "qwen-tiny", "precision": "fp32", "max_new_tokens": 8}
RUN_SETTINGS = {
    "CoZ 1 - Offline zoom (Real-ESRGAN)": {"3": {"width": 64, "height": 64, "steps": 2}},
    "CoZ 2 - Zoom loop (SD3 and Qwen)": {"2": TINY_SD3, "3": TINY_VLM, "4": {"width": 64, "height": 64, "steps": 2}},
    "CoZ 3 - All-in-one zoom (SD3 and Qwen)": {"2": TINY_SD3, "3": TINY_VLM,
                                               "4": {"width": 64, "height": 64, "steps": 2}},
    "CoZ 4 - Mask through the zoom": {"4": {"width": 64, "height": 64, "steps": 2}, "7": {"fit_steps": 5}},
    "CoZ 6 - Zoom video": {"3": {"width": 64, "height": 64, "steps": 2}, "4": {"frames_per_step": 4}},
}


@pytest.fixture(scope="module")
def tiny_vlm(base):
    """A tiny Qwen2.5-VL folder in the server's models/LLM."""
    from tests.qwen_fixtures import make_tiny_qwen

    make_tiny_qwen(base / "models" / "LLM" / "qwen-tiny")
    return "qwen-tiny"


@pytest.mark.parametrize("name", sorted(RUN_SETTINGS))
def test_shipped_workflow_runs(server, base, tiny_sd3, tiny_vlm, name):
    """The API-format copy of a shipped workflow, as it is but smaller and with the tiny models,
    through the HTTP API (workflow 1 with the real embedded Real-ESRGAN)."""
    prompt = json.loads((WORKFLOWS / "api" / f"{name}.json").read_text())
    for node, inputs in RUN_SETTINGS[name].items():
        prompt[node]["inputs"].update(inputs)
    entry = server.run(prompt, timeout=600)
    steps = next(n["inputs"]["steps"] for n in prompt.values() if "steps" in n["inputs"])
    saved = [n for n, v in prompt.items() if v["class_type"] == "SaveImage"]
    videos = [n for n, v in prompt.items() if v["class_type"] == "SaveVideo"]
    assert saved or videos
    for node in saved:
        files = entry["outputs"][node]["images"]
        assert len(files) == steps + 1  # every scale
        for f in files:
            with Image.open(base / "output" / f["subfolder"] / f["filename"]) as im:
                assert im.size == (64, 64)
    for node in videos:  # ComfyUI's Save Video of CoZ Zoom Video's frames: steps x frames_per_step + 1
        import av

        (f,) = entry["outputs"][node]["images"]
        with av.open(str(base / "output" / f["subfolder"] / f["filename"])) as container:
            frames = list(container.decode(video=0))
        per_step = next(v["inputs"]["frames_per_step"] for v in prompt.values() if v["class_type"] == "CoZZoomVideo")
        assert len(frames) == steps * per_step + 1 and (frames[0].width, frames[0].height) == (64, 64)
    for node in (n for n, v in prompt.items() if v["class_type"] == "PreviewAny"):  # the prompts
        assert len(entry["outputs"][node]["text"][0].split("\n")) == steps


def test_whole_image_workflow_runs(server, base):
    """Workflow 05 through the HTTP API, on a 64 px copy of the sample (ComfyUI's own ImageScale)
    made x2: the saved image is 128 px and the prompts output holds one line per tile."""
    prompt = json.loads((WORKFLOWS / "api" / "CoZ 5 - Whole image upscale.json").read_text())
    prompt["99"] = {"class_type": "ImageScale", "inputs": {"image": ["1", 0], "upscale_method": "area",
                                                            "width": 64, "height": 64, "crop": "disabled"}}
    prompt["3"]["inputs"].update({"image": ["99", 0], "factor": "2", "tile": 64, "overlap": 16})
    entry = server.run(prompt, timeout=600)
    (saved,) = [n for n, v in prompt.items() if v["class_type"] == "SaveImage"]
    (f,) = entry["outputs"][saved]["images"]
    with Image.open(base / "output" / f["subfolder"] / f["filename"]) as im:
        assert im.size == (128, 128)
    for node in (n for n, v in prompt.items() if v["class_type"] == "PreviewAny"):  # one prompt per tile
        assert len(entry["outputs"][node]["text"][0].split("\n")) == 9  # 3 x 3 tiles of 64 with 16 overlap


def ui_workflows() -> list[Path]:
    return sorted(WORKFLOWS.glob("*.json"))


def test_ui_workflows_load_in_the_frontend(server, tmp_path):
    files = ui_workflows()
    assert files, "no UI workflows in workflows/"
    api = {p.stem for p in (WORKFLOWS / "api").glob("*.json")}
    assert {p.stem for p in files} == api, "every UI workflow has its API-format copy"
    assert all(p.with_suffix(".jpg").is_file() for p in files), "every UI workflow has a thumbnail"
    # the template browser lists them and serves their thumbnails
    assert sorted(server.get("/workflow_templates")["comfyui-chain-of-zoom"]) == [p.stem for p in files]
    for p in files:
        url = f"{server.url}/api/workflow_templates/comfyui-chain-of-zoom/{urllib.parse.quote(p.stem)}.jpg"
        with urllib.request.urlopen(url) as r:
            assert r.status == 200 and r.read(3) == b"\xff\xd8\xff"
    out = subprocess.run([COMFYUI_PYTHON, str(Path(__file__).parent / "comfy_browser.py"), server.url,
                          *map(str, files), "--screenshots", str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    for path, result in report.items():
        assert result["missing"] == [], f"{path}: missing node types {result['missing']}"
        # the missing-models dialog asks each properties.models url for its size: the browser here
        # reaches nothing outside the local server, so those requests (and only those) fail
        errors = [e for e in result["errors"] if not e.startswith("Error fetching file size")]
        assert errors == [], f"{path}: console errors {errors}"
        # these two name their model files
        if Path(path).stem in ("CoZ 2 - Zoom loop (SD3 and Qwen)", "CoZ 3 - All-in-one zoom (SD3 and Qwen)"):
            assert len(errors) < len(result["errors"]), "the missing-models dialog did not look at the models"
        assert result["nodes"] == len(json.loads(Path(path).read_text())["nodes"])
