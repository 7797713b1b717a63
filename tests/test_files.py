"""The user's files (issue 23, items 1-8): nothing is cut, replaced, mixed or left behind without the user asking."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dymu.cli import main

SRC = str(Path(__file__).resolve().parents[1] / "src")


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_error(code, err, *fragments, status=2):
    assert code == status, err
    lines = [line for line in err.splitlines() if line.startswith("dymu ")]
    assert len(lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def thresholds(tmp_path_factory, model_dirs, image_paths):
    out = tmp_path_factory.mktemp("thr") / "clip.json"
    assert main(["find-thresholds", str(model_dirs["tiny-clip"]), *image_paths[:4], "--target-tokens", "250",
                 "--batch-size", "4", "--measure", "0", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def seed1_clip(tmp_path_factory):
    """A tiny-clip of the same shape as the session's, other weights."""
    from dymu.models import make_model

    return make_model("tiny-clip", tmp_path_factory.mktemp("seed1") / "tiny-clip", seed=1)


# 1. --resume on a file that is not ours changes nothing


@pytest.mark.parametrize("content", [
    b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01 binary without a final newline",
    b'{"format": "dymu-thresholds", "version": 1, "thresholds": [0.9, null]}',
    b'{"image": "a.png", "tokens": 3}\n{"image": "b.png", "tok',  # rows of an older dymu, last one cut
])
def test_encode_resume_on_a_foreign_file_leaves_it_whole(capsys, model_dirs, image_paths, thresholds, tmp_path, content):
    target = tmp_path / "some.file"
    target.write_bytes(content)
    result = run(capsys, "encode", model_dirs["tiny-clip"], image_paths[0], "--thresholds", thresholds, "--out", target,
                 "--resume")
    assert target.read_bytes() == content
    _one_line_error(*result[::2], "some.file", "not a file of dymu encode", "left unchanged")


def test_find_thresholds_resume_on_a_foreign_partial_leaves_it_whole(capsys, model_dirs, image_paths, tmp_path):
    partial = tmp_path / "t.json.partial"
    content = b'{"weights": "model.safetensors", "no newline": true}'
    partial.write_bytes(content)
    result = run(capsys, "find-thresholds", model_dirs["tiny-clip"], image_paths[0], "--target-tokens", "300",
                 "--measure", "0", "--out", tmp_path / "t.json", "--resume")
    assert partial.read_bytes() == content and not (tmp_path / "t.json").exists()
    _one_line_error(*result[::2], "t.json.partial", "left unchanged")


# 2. make-model --overwrite never deletes the user's folder


