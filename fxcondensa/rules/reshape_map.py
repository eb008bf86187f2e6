"""Where a tensor's channel dim goes through view / reshape / flatten: pure shape arithmetic.

A reshape is read as runs of source and destination dims with equal element counts (the usual grouping);
the channel dim survives when, inside its run, the channel index varies along exactly one destination dim.
"""

from __future__ import annotations

import torch

__all__ = ["reshape_target", "reshape_index"]


def _runs(src: tuple[int, ...], dst: tuple[int, ...]) -> list[tuple[list[int], list[int]]] | None:
    """Pair runs of source and destination dims with equal products (the usual reshape grouping)."""
    blocks, i, j = [], 0, 0
    while i < len(src) or j < len(dst):
        si, dj = [], []
        ps = pd = 1
        if i < len(src):
            si.append(i)
            ps *= src[i]
            i += 1
        if j < len(dst):
            dj.append(j)
            pd *= dst[j]
            j += 1
        while ps != pd:
            if ps < pd and i < len(src):
                si.append(i)
                ps *= src[i]
                i += 1
            elif pd < ps and j < len(dst):
                dj.append(j)
                pd *= dst[j]
                j += 1
            else:
                return None
        # Trailing size-1 dims join the current block.
        blocks.append((si, dj))
    return blocks


def reshape_index(src: tuple[int, ...], dst: tuple[int, ...], dim: int, new_dim: int) -> torch.Tensor:
    """For each index along ``new_dim`` of the output, the index along ``dim`` of the input it came from."""
    numel = 1
    for s in src:
        numel *= s
    pos = torch.arange(numel).view(src)
    src_index = pos.div(int(torch.tensor(src[dim + 1:]).prod()) if dim + 1 < len(src) else 1, rounding_mode="floor") % src[dim]
    out = src_index.reshape(dst)
    sel = [0] * len(dst)
    sel[new_dim] = slice(None)
    return out[tuple(sel)]


def reshape_target(src: tuple[int, ...], dst: tuple[int, ...], dim: int,
                    atoms: torch.Tensor) -> tuple[int, torch.Tensor] | None:
    """Where the tracked dim of ``src`` lands in ``dst`` and the atom of each index there; None if mixed."""
    runs = _runs(src, dst)
    if runs is None:
        return None
    for si, dj in runs:
        if dim not in si:
            continue
        sizes = [src[k] for k in si]
        shape = [1] * len(si)
        shape[si.index(dim)] = src[dim]
        grid = atoms.view(shape).expand(sizes).reshape([dst[k] for k in dj])
        # The atoms must vary along exactly one destination dim of the block.
        for pos, k in enumerate(dj):
            sel = [0] * len(dj)
            sel[pos] = slice(None)
            line = grid[tuple(sel)]
            view = [1] * len(dj)
            view[pos] = dst[k]
            if torch.equal(grid, line.view(view).expand_as(grid)):
                if dst[k] == 1 and src[dim] != 1:
                    continue
                return k, line.clone()
        return None
    return None
