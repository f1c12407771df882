"""Operations on frames read where a detector file stores them give what the same frames
held in memory give (diffgpu.sources, map_stored and the decoded groups of a task)."""

import numpy as np
import pytest

import diffgpu
import diffgpu.mapping as mapping
from diffgpu.readers.mib import write_mib


def _scan(tmp_path, size, nav=(3, 3), dtype="uint16"):
    """A .mib scan of a bright disc on a noisy background, and its frames."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    disc = ((yy - size / 2 - 1.3) ** 2 + (xx - size / 2 + 0.7) ** 2 < (size / 6) ** 2) * 4000
    frames = np.clip(rng.poisson(3, nav + (size, size)) + disc, 0, 4095).astype(dtype)
    path = str(tmp_path / "scan.mib")
    write_mib(path, frames)
    return path, frames


def test_no_frame_of_a_task_is_decoded_alone(tmp_path, monkeypatch):
    """A task's frames go to the operation in groups of near-equal size: a lone last frame
    went through BLAS's matrix-vector product, whose float32 sums lose about ten times the
    precision of the matrix product the other frames (and the frames in memory) get."""
    path, frames = _scan(tmp_path, 16, nav=(3, 3))
    monkeypatch.setattr(mapping, "DECODE_BYTES", 1)  # groups of MIN_CHUNK_FRAMES frames
    seen = []

    def sums(f):
        seen.append(f.shape[0])
        return f.reshape(f.shape[0], -1).sum(axis=1, dtype="float64")

    s = diffgpu.load(path)
    out = s.map_frames(sums, output_shape=(), dtype="float64")
    out.compute()
    np.testing.assert_array_equal(out.data, frames.reshape(3, 3, -1).sum(axis=2))
    assert sum(seen) == 9 and min(seen) > 1, seen

    # steps of a task's mapped reads: no lone last frame either
    seen.clear()
    monkeypatch.setattr(mapping, "MAP_BYTES", 4 * (384 + 16 * 16 * 2))  # 4 frames a map
    out = s.map_frames(sums, output_shape=(), dtype="float64")
    out.compute()
    np.testing.assert_array_equal(out.data, frames.reshape(3, 3, -1).sum(axis=2))
    assert sum(seen) == 9 and min(seen) > 1, seen


@pytest.mark.parametrize("op", ["com_threshold", "virtual_9"])
def test_large_frames_from_file_equal_memory(tmp_path, op):
    """384 x 384 frames, 8 decoded at a time: the 9th frame of the scan agreed with the
    frames in memory to 4e-4 px of centre of mass (matrix-vector float32 sums) before its
    group was balanced with the others."""
    path, frames = _scan(tmp_path, 384)
    s = diffgpu.load(path)
    mem = diffgpu.DiffractionPatterns(frames)
    mem.axes_manager.signal_axes[0].offset = s.axes_manager.signal_axes[0].offset
    mem.axes_manager.signal_axes[1].offset = s.axes_manager.signal_axes[1].offset
    if op == "com_threshold":
        got, want = s.center_of_mass(threshold=1.0), mem.center_of_mass(threshold=1.0)
        got.compute()
        np.testing.assert_allclose(got.data, want.data, atol=1e-4)
    else:
        masks = [np.random.default_rng(k).random((384, 384)) > 0.3 for k in range(9)]
        got, want = s.get_virtual_image(masks), mem.get_virtual_image(masks)
        got.compute()
        exact = np.einsum("abij,kij->kab", frames.astype(np.float64), np.stack(masks).astype(float))
        np.testing.assert_allclose(want.data, exact, rtol=1.5e-6)
        np.testing.assert_allclose(got.data, exact, rtol=1.5e-6)


@pytest.mark.parametrize("dtype", ["uint8", "uint16"])
def test_frames_loaded_by_relative_path_stay_that_file_after_chdir(tmp_path, monkeypatch, dtype):
    """A DigitalMicrograph stack loaded by a relative path read the file of that name in the
    working directory of the moment: after ``os.chdir`` its frames came from another file,
    while the operations that read the stored words in place (uint8 here) still read the
    first, so that one signal gave two scans' numbers."""
    from _dm4 import write_dm4

    for name, value in (("a", 1), ("b", 2)):
        (tmp_path / name).mkdir()
        write_dm4(tmp_path / name / "scan.dm4", np.full((2, 3, 12, 10), value, dtype))
    monkeypatch.chdir(tmp_path / "a")
    s = diffgpu.load("scan.dm4")
    monkeypatch.chdir(tmp_path / "b")
    np.testing.assert_array_equal(s.data.compute(), 1)
    v = s.get_virtual_image(np.ones((12, 10), bool))
    v.compute()
    np.testing.assert_array_equal(v.data, 120)