def test_make_model_overwrite_refuses_the_current_folder_and_a_folder_that_is_no_model(capsys, monkeypatch, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    (mine / "data").mkdir()
    (mine / "data" / "a.csv").write_text("1,2")
    before = _snapshot(mine)
    monkeypatch.chdir(mine)
    _one_line_error(*run(capsys, "make-model", "tiny-clip", ".", "--layers", "1", "--overwrite")[::2],
                    "current folder", "choose another folder")
    monkeypatch.chdir(tmp_path)
    _one_line_error(*run(capsys, "make-model", "tiny-clip", "mine", "--layers", "1", "--overwrite")[::2],
                    "mine", "no config.json", "no model checkpoint")
    assert _snapshot(mine) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"], "no temporary folder nor lock left"


def test_make_model_overwrite_that_fails_keeps_the_old_model(capsys, monkeypatch, tmp_path):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    folder = tmp_path / "model"
    assert run(capsys, "make-model", "tiny-clip", folder, "--layers", "1")[0] == 0
    before = _snapshot(folder)

    def full_disk(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(CLIPImageProcessorPil, "save_pretrained", full_disk)
    _one_line_error(*run(capsys, "make-model", "tiny-clip", folder, "--layers", "2", "--seed", "3", "--overwrite")[::2],
                    "No space left")
    assert _snapshot(folder) == before, "the old checkpoint is untouched"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"], "the half-built folder is gone"
    monkeypatch.undo()
    assert run(capsys, "make-model", "tiny-clip", folder, "--layers", "2", "--overwrite")[0] == 0
    assert json.loads((folder / "config.json").read_text())["num_hidden_layers"] == 2
    assert oct(folder.stat().st_mode & 0o777) == oct(0o777 & ~_umask()), "an ordinary folder, not mkdtemp's 0700"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_make_model_into_the_empty_current_folder(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert run(capsys, "make-model", "tiny-clip", ".", "--layers", "1")[0] == 0
    assert (tmp_path / "config.json").is_file()
    assert [p.name for p in tmp_path.parent.iterdir() if tmp_path.name in p.name] == [tmp_path.name], "nothing left beside"


# 3. dymu enable: safe write, links, copies carry the thresholds, dymu disable


def _enabled_copy(model_dirs, thresholds, folder: Path) -> Path:
    import shutil

    shutil.copytree(model_dirs["tiny-clip"], folder)
    assert main(["enable", str(folder), "--thresholds", str(thresholds)]) == 0
    return folder


def test_enable_that_cannot_write_leaves_config_json_whole(model_dirs, thresholds, tmp_path):
    import shutil

    folder = tmp_path / "ckpt"
    shutil.copytree(model_dirs["tiny-clip"], folder)
    config = json.loads((folder / "config.json").read_text())
    config["notes"] = "x" * 20000  # far larger than the thresholds file, so only config.json's write hits the limit
    (folder / "config.json").write_text(json.dumps(config))
    before = _snapshot(folder)
    limit = (folder / "config.json").stat().st_size + 16
    script = ("import resource, signal, sys\n"
              "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
              f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))\n"
              "from dymu.cli import main\n"
              "sys.exit(main(sys.argv[1:]))\n")
    env = dict(os.environ, PYTHONPATH=SRC, HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-c", script, "enable", str(folder), "--thresholds", str(thresholds)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "File too large" in done.stderr.splitlines()[-1], done.stderr
    assert _snapshot(folder) == before, "config.json whole, no temporary file left"


def test_enable_replaces_a_linked_config_json_and_leaves_its_target(capsys, model_dirs, thresholds, tmp_path):
    import shutil

    folder, blobs = tmp_path / "snapshot", tmp_path / "blobs"
    shutil.copytree(model_dirs["tiny-clip"], folder)
    blobs.mkdir()
    blob = blobs / "0a1b2c"
    (folder / "config.json").rename(blob)
    (folder / "config.json").symlink_to(blob)
    original = blob.read_bytes()
    code, out, err = run(capsys, "enable", folder, "--thresholds", thresholds)
    assert code == 0, err
    assert blob.read_bytes() == original, "the link's target (a hub cache blob) is not written through"
    assert not (folder / "config.json").is_symlink() and "dymu" in json.loads((folder / "config.json").read_text())
    assert "was a link to" in err and str(blob) in err


def test_a_save_pretrained_copy_of_an_enabled_checkpoint_keeps_its_thresholds(capsys, model_dirs, thresholds, image_paths,
                                                                            tmp_path):
    from transformers import CLIPVisionModel

    import dymu
    from dymu.models import settings_from_config

    folder = _enabled_copy(model_dirs, thresholds, tmp_path / "enabled")
    capsys.readouterr()
    copy = tmp_path / "copy"
    CLIPVisionModel.from_pretrained(folder).save_pretrained(copy)  # stock transformers: config.json and weights only
    found, vtu = settings_from_config(copy)
    assert list(found) == dymu.Thresholds.load(thresholds).values and vtu == "fast"
    code, out, err = run(capsys, "encode", copy, *image_paths[:2], "--json")
    assert code == 0, err
    capsys.readouterr()
    assert main(["encode", str(model_dirs["tiny-clip"]), *image_paths[:2], "--thresholds", str(thresholds), "--json"]) == 0
    assert capsys.readouterr().out == out, "the copy merges as the thresholds file does"


def test_disable_removes_the_section_and_the_older_layout_is_still_read(capsys, model_dirs, thresholds, tmp_path):
    import shutil

    import dymu
    from dymu.models import settings_from_config

    folder = _enabled_copy(model_dirs, thresholds, tmp_path / "enabled")
    code, out, _ = run(capsys, "disable", folder)
    assert code == 0 and "removed" in out
    config = json.loads((folder / "config.json").read_text())
    original = json.loads((model_dirs["tiny-clip"] / "config.json").read_text())
    assert "dymu" not in config and config == original
    assert not dymu.is_applied(dymu.from_pretrained(folder))
    assert run(capsys, "disable", folder)[1].endswith("nothing to remove\n")
    older = tmp_path / "older"  # enabled by an older dymu: the thresholds file beside config.json
    shutil.copytree(model_dirs["tiny-clip"], older)
    shutil.copy(thresholds, older / "dymu_thresholds.json")
    config["dymu"] = {"thresholds": "dymu_thresholds.json", "vtu": "none"}
    (older / "config.json").write_text(json.dumps(config))
    found, vtu = settings_from_config(older)
    assert dymu.Thresholds.load(found).values == dymu.Thresholds.load(thresholds).values and vtu == "none"
    code, _, err = run(capsys, "disable", older)
    assert code == 0 and "removed" in err and not (older / "dymu_thresholds.json").exists()


# 4. --out is never an input; an existing output needs --overwrite


def _reference_checkpoint(path: Path) -> Path:
    state = {f"visual.transformer.resblocks.{i}.threshold": torch.tensor(0.9 - i / 10) for i in range(4)}
    torch.save({"name": "ViT-L-14-336-tome-72out", "state_dict": state}, path)
    return path


def test_out_that_is_an_input_is_refused_even_with_overwrite(capsys, model_dirs, image_dir, tmp_path):
    import shutil

    images = tmp_path / "images"
    shutil.copytree(image_dir, images)
    victim = images / "coins.png"
    pristine = victim.read_bytes()
    model = tmp_path / "model"
    shutil.copytree(model_dirs["tiny-clip"], model)
    config = (model / "config.json").read_bytes()
    find = ("find-thresholds", model, images, "--target-tokens", "300", "--measure", "0")
    for out in (victim, model / "config.json"):
        for extra in ((), ("--overwrite",)):
            result = run(capsys, *find, "--out", out, *extra)
            assert victim.read_bytes() == pristine and (model / "config.json").read_bytes() == config
            _one_line_error(*result[::2], str(out), "one of this run's inputs")
    link = tmp_path / "link.png"
    link.symlink_to(victim)
    _one_line_error(*run(capsys, *find, "--out", link, "--overwrite")[::2], "link.png", "one of this run's inputs")
    checkpoint = _reference_checkpoint(tmp_path / "ref.pt")
    saved = checkpoint.read_bytes()
    _one_line_error(*run(capsys, "import-thresholds", checkpoint, "--out", checkpoint, "--overwrite")[::2],
                    "ref.pt", "one of this run's inputs")
    assert victim.read_bytes() == pristine and (model / "config.json").read_bytes() == config and checkpoint.read_bytes() == saved


def test_every_command_refuses_an_existing_output_unless_overwrite(capsys, model_dirs, tiny_llava_dir, image_paths,
                                                                   thresholds, tmp_path):
    existing = tmp_path / "existing.json"
    existing.write_text("mine\n")
    checkpoint = _reference_checkpoint(tmp_path / "ref.pt")
    commands = {
        "find-thresholds": ("find-thresholds", model_dirs["tiny-clip"], image_paths[0], "--target-tokens", "300",
                            "--measure", "0", "--batch-size", "1"),
        "import-thresholds": ("import-thresholds", checkpoint),
        "encode": ("encode", model_dirs["tiny-clip"], image_paths[0], "--thresholds", thresholds),
        "calibrate-vtw": ("calibrate-vtw", tiny_llava_dir, image_paths[0], "--first-layer", "1", "--limit", "1"),
    }
    for name, command in commands.items():
        code, _, err = run(capsys, *command, "--out", existing)
        _one_line_error(code, err, "existing.json exists", "--overwrite")
        assert existing.read_text() == "mine\n" and "model:" not in err, f"{name}: refused before any work"
    for name in ("find-thresholds", "import-thresholds"):
        code, _, err = run(capsys, *commands[name], "--out", existing, "--overwrite")
        assert code == 0, err
        assert json.loads(existing.read_text())["format"] == "dymu-thresholds"


# 5. Ctrl-C says how to resume; a rerun never discards a journal silently


def _interrupt_on_call(monkeypatch, module, name, call):
    """Make ``module.name`` raise KeyboardInterrupt on its ``call``-th call (1-based)."""
    real, calls = getattr(module, name), []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, interrupted)


@pytest.mark.parametrize("stage", ["search", "measuring tokens"])
def test_interrupted_find_thresholds_says_how_to_resume_and_a_plain_rerun_refuses(capsys, monkeypatch, model_dirs,
                                                                                image_paths, tmp_path, stage):
    from dymu import finder

    out = tmp_path / "t.json"
    partial = tmp_path / "t.json.partial"
    command = ("find-thresholds", model_dirs["tiny-clip"], *image_paths[:4], "--target-tokens", "300", "--batch-size", "2",
               "--measure", "2", "--workers", "0", "--out", out)
    if stage == "search":
        _interrupt_on_call(monkeypatch, finder, "calibration_statistics", 2)
    else:
        _interrupt_on_call(monkeypatch, finder, "measure_tokens", 1)
    line = _one_line_error(*run(capsys, *command)[::2], "interrupted", str(partial), "--resume", status=130)
    assert "error" not in line
    monkeypatch.undo()
    journal = partial.read_bytes()
    _one_line_error(*run(capsys, *command)[::2], str(partial), "--resume", "--restart")
    assert partial.read_bytes() == journal and not out.exists()
    searched = []
    real = finder.calibration_statistics
    monkeypatch.setattr(finder, "calibration_statistics", lambda *a, **k: searched.append(1) or real(*a, **k))
    code, _, err = run(capsys, *command, "--resume")
    assert code == 0, err
    assert len(searched) == (1 if stage == "search" else 0), "only what was not done runs again"
    assert json.loads(out.read_text())["achieved_tokens"]["count"] == 2 and not partial.exists()


def test_restart_discards_an_interrupted_run_on_purpose(capsys, monkeypatch, model_dirs, image_paths, tmp_path):
    from dymu import finder

    out = tmp_path / "t.json"
    command = ("find-thresholds", model_dirs["tiny-clip"], *image_paths[:4], "--target-tokens", "300", "--batch-size", "2",
               "--measure", "0", "--workers", "0", "--out", out)
    _interrupt_on_call(monkeypatch, finder, "calibration_statistics", 2)
    assert run(capsys, *command)[0] == 130
    monkeypatch.undo()
    _one_line_error(*run(capsys, *command, "--resume", "--restart")[::2], "--resume", "--restart")
    code, _, err = run(capsys, *command, "--restart")
    assert code == 0 and "discarded" in err and out.exists() and not (tmp_path / "t.json.partial").exists()


def test_interrupted_encode_says_how_to_resume(capsys, monkeypatch, model_dirs, image_paths, thresholds, tmp_path):
    from dymu import api

    out = tmp_path / "rows.jsonl"
    command = ("encode", model_dirs["tiny-clip"], *image_paths[:4], "--thresholds", thresholds, "--batch-size", "2",
               "--workers", "0", "--out", out)
    _interrupt_on_call(monkeypatch, api, "encode", 2)
    _one_line_error(*run(capsys, *command)[::2], "interrupted", str(out), "--resume", status=130)
    monkeypatch.undo()
    code, _, err = run(capsys, *command, "--resume")
    assert code == 0 and "2 image(s) done, 1 batch(es) to go" in err


# 6. one process at a time on an output


def test_a_second_process_on_the_same_output_fails_naming_the_first(capsys, model_dirs, image_paths, thresholds, tmp_path):
    out = tmp_path / "rows.jsonl"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom dymu.files import Lock\n"
         "with Lock(sys.argv[1]):\n    print('locked', flush=True)\n    time.sleep(120)\n", str(out)],
        stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=SRC))
    try:
        assert holder.stdout.readline().strip() == "locked"
        for command in (("encode", model_dirs["tiny-clip"], image_paths[0], "--thresholds", thresholds, "--out", out),
                        ("encode", model_dirs["tiny-clip"], image_paths[0], "--thresholds", thresholds, "--out", out, "--resume"),
                        ("find-thresholds", model_dirs["tiny-clip"], image_paths[0], "--target-tokens", "300", "--out", out)):
            code, _, err = run(capsys, *command)
            _one_line_error(code, err, str(out), f"in use by process {holder.pid}")
            assert "model:" not in err, "refused before any work"
    finally:
        holder.kill()
        holder.wait()
    assert not out.exists()
    assert run(capsys, "encode", model_dirs["tiny-clip"], image_paths[0], "--thresholds", thresholds, "--out", out)[0] == 0


