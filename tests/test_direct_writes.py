"""io.direct_writes: pieces of a file written at any offsets, in any order, through O_DIRECT's
whole aligned blocks plus held-back partial blocks, give exactly the bytes ordinary writes give;
so do the fall-backs (O_DIRECT refused at open or in the middle, a file too small for it)."""
import errno
import os

import pytest
import torch

from scoremerge.io import direct_writes
from scoremerge.io.direct_writes import BLOCK, DirectWrites


def pieces(size, seed):
    """Random non-overlapping cuts of [0, size), shuffled: some tiny, some many blocks long."""
    g = torch.Generator().manual_seed(seed)
    cuts = sorted(set(torch.randint(1, size, (40,), generator=g).tolist()) |
                  {BLOCK * 3, BLOCK * 3 + 1, size - 1})
    bounds = [0, *[c for c in cuts if 0 < c < size], size]
    spans = list(zip(bounds, bounds[1:]))
    order = torch.randperm(len(spans), generator=g).tolist()
    return [spans[i] for i in order]


def written(tmp_path, size, spans, data):
    path = tmp_path / "f"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, size)
        writes = DirectWrites(fd, size)
        for lo, hi in spans:
            writes.write(memoryview(data)[lo:hi], lo)
        writes.finish()
        direct = writes.direct
    finally:
        os.close(fd)
    return path.read_bytes(), direct


@pytest.mark.parametrize("size", [(17 << 20) + 12345, 17 << 20, 5000])
def test_pieces_in_any_order_give_the_same_bytes(tmp_path, size, monkeypatch):
    monkeypatch.setattr(direct_writes, "_BOUNCE", 1 << 20)     # several bounce rounds
    seed = int(torch.randint(0, 2**31, (1,)))
    data = torch.randint(0, 256, (size,), dtype=torch.uint8).numpy().tobytes()
    got, direct = written(tmp_path, size, pieces(size, seed), data)
    assert got == data, seed
    assert direct == (size >= direct_writes._MIN_SIZE and _direct_allowed(tmp_path))


def test_o_direct_refused_mid_way_falls_back_without_losing_bytes(tmp_path, monkeypatch):
    size = (17 << 20) + 777
    data = torch.randint(0, 256, (size,), dtype=torch.uint8).numpy().tobytes()
    real, calls = os.pwrite, []

    def flaky(fd, view, offset):
        calls.append(offset)
        if len(calls) == 5 and offset % BLOCK == 0 and len(view) % BLOCK == 0:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, view, offset)
    monkeypatch.setattr(direct_writes.os, "pwrite", flaky)
    got, direct = written(tmp_path, size, pieces(size, 7), data)
    assert got == data and not direct


@pytest.mark.parametrize("refused", ["a held block", "the last short block"])
def test_o_direct_refused_at_a_held_block_loses_nothing(tmp_path, monkeypatch, refused):
    """The fall-back can start while held bytes go out: when a write's head completes a held
    block (the header's, here), or at finish() with the file's last short block. Every byte
    lands, once, and the file keeps its size."""
    if not _direct_allowed(tmp_path):
        pytest.skip("this file system refuses O_DIRECT")
    size = (17 << 20) + 1234                           # the last block is short
    data = torch.randint(0, 256, (size,), dtype=torch.uint8).numpy().tobytes()
    header = 777
    spans = [(0, header), (header, size - 999), (size - 999, size)]
    real, refusals = os.pwrite, []
    target = 0 if refused == "a held block" else (size - 1) // BLOCK * BLOCK

    def flaky(fd, view, offset):
        if offset == target and len(view) == BLOCK and not refusals:
            refusals.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, view, offset)
    monkeypatch.setattr(direct_writes.os, "pwrite", flaky)
    got, direct = written(tmp_path, size, spans, data)
    assert refusals == [target] and not direct and len(got) == size and got == data


def test_o_direct_refused_at_open_writes_through_the_cache(tmp_path, monkeypatch):
    def refuse(fd, cmd, arg=0):
        if cmd == direct_writes.fcntl.F_SETFL:
            raise OSError(errno.EINVAL, "Invalid argument")
        return 0
    monkeypatch.setattr(direct_writes.fcntl, "fcntl", refuse)
    size = (17 << 20) + 3
    data = torch.randint(0, 256, (size,), dtype=torch.uint8).numpy().tobytes()
    got, direct = written(tmp_path, size, pieces(size, 3), data)
    assert got == data and not direct


def _direct_allowed(folder):
    try:
        fd = os.open(folder / "probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT)
    except OSError:
        return False
    os.close(fd)
    return True
