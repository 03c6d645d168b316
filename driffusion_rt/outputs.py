"""Output files, written all-or-nothing: a failed or interrupted run never leaves a partial file or a partial set of
files behind, and the output directory is checked before any work starts; and the bytes of a PNG, an MP4 or an
NPY."""
import io
import os
import tempfile

import numpy as np


def _file_mode() -> int:
    """0666 minus the process umask: what open() would have created (mkstemp alone gives 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _stage(path: str, write) -> str:
    """write(binary_file) into a temporary file next to `path`; returns the temporary file's name."""
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=d, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        os.fchmod(fd, _file_mode())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        os.unlink(tmp)
        raise
    return tmp


def atomic_write(path, write) -> str:
    """Call write(binary_file) on a temporary file in path's directory, then rename it over `path`."""
    return write_all([(path, write)])[0]


def write_all(items) -> list:
    """Write several files as one unit: every (path, write) is staged in a temporary file first, then all are renamed
    into place. If any write or rename fails, the staged files and the ones already renamed are removed, so either
    every file of the run is there or none is."""
    items = [(os.fspath(p), w) for p, w in items]
    for path, _ in items:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    staged, placed = [], []
    try:
        for path, write in items:
            staged.append((path, _stage(path, write)))
        for path, tmp in staged:
            os.replace(tmp, path)
            placed.append(path)
    except BaseException:
        for path, tmp in staged:
            if path not in placed and os.path.exists(tmp):
                os.unlink(tmp)
        for path in placed:
            os.unlink(path)
        raise
    return [p for p, _ in items]


def check_output_dir(out_dir: str, names=()) -> str:
    """Check, without creating anything that stays, that the run's files can be written to `out_dir`: it is a
    directory (or can be created as one) that accepts new files, and none of `names` is taken by a directory.
    Returns the absolute directory. Raises ValueError naming the problem."""
    out = os.path.abspath(out_dir)
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out_dir!r} is a file, not a directory")
    existing = out
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(f"--out {out_dir!r} cannot be created: {existing!r} is a file, not a directory")
    try:  # a real probe: permission bits do not tell (root, read-only mounts, ACLs)
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".driffusion-probe.")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        what = "is not writable" if existing == out else f"cannot be created: {existing!r} is not writable"
        raise ValueError(f"--out {out_dir!r} {what} ({e.strerror or e})") from None
    for name in names:
        if os.path.isdir(os.path.join(out, name)):
            raise ValueError(f"--out {out_dir!r}: the output name {name!r} is taken by a directory")
    return out


def png_bytes(image) -> bytes:
    """A PIL image as PNG file bytes."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def npy_bytes(tensor) -> bytes:
    """A tensor as NumPy .npy file bytes (numpy.load reads them back: dtype and shape included)."""
    buf = io.BytesIO()
    np.save(buf, tensor.detach().cpu().numpy(), allow_pickle=False)
    return buf.getvalue()


def mp4_bytes(frames, fps: int) -> bytes:
    """Frames (PIL images or [H, W, 3] floats in 0..1) as H.264 MP4 file bytes (diffusers' export_to_video,
    imageio-ffmpeg)."""
    from diffusers.utils import export_to_video  # heavy: diffusers takes seconds to import
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "video.mp4")
        # macro_block_size 2: H.264 needs even sides, which every family's size rule gives; the default 16 would let
        # ffmpeg rescale a frame whose side is not a multiple of 16
        export_to_video(frames, path, fps=fps, macro_block_size=2)
        with open(path, "rb") as f:
            return f.read()
