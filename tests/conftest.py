import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

#: images with very different complexity: flat-ish, structured, textured
MIXED_IMAGES = ("checkerboard", "camera", "grass", "coins", "moon")


@pytest.fixture(scope="session")
def image_dir(tmp_path_factory):
    from dymu.data import write_bundled_images

    directory = tmp_path_factory.mktemp("images")
    write_bundled_images(directory)
    return directory


@pytest.fixture(scope="session")
def image_paths(image_dir):
    from dymu.data import BUNDLED

    return [str(image_dir / f"{name}.png") for name in BUNDLED]


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory):
    """Tiny random-weight checkpoints written with save_pretrained, loaded back with from_pretrained."""
    from dymu.models import make_model

    root = tmp_path_factory.mktemp("models")
    return {name: make_model(name, root / name) for name in ("tiny-clip", "tiny-siglip")}


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory):
    """A random-weight tiny-llava checkpoint folder (``dymu make-model tiny-llava``)."""
    from dymu.models import make_model

    return make_model("tiny-llava", tmp_path_factory.mktemp("llava") / "tiny-llava")


@pytest.fixture
def clip(model_dirs):
    from dymu.models import load_model, load_processor

    return load_model(model_dirs["tiny-clip"]), load_processor(model_dirs["tiny-clip"])


@pytest.fixture
def siglip(model_dirs):
    from dymu.models import load_model, load_processor

    return load_model(model_dirs["tiny-siglip"]), load_processor(model_dirs["tiny-siglip"])


def pixels(processor, image_dir, names=MIXED_IMAGES):
    from dymu.images import load_batch

    values, _, failures = load_batch([str(image_dir / f"{n}.png") for n in names], processor)
    assert not failures
    return values
