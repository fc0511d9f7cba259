import io
import os
import sys
import tarfile

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


@pytest.fixture
def caption_shards(tmp_path):
    """write(sizes, corrupt=()) -> a brace spec of webdataset shards in tmp_path holding PNG + caption
    pairs, sizes[k] pairs in shard k; the samples numbered in `corrupt` get an undecodable image."""
    from PIL import Image

    def write(sizes, corrupt=()):
        index = 0
        for shard, size in enumerate(sizes):
            with tarfile.open(tmp_path / f"shard-{shard}.tar", "w") as tar:
                for i in range(size):
                    buf = io.BytesIO()
                    Image.new("RGB", (36, 36), (i * 9 % 256, 60 + 50 * shard, 120)).save(buf, format="PNG")
                    png = b"not an image" if index in corrupt else buf.getvalue()
                    for ext, data in (("png", png), ("txt", f"a picture of thing {i} in shard {shard}".encode())):
                        info = tarfile.TarInfo(f"{shard:02d}{i:04d}.{ext}")
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))
                    index += 1
        return str(tmp_path / f"shard-{{0..{len(sizes) - 1}}}.tar")

    return write


@pytest.fixture(scope="session")
def patch_png(tmp_path_factory):
    """A 6 x 6 RGB patch image for the 'optimized' (BadCLIP) trigger: value (17 r + 5 c + 60 ch) mod 256."""
    import numpy as np
    from PIL import Image

    r, c, ch = np.meshgrid(np.arange(6), np.arange(6), np.arange(3), indexing="ij")
    path = tmp_path_factory.mktemp("patch") / "patch.png"
    Image.fromarray(((17 * r + 5 * c + 60 * ch) % 256).astype(np.uint8), "RGB").save(path)
    return str(path)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a test module: the test machine's 2 cores are shared, and one thread avoids
    OpenMP spin-waiting under contention (modules opt in with pytest.mark.usefixtures("one_thread"))."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each test is a run of its own, as each command is a process of its own: Accelerate's
    per-process settings (precision, cpu) from an earlier test or a module fixture's training do not
    carry over (private API, used in tests only; the scripts never need it)."""

    def reset():
        if "accelerate" in sys.modules:
            from accelerate.state import AcceleratorState, GradientState

            AcceleratorState._reset_state()
            GradientState._reset_state()

    reset()
    yield
    reset()
