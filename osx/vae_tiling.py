"""Open-Sora v2.0's VAE tiling (HunyuanVideo VAE, design/opensora-v2.0.md section 4.3), torch-free.

The VAE runs per tile: square spatial tiles that overlap by a quarter and are cross-faded linearly where they
meet, and optionally overlapping temporal tiles. The per-tile computation is the exported graph; these loops
stay on the host. Written with slicing and arithmetic only, so the same code stitches NumPy arrays (the
runtime, `cat=np.concatenate`) and torch tensors (export/hunyuan_vae.py, `cat=torch.cat`).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from osx.models_v2 import HunyuanVAEConfig


def tile_starts(size: int, stride: int) -> list[int]:
    """Tile origins along one axis: every `stride` from 0 while inside. The last tile may be short, even one a
    previous tile already covers: it is kept, as Open-Sora keeps it."""
    return list(range(0, size, stride))


def blend_into(prev, cur, extent: int, axis: int) -> None:
    """Cross-fade, in place, the first e = min(extent, both sizes) slices of `cur` along `axis` with the last e
    of `prev`: cur[y] = prev[y - e] * (1 - y/e) + cur[y] * y/e. One slice at a time with Python-float weights,
    so bf16 tensors round exactly as Open-Sora's loop does."""
    e = min(prev.shape[axis], cur.shape[axis], extent)
    axis %= cur.ndim
    for y in range(e):
        at = (slice(None),) * axis + (y,)
        cur[at] = prev[(slice(None),) * axis + (y - e,)] * (1 - y / e) + cur[at] * (y / e)


def stitch_spatial(grid: list[list], extent: int, keep: int, cat: Callable = np.concatenate):
    """Blend every tile with the one above, then with the one to its left (both already blended: Open-Sora's
    in-place order), crop each to its first `keep` rows and columns, and concatenate."""
    for i, row in enumerate(grid):
        for j, tile in enumerate(row):
            if i > 0:
                blend_into(grid[i - 1][j], tile, extent, axis=-2)
            if j > 0:
                blend_into(row[j - 1], tile, extent, axis=-1)
    return cat([cat([t[..., :keep, :keep] for t in row], -1) for row in grid], -2)


def stitch_temporal(tiles: list, extent: int, keep: int, cat: Callable = np.concatenate):
    """Blend consecutive temporal tiles along axis 2 (each after the first already without its first, shared,
    frame) and keep `keep` frames of each (`keep` + 1 of the first)."""
    for prev, cur in zip(tiles, tiles[1:]):
        blend_into(prev, cur, extent, axis=2)
    return cat([tiles[0][:, :, : keep + 1], *(t[:, :, :keep] for t in tiles[1:])], 2)


def tile_space(fn: Callable, x, size_in: int, size_out: int, overlap: float, cat: Callable = np.concatenate):
    """fn over square tiles of `size_in` every size_in * (1 - overlap) when H or W is larger than one tile
    (else over the whole); outputs cross-faded over size_out * overlap and cropped to the rest."""
    if max(x.shape[-2:]) <= size_in:
        return fn(x)
    stride = int(size_in * (1 - overlap))
    grid = [
        [fn(x[..., i : i + size_in, j : j + size_in]) for j in tile_starts(x.shape[-1], stride)]
        for i in tile_starts(x.shape[-2], stride)
    ]
    extent = int(size_out * overlap)
    return stitch_spatial(grid, extent, size_out - extent, cat)


def tile_time(fn: Callable, x, size_in: int, size_out: int, overlap: float, cat: Callable = np.concatenate):
    """fn over tiles of size_in + 1 frames every size_in * (1 - overlap) when T > size_in (else over the whole);
    each output after the first loses its first (shared) frame; cross-faded over size_out * overlap frames."""
    if x.shape[2] <= size_in:
        return fn(x)
    tiles = [fn(x[:, :, i : i + size_in + 1]) for i in tile_starts(x.shape[2], int(size_in * (1 - overlap)))]
    tiles = tiles[:1] + [t[:, :, 1:] for t in tiles[1:]]
    extent = int(size_out * overlap)
    return stitch_temporal(tiles, extent, size_out - extent, cat)


def _tiled(fn, x, cfg: HunyuanVAEConfig, space: tuple[int, int], time: tuple[int, int], spatial: bool, temporal: bool, cat):
    per_tile = (lambda t: tile_space(fn, t, *space, cfg.tile_overlap_factor, cat)) if spatial else fn
    return tile_time(per_tile, x, *time, cfg.tile_overlap_factor, cat) if temporal else per_tile(x)


def tiled_encode(encode_moments: Callable, video, cfg: HunyuanVAEConfig, spatial: bool, temporal: bool, cat: Callable = np.concatenate):
    """Posterior moments of `video` [B,3,F,H,W] with Open-Sora's encode tiling: pixel tiles of cfg.sample_size,
    temporal tiles of cfg.sample_tsize frames; `encode_moments` maps a pixel tile to its moments."""
    space, time = (cfg.sample_size, cfg.tile_latent_size), (cfg.sample_tsize, cfg.tile_latent_tsize)
    return _tiled(encode_moments, video, cfg, space, time, spatial, temporal, cat)


def tiled_decode(decode_tile: Callable, latents, cfg: HunyuanVAEConfig, spatial: bool, temporal: bool, cat: Callable = np.concatenate):
    """Pixels of `latents` [B,16,T,h,w] with Open-Sora's decode tiling: latent tiles of cfg.tile_latent_size
    (256 px), temporal tiles of cfg.tile_latent_tsize latent frames; `decode_tile` maps a latent tile to pixels."""
    space, time = (cfg.tile_latent_size, cfg.sample_size), (cfg.tile_latent_tsize, cfg.sample_tsize)
    return _tiled(decode_tile, latents, cfg, space, time, spatial, temporal, cat)
