"""Threshold finding: target accuracy, resume, multi-process, bad images, file format."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dymu
from dymu.finder import find_thresholds
from dymu.images import SkippedImagesWarning


class Interrupt(Exception):
    pass


def _interrupt_after(batch_index):
    def on_batch(k):
        if k == batch_index:
            raise Interrupt

    return on_batch


@pytest.mark.parametrize("family,target", [("clip", 200), ("siglip", 300)])
def test_mean_tokens_within_ten_percent_of_target(family, target, request, image_paths):
    model, processor = request.getfixturevalue(family)
    # one calibration batch (see feasibility notes: per-batch thresholds vary a lot on small sets)
    thresholds = find_thresholds(model, image_paths, target_tokens=target, batch_size=len(image_paths),
                                 processor=processor, progress=False)
    achieved = thresholds.achieved_tokens
    assert achieved["count"] == len(image_paths)
    assert abs(achieved["mean"] - target) <= 0.1 * target, achieved
    # independent check of the recorded figure, and dynamic behaviour: flat images get fewer tokens
    from dymu.images import load_batch

    dymu.apply(model, thresholds)
    pixel_values, names, _ = load_batch(image_paths, processor)
    counts = dict(zip((Path(n).stem for n in names), dymu.encode(model, pixel_values).num_tokens))
    assert abs(sum(counts.values()) / len(counts) - achieved["mean"]) < 1e-9
    assert counts["checkerboard"] < counts["grass"] and counts["checkerboard"] < target < counts["gravel"]


def test_schedules_and_metadata(clip, image_paths, tmp_path):
    model, processor = clip
    # no processor given: the one saved in the model's checkpoint folder is used
    result = find_thresholds(model, image_paths[:6], target_tokens=250, schedule="reverse-linear", batch_size=3,
                             progress=False, measure=0)
    assert result.budgets == dymu.merge.merge_schedule(4, 576 - 250, "reverse-linear")
    assert result.images["count"] == 6 and result.images["batches"] == 2
    assert result.model["num_layers"] == 4 and result.model["model_type"] == "clip_vision_model"
    path = tmp_path / "t.json"
    result.save(path)
    loaded = dymu.Thresholds.load(path)
    assert loaded.values == result.values and loaded.budgets == result.budgets
    data = json.loads(path.read_text())
    assert data["format"] == "dymu-thresholds" and data["version"] == 1


def test_resume_gives_the_same_thresholds_as_an_uninterrupted_run(clip, image_paths, tmp_path):
    model, processor = clip
    kwargs = dict(target_tokens=220, batch_size=4, processor=processor, progress=False, measure=0)
    reference = find_thresholds(model, image_paths[:14], **kwargs)
    checkpoint = tmp_path / "run.partial"
    with pytest.raises(Interrupt):
        find_thresholds(model, image_paths[:14], checkpoint=checkpoint, on_batch=_interrupt_after(1), **kwargs)
    saved = [json.loads(line) for line in checkpoint.read_text().splitlines()]
    assert saved[0]["format"] == "dymu-threshold-search" and [row["batch"] for row in saved[1:]] == [0, 1]
    done = []
    resumed = find_thresholds(model, image_paths[:14], checkpoint=checkpoint, resume=True, on_batch=done.append, **kwargs)
    assert done == [2, 3], "only the batches not yet done are run again"
    assert resumed.values == reference.values
    assert not checkpoint.exists(), "the checkpoint is removed once the run completes"


def test_resume_rejects_a_checkpoint_of_another_run(clip, image_paths, tmp_path):
    model, processor = clip
    checkpoint = tmp_path / "run.partial"
    with pytest.raises(Interrupt):
        find_thresholds(model, image_paths[:8], target_tokens=220, batch_size=4, processor=processor, progress=False,
                        measure=0, checkpoint=checkpoint, on_batch=_interrupt_after(0))
    with pytest.raises(dymu.DymuError, match="target_tokens"):
        find_thresholds(model, image_paths[:8], target_tokens=300, batch_size=4, processor=processor, progress=False,
                        measure=0, checkpoint=checkpoint, resume=True)
    with pytest.raises(dymu.DymuError, match="max_pixels=89478485, this run has max_pixels=1000"):  # other images skip
        find_thresholds(model, image_paths[:8], target_tokens=220, batch_size=4, processor=processor, progress=False,
                        measure=0, checkpoint=checkpoint, resume=True, max_pixels=1000)


class WorkerOnlyProcessor:
    """The model's processor, refusing to run in the main process: proves that images are decoded in workers."""

    def __init__(self, processor):
        self.processor, self.main = processor, os.getpid()

    def __call__(self, **kwargs):
        if os.getpid() == self.main:
            raise dymu.DymuError("preprocessing ran in the main process")
        return self.processor(**kwargs)