def test_lock_is_exclusive_and_leaves_no_file(tmp_path):
    from dymu.files import FileInUseError, Lock

    target = tmp_path / "out.json"
    with Lock(target):
        with pytest.raises(FileInUseError, match=rf"out\.json is in use by process {os.getpid()}"):
            Lock(target).acquire()
    with Lock(target):
        pass
    assert list(tmp_path.iterdir()) == []


# 7. resumes are tied to their model, merging and images


def test_encode_resume_with_another_model_merging_or_image_list_is_refused(capsys, model_dirs, seed1_clip, image_paths,
                                                                         thresholds, tmp_path):
    out = tmp_path / "rows.jsonl"
    common = ("--thresholds", thresholds, "--out", out, "--workers", "0")
    assert run(capsys, "encode", model_dirs["tiny-clip"], *image_paths[:3], *common)[0] == 0
    written = out.read_bytes()
    _one_line_error(*run(capsys, "encode", seed1_clip, *image_paths[:3], *common, "--resume")[::2],
                    "rows.jsonl", "weights differ")
    _one_line_error(*run(capsys, "encode", model_dirs["tiny-clip"], *image_paths[:3], "--merge", "tome:r=8", "--out", out,
                         "--resume")[::2], "rows.jsonl", "written with DToMe thresholds", "ToMe r=8")
    _one_line_error(*run(capsys, "encode", model_dirs["tiny-clip"], *image_paths[1:4], *common, "--resume")[::2],
                    "another image list", "3 images then, 3 now", f"outside this run, e.g. {image_paths[0]}")
    assert out.read_bytes() == written
    code, _, err = run(capsys, "encode", model_dirs["tiny-clip"], *image_paths[:3], *common, "--resume")
    assert code == 0 and "0 batch(es) to go" in err


