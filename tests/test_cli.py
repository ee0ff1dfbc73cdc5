"""coz-zoom: outputs, manifest, folders and clear errors (model-free modes here; the default
backbone end to end is in test_default_chain.py)."""
import json
import re

import numpy as np
import torch
import pytest
from PIL import Image

from coz_core.cli import main, sample_image_path, show_notes


def test_sample_run_writes_everything(tmp_path):
    args = ["-o", str(tmp_path), "--mode", "bicubic", "--size", "64", "--steps", "3", "--quiet"]
    assert main(args + ["--center", "0.5,0.5"]) == 0
    out = tmp_path / "sample"
    for name in ["scale_0.png", "scale_3.png", "zoomed_1.png", "zoomed_3.png", "strip.png", "prompts.txt"]:
        assert (out / name).is_file(), name
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["mode"] == "bicubic" and manifest["input_size"] == [512, 512]
    assert [round(s["zoom"]) for s in manifest["steps"]] == [1, 4, 16, 64]
    # 64 // 64 = 1 pixel at left (64 - 1) // 2 = 31 of scale 0, 8 original pixels each
    assert manifest["steps"][3]["box"] == pytest.approx([248.0, 248.0, 256.0, 256.0])
    assert "torch" in manifest["versions"]
    assert Image.open(out / "scale_3.png").size == (64, 64)


