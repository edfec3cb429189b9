"""Tensors stored as dim-0 row blocks, one block per rank, in safetensors files: the
format of Stage 2 checkpoints and of a Stage 1 artifact written under FSDP.

Rank r's block of a tensor holds the rows FSDP2 gives rank r (``torch.chunk``'s split:
ceil(rows / N) each, the last ranks fewer or none). A reader pieces a tensor's rows back
together from the blocks in rank order, lazily: a read takes only the rows asked, from
whichever files hold them, so a rank of another layout (or another worker count) reads
its own rows without any process holding the whole tensor.
"""

from __future__ import annotations

import torch
from safetensors import safe_open


class RowBlocks:
    """Read row ranges of tensors split across ``files``, given as (rank, path) pairs.
    A rank may spread its block over several files; each tensor's block is in one file
    per rank. A 0-dim tensor is stored whole by every rank. Files are opened for each
    read and closed after it: a long-lived mapping would keep every page it ever read
    resident, the whole file in the end."""

    def __init__(self, files: list[tuple[int, str]]):
        self._paths: dict[str, list[str]] = {}  # name -> its blocks' files, in rank order
        for _, path in sorted(files):
            with safe_open(path, "pt") as f:
                for key in f.keys():
                    self._paths.setdefault(key, []).append(path)

    def keys(self) -> list[str]:
        return list(self._paths)

    def read(self, key: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows [start, stop) of tensor ``key`` (all of them when stop is None), as a
        tensor of its own (no mapping kept)."""
        pieces, offset, empty = [], 0, None
        for path in self._paths[key]:
            with safe_open(path, "pt") as f:
                part = f.get_slice(key)
                if not part.get_shape():  # 0-dim: whole in every block
                    return f.get_tensor(key)
                n = part.get_shape()[0]
                a, b = max(start, offset), offset + n if stop is None else min(stop, offset + n)
                if a < b:
                    pieces.append(part[a - offset : b - offset])
                elif empty is None:
                    empty = part[0:0]  # a rank with no rows of this tensor (uneven split)
            offset += n
        if not pieces:
            return empty
        return torch.cat(pieces) if len(pieces) > 1 else pieces[0].clone()
