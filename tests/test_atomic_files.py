"""Atomic writes: normal permissions, the replaced file's mode kept, temp files of killed saves cleaned up."""
import os
import stat
import subprocess
import sys

from lorakit.formats.atomic import atomic_write, remove_stale_temp_files


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_new_files_get_0666_minus_umask_and_replaced_files_keep_their_mode(tmp_path):
    old = os.umask(0o022)
    try:
        path = atomic_write(tmp_path / "a.safetensors", b"x")
        assert mode(path) == 0o644  # kohya's files: readable by ComfyUI running as another user
        os.chmod(path, 0o640)
        atomic_write(path, b"yy")
        assert mode(path) == 0o640 and path.read_bytes() == b"yy"
        os.umask(0o077)
        assert mode(atomic_write(tmp_path / "b.txt", "z")) == 0o600
    finally:
        os.umask(old)


def test_a_killed_saves_temp_file_is_removed_and_a_live_ones_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = tmp_path / f".lora.safetensors.{dead}.abc123.tmp"
    live = tmp_path / f".lora.safetensors.{os.getpid()}.def456.tmp"
    other = tmp_path / ".hidden.tmp"  # not ours: no pid in the name
    for p in (stale, live, other):
        p.write_bytes(b"partial")
    assert remove_stale_temp_files(tmp_path) == [stale]
    assert not stale.exists() and live.exists() and other.exists()
    assert remove_stale_temp_files(tmp_path / "missing") == []


def test_a_failed_write_leaves_the_old_file_and_no_temp_file(tmp_path):
    path = atomic_write(tmp_path / "keep.txt", "old")

    def boom(f):
        f.write(b"half")
        raise OSError(28, "No space left on device")

    try:
        atomic_write(path, boom)
    except OSError:
        pass
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["keep.txt"]