def test_folder_with_odd_files(tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    Image.open(sample_image_path()).resize((90, 61)).save(src / "small.jpg")
    Image.fromarray((np.arange(40 * 50).reshape(40, 50) % 65536).astype(np.uint16)).save(src / "deep.png")
    (src / "broken.png").write_bytes(b"\x89PNG not really")
    (src / "readme.txt").write_text("ignored")
    rc = main([str(src), "-o", str(tmp_path / "out"), "--mode", "nearest", "--size", "32x48", "--steps", "2",
               "--quiet"])
    assert rc == 1  # one input failed, the others were written
    assert "broken.png" in capsys.readouterr().err
    assert Image.open(tmp_path / "out" / "small" / "scale_2.png").size == (32, 48)
    assert Image.open(tmp_path / "out" / "deep" / "scale_2.png").size == (32, 48)


@pytest.mark.parametrize("args,message", [
    (["missing.png"], "input not found"),
    (["--steps", "9", "--zoom", "4", "--size", "64", "--mode", "bicubic"], "too small"),
    (["--center", "2,0.5", "--mode", "bicubic"], "centre"),
])
def test_clear_errors(tmp_path, capsys, args, message):
    assert main(args + ["-o", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing half-written


def test_bad_size_argument(tmp_path):
    with pytest.raises(SystemExit):
        main(["-o", str(tmp_path), "--size", "big"])


def test_cli_runs_coz_sd3_from_a_diffusers_folder(tmp_path, tmp_path_factory):
    """Full CoZ from the shell on a tiny SD3 medium folder with CoZ weight files in the upstream formats."""
    from tests.sd3_fixtures import shared_tiny_sd3

    tiny = shared_tiny_sd3(tmp_path_factory)
    args = ["--sd3", str(tiny.folder), "--coz-lora", str(tiny.lora_pkl), "--coz-vae", str(tiny.vae_pt),
            "--size", "32", "--steps", "2", "--precision", "fp32", "--prompt", "fabric", "--quiet"]
    assert main(args + ["-o", str(tmp_path / "a")]) == 0
    manifest = json.loads((tmp_path / "a" / "sample" / "manifest.json").read_text())
    assert manifest["backbone"] == "coz-sd3"
    assert [s["prompts"] for s in manifest["steps"][1:]] == [["fabric"], ["fabric"]]
    assert main(args + ["-o", str(tmp_path / "b")]) == 0  # seeded: the same pixels again
    a = np.asarray(Image.open(tmp_path / "a" / "sample" / "scale_2.png"))
    b = np.asarray(Image.open(tmp_path / "b" / "sample" / "scale_2.png"))
    assert np.array_equal(a, b)
    assert main(args[:2] + ["--size", "40", "-o", str(tmp_path / "c")]) == 2  # not a multiple of 16


def test_cli_with_a_vlm_folder(tmp_path, tmp_path_factory):
    """Prompts written by a (tiny) Qwen2.5-VL folder reach the manifest and prompts.txt."""
    from tests.qwen_fixtures import shared_tiny_qwen

    folder = shared_tiny_qwen(tmp_path_factory)
    args = ["--vlm", str(folder), "--vlm-tokens", "6", "--size", "56", "--zoom", "2", "--steps", "2",
            "--precision", "fp32", "--prompt", "sharp", "--quiet", "-o", str(tmp_path)]
    assert main(args) == 0
    manifest = json.loads((tmp_path / "sample" / "manifest.json").read_text())
    prompts = [s["prompts"][0] for s in manifest["steps"][1:]]
    assert len(prompts) == 2 and all(p.endswith("sharp") or p.endswith("sharp,") for p in prompts)
    assert (tmp_path / "sample" / "prompts.txt").read_text().count("sharp") == 2
    assert manifest["prompt"] == {"type": "vlm_base", "model": str(folder), "adapter": None, "max_new_tokens": 6}
    assert main(["--vlm", str(tmp_path / "nowhere"), "-o", str(tmp_path / "x")]) == 2


class BicubicSR:
    """A cheap SR backbone for tests of everything around it."""

    name, size_multiple, uses_prompt = "bicubic-sr", 1, True

    def __call__(self, request):
        from coz_core.imageops import resize

        return resize(request.region, request.size, "bicubic").clamp(0, 1)


def test_cli_prompt_type_vlm_merges_the_grpo_adapter(tmp_path, tmp_path_factory, monkeypatch):
    """--prompt-type vlm: the tiny Qwen with an adapter in the released layout; the manifest says
    what ran, and the prompts differ from the plain model's."""
    import coz_core.cli as cli
    from tests.qwen_fixtures import shared_tiny_qwen, write_released_adapter

    monkeypatch.setattr(cli, "build_backbone", lambda *a: BicubicSR())
    folder = shared_tiny_qwen(tmp_path_factory)
    adapter = tmp_path / "VLM_LoRA" / "checkpoint-10000"
    tensors = write_released_adapter(folder, adapter, seed=2)
    args = ["--vlm", str(folder), "--size", "56", "--zoom", "2", "--steps", "1", "--precision", "fp32", "--quiet"]
    assert main(args + ["--prompt-type", "vlm", "--vlm-adapter", str(adapter), "-o", str(tmp_path / "a")]) == 0
    assert main(args + ["--prompt-type", "vlm_base", "-o", str(tmp_path / "b")]) == 0
    tuned = json.loads((tmp_path / "a" / "sample" / "manifest.json").read_text())
    plain = json.loads((tmp_path / "b" / "sample" / "manifest.json").read_text())
    assert tuned["prompt"]["type"] == "vlm" and tuned["prompt"]["max_new_tokens"] == 32  # upstream's default
    assert tuned["prompt"]["adapter"]["path"] == str(adapter)
    assert tuned["prompt"]["adapter"]["tensors"] == len(tensors) == 2 * tuned["prompt"]["adapter"]["modules"]
    assert plain["prompt"]["type"] == "vlm_base" and plain["prompt"]["adapter"] is None
    assert tuned["steps"][1]["prompts"] != plain["steps"][1]["prompts"]


@pytest.mark.parametrize("args,message", [
    (["--prompt-type", "vlm", "--vlm", "."], "'vlm' is Qwen2.5-VL with CoZ's GRPO prompt adapter.*--vlm-adapter"),
    (["--prompt-type", "vlm_base", "--vlm", ".", "--vlm-adapter", "."],
     "'vlm_base' is the plain.*leave the adapter out"),
    (["--prompt-type", "vlm_base"], "needs a Qwen2.5-VL-Instruct folder.*--vlm"),
    (["--vlm-adapter", "missing"], "'vlm' needs a Qwen2.5-VL-Instruct folder"),
    (["--prompt-type", "vlm", "--vlm", ".", "--vlm-adapter", "missing"], "missing is not a PEFT adapter folder"),
    (["--prompt-type", "fixed"], "'fixed' needs its texts.*--step-prompts"),
    (["--prompt-type", "none", "--step-prompts", "a|b"], "'none' uses no per-step texts"),
    (["--prompt-type", "fixed", "--step-prompts", "a", "--vlm", "."], "'fixed' uses no VLM"),
])
def test_prompt_type_errors_come_before_any_model_loads(tmp_path, capsys, monkeypatch, args, message):
    import coz_core.cli as cli

    monkeypatch.setattr(cli, "build_backbone", lambda *a: pytest.fail("loaded a backbone before checking prompts"))
    assert main(args + ["-o", str(tmp_path / "out"), "--quiet"]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_step_prompts_without_a_model(tmp_path):
    assert main(["--mode", "onestep", "--size", "64", "--steps", "3", "--step-prompts", "a|b",
                 "--quiet", "-o", str(tmp_path)]) == 0
    manifest = json.loads((tmp_path / "sample" / "manifest.json").read_text())
    assert [s["prompts"] for s in manifest["steps"][1:]] == [["a"], ["b"], ["b"]]
    assert manifest["prompt"] == {"type": "fixed", "texts": ["a", "b"]}


def test_coz_convert_writes_loadable_safetensors(tmp_path, tmp_path_factory, capsys):
    from safetensors.torch import load_file

    from coz_core.convert_cli import main as convert
    from coz_core.checkpoints import load_pickle_safely
    from tests.sd3_fixtures import shared_tiny_sd3

    tiny = shared_tiny_sd3(tmp_path_factory)
    assert convert(["--lora", str(tiny.lora_pkl), "--vae", str(tiny.vae_pt), "-o", str(tmp_path)]) == 0
    lora = load_file(str(tmp_path / f"{tiny.lora_pkl.stem}.safetensors"))
    assert len(lora) == len(tiny.lora_list)
    vae = load_file(str(tmp_path / f"{tiny.vae_pt.stem}.safetensors"))
    original = load_pickle_safely(tiny.vae_pt)
    assert vae.keys() == original.keys() and all(torch.equal(vae[k], original[k]) for k in vae)
    (tmp_path / "junk.pkl").write_bytes(b"not a pickle")
    assert convert(["--lora", str(tmp_path / "junk.pkl"), "-o", str(tmp_path)]) == 2
    assert "junk.pkl" in capsys.readouterr().err


def test_ctrl_c_keeps_the_scales_already_made(tmp_path, monkeypatch, capsys):
    import coz_core.cli as cli
    from coz_core.imageops import resize

    class InterruptedAtStep2:
        name, size_multiple, uses_prompt = "interrupted", 1, False
        calls = 0

        def __call__(self, request):
            self.calls += 1
            if self.calls == 2:
                raise KeyboardInterrupt
            return resize(request.region, request.size, "bicubic").clamp(0, 1)

    monkeypatch.setattr(cli, "build_backbone", lambda *a: InterruptedAtStep2())
    assert main(["--size", "64", "--steps", "4", "--quiet", "-o", str(tmp_path)]) == 130
    assert "interrupted" in capsys.readouterr().err
    manifest = json.loads((tmp_path / "sample" / "manifest.json").read_text())
    assert manifest["cancelled"] is True and len(manifest["steps"]) == 2
    assert manifest["prompt"] == {"type": "none"}
    assert (tmp_path / "sample" / "scale_1.png").is_file() and not (tmp_path / "sample" / "scale_2.png").exists()


def test_the_library_notes_reach_stderr_unless_quiet(tmp_path, capsys):
    # one-time compilation is announced through coz_core's log (INFO); the CLIs print it as theirs
    import logging

    import coz_core.upscale_cli as upscale_cli

    note = logging.getLogger("coz_core.sr.coz_sd3")
    try:
        for _ in range(2):  # set up twice: still one line per note
            assert main(["--vlm", str(tmp_path / "nowhere"), "-o", str(tmp_path / "x")]) == 2
        capsys.readouterr()
        note.info("compiled on first use")
        assert capsys.readouterr().err == "coz-zoom: compiled on first use\n"
        assert upscale_cli.main([str(tmp_path / "nowhere.png"), "-o", str(tmp_path / "y")]) == 2
        capsys.readouterr()
        note.info("compiled on first use")
        assert capsys.readouterr().err == "coz-upscale: compiled on first use\n"
        assert main(["--vlm", str(tmp_path / "nowhere"), "-o", str(tmp_path / "x"), "--quiet"]) == 2
        capsys.readouterr()
        note.info("compiled on first use")
        assert capsys.readouterr().err == ""
    finally:
        show_notes("coz-zoom", quiet=True)  # no handler left for the other tests