def _with_corrupt_image(image_paths, tmp_path, count=10):
    """``count`` images with a corrupt JPEG at position 4 (batch 1 of batches of 3)."""
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    return image_paths[:4] + [str(bad)] + image_paths[4 : count - 1], str(bad)


def test_workers_give_bit_identical_thresholds_and_skip_the_same_images(clip, image_paths, tmp_path):
    model, processor = clip
    images, bad = _with_corrupt_image(image_paths, tmp_path)
    kwargs = dict(target_tokens=220, batch_size=3, progress=False, measure=len(images))
    order = {0: [], 2: []}
    results = {}
    for workers, proc in ((0, processor), (2, WorkerOnlyProcessor(processor))):
        with pytest.warns(SkippedImagesWarning, match="broken.jpg"):
            results[workers] = find_thresholds(model, images, processor=proc, num_workers=workers,
                                               on_batch=order[workers].append, **kwargs)
    serial, parallel = results[0], results[2]
    assert order[0] == order[2] == [0, 1, 2, 3]
    assert parallel.values == serial.values
    assert parallel.images == serial.images and [s["image"] for s in serial.images["skipped"]] == [bad]
    assert "cannot read image" in serial.images["skipped"][0]["error"] and bad not in serial.images["used"]
    assert parallel.achieved_tokens == serial.achieved_tokens and serial.achieved_tokens["count"] == len(images) - 1
    assert serial.timing.images == parallel.timing.images == len(images)


def test_loader_delivers_the_batches_of_a_serial_run_in_order(clip, image_paths, tmp_path):
    from dymu.loader import ImageBatches, load_batches

    _, processor = clip
    images, bad = _with_corrupt_image(image_paths, tmp_path, count=8)
    dataset = ImageBatches(images, 3, processor)
    serial = list(load_batches(dataset, [2, 0, 1], num_workers=0))
    parallel = list(load_batches(ImageBatches(images, 3, WorkerOnlyProcessor(processor)), [2, 0, 1], num_workers=2))
    assert [b.index for b in parallel] == [b.index for b in serial] == [2, 0, 1]
    assert [b.size for b in serial] == [2, 3, 3] and [f["image"] for f in serial[2].failures] == [bad]
    for one, two in zip(serial, parallel):
        assert one.names == two.names and one.failures == two.failures
        assert torch.equal(one.pixel_values, two.pixel_values)  # (b, 3, 336, 336)


def test_an_error_in_a_worker_is_raised_as_itself(clip, image_paths):
    model, processor = clip

    def refusing(**kwargs):
        raise dymu.DymuError("processor says no")

    with pytest.raises(dymu.DymuError, match="^processor says no$"):
        find_thresholds(model, image_paths[:4], processor=refusing, num_workers=2, **QUICK)
    with pytest.raises(dymu.DymuError, match="--workers must be >= 0, got -1"):
        find_thresholds(model, image_paths[:4], processor=processor, num_workers=-1, **QUICK)


def test_resume_with_workers_after_a_kill_gives_the_same_thresholds(clip, image_paths, tmp_path):
    model, processor = clip
    images, bad = _with_corrupt_image(image_paths, tmp_path, count=12)
    kwargs = dict(target_tokens=220, batch_size=3, progress=False, measure=0)
    with pytest.warns(SkippedImagesWarning):
        reference = find_thresholds(model, images, processor=processor, num_workers=0, **kwargs)
    checkpoint = tmp_path / "run.partial"
    with pytest.raises(Interrupt):  # killed after batch 1 (the corrupt image's) while workers decode batches 2 and 3
        find_thresholds(model, images, processor=WorkerOnlyProcessor(processor), num_workers=2, checkpoint=checkpoint,
                        on_batch=_interrupt_after(1), **kwargs)
    with checkpoint.open("a") as handle:
        handle.write('{"batch": 2, "statis')  # and a record cut short by the kill
    done = []
    with pytest.warns(SkippedImagesWarning, match="broken.jpg"):
        resumed = find_thresholds(model, images, processor=WorkerOnlyProcessor(processor), num_workers=2,
                                  checkpoint=checkpoint, resume=True, on_batch=done.append, **kwargs)
    assert done == [2, 3]
    assert resumed.values == reference.values
    assert resumed.images == reference.images and [s["image"] for s in resumed.images["skipped"]] == [bad]


