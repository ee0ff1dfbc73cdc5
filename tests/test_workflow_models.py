"""The shipped CoZ workflows tell ComfyUI where their models come from.

ComfyUI's frontend (``app.loadGraphData``) collects ``node.properties.models`` entries
(``name``, ``url``, ``directory``; the url is the key), looks for a file called ``name`` in the
model folder ``directory`` and lists the missing ones with their download in its dialog. So every
model a loader widget names needs such an entry, with the same name and folder the widget uses.
"""
from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import urlparse

import pytest

WORKFLOWS = Path(__file__).resolve().parent.parent / "workflows"
SENTINELS = {"none", "(from the SD3 model)"}  # "no file" choices of the loaders
# loader widget -> the model folder it lists (None: the value says it, "<folder>/<name>")
MODEL_WIDGETS = {
    "CoZLoadSD3": {"sd3": None, "coz_lora": "coz", "coz_vae_encoder": "coz", "clip_l": "text_encoders",
                   "clip_g": "text_encoders", "t5": "text_encoders"},
    "CoZLoadVLM": {"model": "LLM", "adapter": "LLM"},
}


def widget_values(node: dict) -> dict[str, object]:
    names = [i["widget"]["name"] for i in node.get("inputs", []) if i.get("widget")]
    assert len(names) == len(node["widgets_values"]), node["type"]
    return dict(zip(names, node["widgets_values"]))


@pytest.mark.parametrize("name", ["CoZ 2 - Zoom loop (SD3 and Qwen)", "CoZ 3 - All-in-one zoom (SD3 and Qwen)"])
def test_every_model_of_a_loader_has_its_download(name):
    workflow = json.loads((WORKFLOWS / f"{name}.json").read_text())
    loaders = [n for n in workflow["nodes"] if "Load" in n["type"] and n["type"] != "LoadImage"]
    assert {n["type"] for n in loaders} == set(MODEL_WIDGETS), "a loader without a model map here"
    checked = 0
    for node in loaders:
        entries = {(m["directory"], m["name"]): m for m in node["properties"].get("models", [])}
        for widget, folder in MODEL_WIDGETS[node["type"]].items():
            value = widget_values(node)[widget]
            if value in SENTINELS:
                continue
            if folder is None:
                folder, _, value = value.partition("/")
            entry = entries.get((folder, value))
            assert entry, f"{name}: {node['type']}.{widget} = {value!r} has no properties.models entry in {folder!r}"
            url = urlparse(entry["url"])
            assert url.scheme == "https" and url.netloc in ("huggingface.co", "github.com"), entry["url"]
            checked += 1
        assert len(entries) == len(node["properties"]["models"]), "duplicate entries"
    assert checked >= 4  # SD3, the CoZ LoRA and VAE encoder, the VLM


def test_ui_and_api_copies_name_the_same_models():
    for name in ("CoZ 2 - Zoom loop (SD3 and Qwen)", "CoZ 3 - All-in-one zoom (SD3 and Qwen)"):
        ui = json.loads((WORKFLOWS / f"{name}.json").read_text())
        api = json.loads((WORKFLOWS / "api" / f"{name}.json").read_text())
        for node in ui["nodes"]:
            if node["type"] in MODEL_WIDGETS:
                inputs = api[str(node["id"])]["inputs"]
                for widget in MODEL_WIDGETS[node["type"]]:
                    assert inputs[widget] == widget_values(node)[widget], (name, widget)
