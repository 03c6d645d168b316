"""Output files, written atomically: a failed or interrupted run never leaves a partial file behind."""
import os
import tempfile


def atomic_write(path: str, write) -> str:
    """Call write(binary_file) on a temporary file in path's directory, then rename it over `path`."""
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path