def test_corrupt_image_is_skipped_and_reported(clip, image_paths, tmp_path):
    model, processor = clip
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    images = image_paths[:3] + [str(bad)] + image_paths[3:5]
    with pytest.warns(SkippedImagesWarning, match="skipped 1 image"):
        result = find_thresholds(model, images, target_tokens=250, batch_size=3, processor=processor, progress=False, measure=0)
    assert [s["image"] for s in result.images["skipped"]] == [str(bad)]
    assert "cannot read image" in result.images["skipped"][0]["error"]
    assert result.images["count"] == 5 and str(bad) not in result.images["used"]
    clean = find_thresholds(model, image_paths[:3], target_tokens=250, batch_size=3, processor=processor, progress=False, measure=0)
    assert len(clean.values) == 4


def test_torchrun_two_processes_match_one_process(model_dirs, image_paths, tmp_path):
    model_dir = model_dirs["tiny-clip"]
    images = image_paths[:12]
    common = [str(model_dir), *images, "--target-tokens", "220", "--batch-size", "3", "--measure", "0"]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    single = tmp_path / "single.json"
    subprocess.run([sys.executable, "-m", "dymu.cli", "find-thresholds", *common, "--workers", "0", "--out", str(single)],
                   check=True, env=env, capture_output=True, timeout=300)
    double = tmp_path / "double.json"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    # each rank decodes in a worker process of its own
    proc = subprocess.run([*torchrun, "-m", "dymu.cli", "find-thresholds", *common, "--workers", "1", "--out", str(double)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = json.loads(single.read_text()), json.loads(double.read_text())
    assert one["thresholds"] == two["thresholds"]
    assert one["images"]["batches"] == two["images"]["batches"] == 4


def _numbers_after(text, phrase):
    import re

    return int(re.search(re.escape(phrase) + r" (\d+)", text).group(1))


def _reachable(info, target, schedule):
    from dymu.finder import budgets_for

    try:
        budgets_for(info, target, schedule)
        return True
    except dymu.DymuError:
        return False


@pytest.mark.parametrize("schedule", ["constant", "reverse-linear"])
def test_unreachable_target_names_the_smallest_reachable_one(clip, schedule):
    from dymu.vision import tower_info

    info = tower_info(clip[0])
    with pytest.raises(dymu.DymuError) as error:
        find_thresholds(clip[0], [], target_tokens=5, schedule=schedule)
    smallest = _numbers_after(str(error.value), "the smallest reachable target is")
    assert _reachable(info, smallest, schedule) and not any(_reachable(info, t, schedule) for t in range(1, smallest))


def test_unreachable_target_above_the_smallest_names_the_nearest_one_above():
    """linear schedules are not monotone: on a 256-patch, 8-layer SigLIP 16 tokens are reachable but not 17 or 18."""
    from dymu.finder import budgets_for
    from dymu.vision import TowerInfo

    info = TowerInfo(tower=None, model_type="siglip_vision_model", protected=0, num_layers=8, hidden_size=8, num_heads=1,
                     intermediate_size=8, image_size=224, patch_size=14, read_layer=7)
    target = next(t for t in range(2, info.num_patches) if not _reachable(info, t, "linear") and _reachable(info, t - 1, "linear"))
    with pytest.raises(dymu.DymuError) as error:
        budgets_for(info, target, "linear")
    message = str(error.value)
    assert _numbers_after(message, "the smallest reachable target is") < target
    above = _numbers_after(message, f"the nearest above {target} is")
    assert _reachable(info, above, "linear") and not any(_reachable(info, t, "linear") for t in range(target, above))


QUICK = dict(target_tokens=250, batch_size=2, progress=False, measure=0)


def test_folders_manifests_and_paths_are_taken_as_the_cli_takes_them(clip, image_dir, tmp_path):
    from PIL import Image

    model, processor = clip
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    (folder / "moon.png").write_bytes((image_dir / "moon.png").read_bytes())
    (folder / "sub" / "coins.png").write_bytes((image_dir / "coins.png").read_bytes())
    (folder / "notes.txt").write_text("not an image: ignored in folders")
    listed = sorted(str(p) for p in folder.rglob("*.png"))
    reference = find_thresholds(model, listed, processor=processor, **QUICK)
    for images in (str(folder), [folder]):
        result = find_thresholds(model, images, processor=processor, **QUICK)
        assert result.values == reference.values and result.images["used"] == listed
    manifest = tmp_path / "set.json"
    manifest.write_text(json.dumps([{"image": str(Path(p).relative_to(tmp_path))} for p in listed] + [{"id": 1}]))
    with pytest.warns(SkippedImagesWarning, match=r"skipped 1 image.*set\.json\[2\]"):
        result = find_thresholds(model, manifest, processor=processor, **QUICK)
    assert result.values == reference.values and result.images["skipped"][0]["image"] == f"{manifest}[2]"
    from dymu.images import collect_images

    with pytest.warns(SkippedImagesWarning, match=r"set\.json\[2\]"):  # listed once, as the CLI passes it
        listed_once = find_thresholds(model, collect_images(manifest), processor=processor, **QUICK)
    assert listed_once.values == reference.values and listed_once.images == result.images
    assert find_thresholds(model, [Image.open(p) for p in listed], processor=processor, **QUICK).values == reference.values
    with pytest.raises(dymu.DymuError, match="image not found"):
        find_thresholds(model, [str(tmp_path / "absent.png")], processor=processor, **QUICK)


def test_skipped_images_are_reported_and_all_failing_says_why(clip, image_paths, tmp_path):
    model, processor = clip
    bad = [tmp_path / f"broken{i}.png" for i in range(2)]
    for path in bad:
        path.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.warns(SkippedImagesWarning, match=r"skipped 2 image\(s\).*broken0\.png.*broken1\.png"):
        find_thresholds(model, [str(bad[0]), *image_paths[:2], str(bad[1])], processor=processor, **QUICK)
    with pytest.raises(dymu.DymuError, match=r"no readable images.*broken0\.png: .*cannot read image") as error:
        find_thresholds(model, [str(p) for p in bad], processor=processor, **QUICK)
    assert "\n" not in str(error.value) and "see the skipped list" not in str(error.value)


def test_a_last_line_cut_by_a_kill_is_dropped_a_whole_one_kept(tmp_path):
    from dymu.journal import read_journal

    def read(path):
        return read_journal(path, "x", lambda header: None)

    path = tmp_path / "rows.jsonl"
    path.write_text('{"h": 0}\n{"a": 1}\n{"b": 2}')  # killed just before the newline: the row is whole
    assert read(path) == ({"h": 0}, [{"a": 1}, {"b": 2}]) and path.read_text() == '{"h": 0}\n{"a": 1}\n{"b": 2}\n'
    path.write_text('{"h": 0}\n{"a": 1}\n{"b": ')
    assert read(path) == ({"h": 0}, [{"a": 1}]) and path.read_text() == '{"h": 0}\n{"a": 1}\n'
    path.write_text('{"h": 0}\n{"a": 1}\n[2]\n{"c": 3}\n')
    with pytest.raises(dymu.DymuError, match=r"^x .*rows\.jsonl line 3 is not a JSON object; delete the file"):
        read(path)


@pytest.mark.parametrize("content", [
    b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR binary tail without newline",  # an image
    b'{"format": "dymu-thresholds", "thresholds": [0.9, 0.8]}',  # a whole JSON document, no trailing newline
    b'{"format": "dymu-thresholds"}\n{"a": 1}\n{"cut',  # JSON lines of another tool, last line cut
    b"plain text\nwithout a final newline",
])
def test_reading_a_file_that_is_not_our_journal_changes_nothing(tmp_path, content):
    """Issue 23 item 1: the header is checked before the tail is repaired; a foreign file is refused unchanged."""
    from dymu.journal import read_journal

    def ours(header):
        if header.get("format") != "dymu-threshold-search":
            raise dymu.DymuError("not ours")

    path = tmp_path / "file"
    path.write_bytes(content)
    with pytest.raises(dymu.DymuError):
        read_journal(path, "x", ours)
    assert path.read_bytes() == content


def test_resume_on_a_file_that_is_not_a_checkpoint_leaves_it_whole(clip, image_paths, tmp_path):
    """Issue 23 item 1, through find_thresholds: a thresholds JSON without a trailing newline is not cut."""
    model, processor = clip
    checkpoint = tmp_path / "thresholds.json"
    content = b'{"format": "dymu-thresholds", "version": 1, "thresholds": [0.9, 0.8, 0.7, null]}'
    checkpoint.write_bytes(content)
    with pytest.raises(dymu.DymuError, match="left unchanged"):
        find_thresholds(model, image_paths[:4], processor=processor, checkpoint=checkpoint, resume=True, **QUICK)
    assert checkpoint.read_bytes() == content


def test_resume_refuses_a_checkpoint_of_the_old_format_and_keeps_it(clip, image_paths, tmp_path):
    model, processor = clip
    checkpoint = tmp_path / "run.partial"
    old = {"format": "dymu-threshold-search", "version": 1, "config": {}, "statistics": {"0": [0.5] * 4}, "skipped": []}
    checkpoint.write_text(json.dumps(old))  # version 1: one JSON document, no newline
    with pytest.raises(dymu.DymuError, match="not a dymu threshold-search checkpoint of version 3"):
        find_thresholds(model, image_paths[:4], processor=processor, checkpoint=checkpoint, resume=True, **QUICK)
    assert json.loads(checkpoint.read_text()) == old


def _interrupted_search(model, processor, images, checkpoint):
    with pytest.raises(Interrupt):
        find_thresholds(model, images, processor=processor, checkpoint=checkpoint, on_batch=_interrupt_after(0), **QUICK)


def test_resume_with_another_model_of_the_same_shape_or_another_image_list_is_refused(clip, image_paths, tmp_path):
    """Issue 23 item 7: a seed-1 model of the same shape, another image list: one line naming what differs."""
    from dymu.files import model_fingerprint
    from dymu.models import build_preset

    model, processor = clip
    checkpoint = tmp_path / "run.partial"
    _interrupted_search(model, processor, image_paths[:6], checkpoint)
    before = checkpoint.read_bytes()
    other, _ = build_preset("tiny-clip", seed=1)
    with pytest.raises(dymu.DymuError, match=r"run\.partial: the model's weights differ") as error:
        find_thresholds(other, image_paths[:6], processor=processor, checkpoint=checkpoint, resume=True, **QUICK)
    assert "\n" not in str(error.value)
    with pytest.raises(dymu.DymuError, match=r"the image list differs \(6 images now, 6 then\)"):
        find_thresholds(model, image_paths[1:7], processor=processor, checkpoint=checkpoint, resume=True, **QUICK)
    assert checkpoint.read_bytes() == before, "a refused resume changes nothing"
    done = find_thresholds(model, image_paths[:6], processor=processor, checkpoint=checkpoint, resume=True, **QUICK)
    assert done.model["fingerprint"] == model_fingerprint(model) and done.images["fingerprint"]
    assert done.model["fingerprint"]["weights"] != model_fingerprint(other)["weights"]


def test_an_existing_checkpoint_is_never_replaced_without_resume(clip, image_paths, tmp_path):
    """Issue 23 item 5 (API side): a run without resume that finds a checkpoint refuses instead of starting over."""
    model, processor = clip
    checkpoint = tmp_path / "run.partial"
    _interrupted_search(model, processor, image_paths[:6], checkpoint)
    before = checkpoint.read_bytes()
    with pytest.raises(dymu.DymuError, match="holds an interrupted run: resume it"):
        find_thresholds(model, image_paths[:6], processor=processor, checkpoint=checkpoint, **QUICK)
    assert checkpoint.read_bytes() == before


def test_a_checkpoint_in_use_is_refused_naming_the_holder(clip, image_paths, tmp_path):
    """Issue 23 item 6: the checkpoint is locked while a search runs."""
    from dymu.files import Lock

    model, processor = clip
    checkpoint = tmp_path / "run.partial"
    with Lock(checkpoint):
        with pytest.raises(dymu.DymuError, match=rf"checkpoint .*run\.partial is in use by process {os.getpid()}"):
            find_thresholds(model, image_paths[:2], processor=processor, checkpoint=checkpoint, **QUICK)
    assert not checkpoint.exists()
    find_thresholds(model, image_paths[:2], processor=processor, checkpoint=checkpoint, **QUICK)
    assert sorted(tmp_path.iterdir()) == [], "no checkpoint nor lock file left"


def test_every_image_unreadable_leaves_no_checkpoint(clip, tmp_path):
    """Issue 23 item 8."""
    model, processor = clip
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    checkpoint = tmp_path / "run.partial"
    with pytest.raises(dymu.DymuError, match="no readable images"):
        find_thresholds(model, [str(bad)], processor=processor, checkpoint=checkpoint, **QUICK)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.png"]
