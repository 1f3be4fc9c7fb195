"""Durable files: written to a temporary name, fsync'ed, renamed, the directory fsync'ed."""

import os


def fsync_path(path: str) -> None:
    """Flush a file's or a directory's entry to disk (a directory: the names in it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(tmp: str, final: str) -> None:
    """fsync ``tmp`` (a file's data, a directory's entries: its files must be fsync'ed already), rename it
    to ``final`` and fsync the parent directory, so that after a crash ``final`` is absent or complete."""
    fsync_path(tmp)
    os.replace(tmp, final)
    fsync_path(os.path.dirname(os.path.abspath(final)))


def atomic_write_text(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    publish(tmp, path)