def test_find_thresholds_resume_with_a_model_of_another_seed_is_refused(capsys, monkeypatch, model_dirs, seed1_clip,
                                                                       image_paths, tmp_path):
    from dymu import finder

    args = (*image_paths[:4], "--target-tokens", "300", "--batch-size", "2", "--measure", "0", "--workers", "0",
            "--out", tmp_path / "t.json")
    _interrupt_on_call(monkeypatch, finder, "calibration_statistics", 2)
    assert run(capsys, "find-thresholds", model_dirs["tiny-clip"], *args)[0] == 130
    monkeypatch.undo()
    _one_line_error(*run(capsys, "find-thresholds", seed1_clip, *args, "--resume")[::2], "t.json.partial", "weights differ")


def test_outputs_record_the_model_fingerprint(capsys, tiny_llava_dir, model_dirs, image_paths, thresholds, tmp_path):
    from dymu.files import model_fingerprint
    from dymu.models import load_model
    from dymu.vision import tower_info

    clip = load_model(model_dirs["tiny-clip"])
    assert json.loads(thresholds.read_text())["model"]["fingerprint"] == model_fingerprint(tower_info(clip).tower)
    out = tmp_path / "vtw.json"
    assert run(capsys, "calibrate-vtw", tiny_llava_dir, image_paths[0], "--first-layer", "1", "--limit", "1",
               "--out", out)[0] == 0
    assert json.loads(out.read_text())["model"]["fingerprint"] == model_fingerprint(load_model(tiny_llava_dir))


