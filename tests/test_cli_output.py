"""What the commands print and write (issue 23's newcomer run): presets in dymu flops, generate timings, encode
rows, announced settings, plurals, file modes."""

import json
import os
import shutil
from pathlib import Path

from dymu.cli import main


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_flops_takes_a_preset_name(capsys):
    """The FastV paper's 7B number from the preset's config, as from a folder holding it (tests/test_flops.py)."""
    code, out, err = run(capsys, "flops", "llava-1.5-7b", "--prompt-tokens", 36, "--prune", "fastv:k=3,r=0.5")
    assert code == 0, err
    assert "model: llava-1.5-7b: 32-layer decoder" in out and "56.27 GFLOPs vs 99.33 GFLOPs unmerged" in out


def test_generate_times_the_median_of_warm_runs_and_says_when_the_model_is_too_small(capsys, monkeypatch, tiny_llava_dir,
                                                                                     image_paths):
    import dymu.cli
    from transformers import GenerationMixin

    calls = []
    real_generate = GenerationMixin.generate

    def counted(self, *args, **kwargs):
        calls.append(1)
        return real_generate(self, *args, **kwargs)

    monkeypatch.setattr(GenerationMixin, "generate", counted)
    monkeypatch.setattr(dymu.cli, "SMALL_PREFILL_SECONDS", 1e6)  # whatever the machine's load
    common = ("generate", tiny_llava_dir, "--image", image_paths[0], "--prompt", "What?", "--max-new-tokens", 2,
              "--merge", "tome:r=2")
    code, out, _ = run(capsys, *common, "--compare")
    assert code == 0
    assert len(calls) == 2 * (dymu.cli.GENERATE_WARMUPS + dymu.cli.GENERATE_REPEATS) == 8
    assert out.count("(median of 3 runs after 1 warm-up)") == 2
    assert "fixed per-call costs dominate" in out
    monkeypatch.setattr(dymu.cli, "SMALL_PREFILL_SECONDS", 0)
    assert "fixed per-call costs" not in run(capsys, *common)[1]


def test_encode_rows_name_images_from_their_common_folder(capsys, model_dirs, image_dir, tmp_path):
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        shutil.copy(image_dir / "coins.png", tmp_path / sub / "x.png")
    code, out, err = run(capsys, "encode", model_dirs["tiny-clip"], tmp_path, "--merge", "tome:r=2", "--workers", 1)
    assert code == 0, err
    names = [line.split()[0] for line in out.splitlines()[1:3]]
    assert names == ["a/x.png", "b/x.png"]
    assert "(1 worker)" in err and "2 images in" in err


def test_json_and_out_report_an_unreadable_image_alike(capsys, model_dirs, image_dir, tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not a png")
    images = (image_dir / "coins.png", tmp_path / "bad.png")
    code, out, _ = run(capsys, "encode", model_dirs["tiny-clip"], *images, "--merge", "tome:r=2", "--json")
    assert code == 0
    assert run(capsys, "encode", model_dirs["tiny-clip"], *images, "--merge", "tome:r=2", "--out", tmp_path / "o.jsonl")[0] == 0
    printed = [json.loads(line) for line in out.splitlines()]
    header, *rows = [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert header["format"] == "dymu-encode" and printed == rows  # the file starts with its header line
    assert "error" in printed[1] and printed[1]["image"] == str(tmp_path / "bad.png")


def test_thresholds_from_config_json_are_announced(capsys, model_dirs, image_dir, tmp_path):
    model = Path(shutil.copytree(model_dirs["tiny-clip"], tmp_path / "model"))
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(config | {"dymu": {"thresholds": [0.9, 0.8, 0.7, None]}}))
    code, _, err = run(capsys, "encode", model, image_dir / "coins.png")
    assert code == 0
    assert [line for line in err.splitlines() if line.startswith("thresholds:")] == [
        f"thresholds: the \"dymu\" section of {model / 'config.json'} (pass --thresholds or --merge for others)"]
    code, _, err = run(capsys, "encode", model, image_dir / "coins.png", "--merge", "tome:r=2")
    assert code == 0 and "thresholds:" not in err


def test_make_model_files_follow_the_umask(tmp_path):
    from dymu.models import make_model

    previous = os.umask(0o022)
    try:
        folder = make_model("tiny-clip", tmp_path / "m", layers=1)
    finally:
        os.umask(previous)
    modes = {path.name: oct(path.stat().st_mode & 0o777) for path in folder.iterdir()}
    assert set(modes.values()) == {"0o644"}, modes