# 8. nothing readable: nothing left behind


def test_every_image_unreadable_leaves_no_output(capsys, model_dirs, thresholds, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    encoded = run(capsys, "encode", model_dirs["tiny-clip"], bad, "--thresholds", thresholds, "--out", tmp_path / "rows.jsonl")
    searched = run(capsys, "find-thresholds", model_dirs["tiny-clip"], bad, "--target-tokens", "300", "--out", tmp_path / "t.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.png"], "no OUT, OUT.partial nor lock left"
    assert "removed" in _one_line_error(*encoded[::2], "no readable images")
    _one_line_error(*searched[::2], "no readable images")


def test_viz_never_draws_over_an_input_and_replaces_pictures_only_with_overwrite(capsys, model_dirs, image_dir,
                                                                                thresholds, tmp_path):
    import shutil

    images = tmp_path / "images"
    images.mkdir()
    for name in ("coins.png", "moon.png"):
        shutil.copy(image_dir / name, images / name)
    before = _snapshot(images)
    command = ("encode", model_dirs["tiny-clip"], images, "--thresholds", thresholds)
    for extra in ((), ("--overwrite",)):  # the merge map of coins.png would be images/coins.png
        result = run(capsys, *command, "--viz", images, *extra)
        assert _snapshot(images) == before
        _one_line_error(*result[::2], "--viz", "one of this run's inputs")
    assert run(capsys, *command, "--viz", tmp_path / "maps")[0] == 0
    _one_line_error(*run(capsys, *command, "--viz", tmp_path / "maps")[::2], "--viz", "exists", "--overwrite")
    assert run(capsys, *command, "--viz", tmp_path / "maps", "--overwrite")[0] == 0
