"""Textures for the demo rooms: tileable procedural images (numpy + OpenCV) and a list of
textured images that ship with ``pybullet_data``. Deterministic for a given generator state.
"""

from __future__ import annotations

import cv2
import numpy as np

TEXTURE_SIZE = 256
# Textured images shipped with pybullet_data that read well as surface textures.
DATA_TEXTURES = ("checker_grid.jpg", "tex256.png", "uvmap.png", "colors16.png",
                 "jenga/jenga.png", "domino/domino.jpg", "cube.png", "heightmaps/Maze.png")


def _palette(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` RGB colours in [0,1] around a random hue, ``[n,3]`` float32."""
    hue = rng.uniform(0, 180)
    hues = (hue + rng.normal(0, 25, n)) % 180
    if rng.random() < 0.4:  # a contrasting accent colour
        hues[-1] = (hue + 90) % 180
    sat = rng.uniform(40, 200, n)
    val = rng.uniform(60, 250, n)
    sign = -1.0 if val[0] > 155 else 1.0
    val[1] = np.clip(val[0] + sign * rng.uniform(70, 150), 30, 255)  # keep a value contrast
    hsv = np.stack([hues, sat, val], -1).astype(np.uint8)[None]
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0].astype(np.float32) / 255.0


def _noise(rng: np.random.Generator, size: int, beta: float) -> np.ndarray:
    """Periodic fractal noise ``[S,S]`` in [0,1] (white noise shaped to a 1/f^beta spectrum)."""
    fy, fx = np.fft.fftfreq(size), np.fft.rfftfreq(size)
    radius = np.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2)
    radius[0, 0] = 1.0
    spectrum = np.fft.rfft2(rng.standard_normal((size, size))) / radius ** beta
    spectrum[0, 0] = 0
    out = np.fft.irfft2(spectrum, s=(size, size))
    return ((out - out.min()) / (np.ptp(out) + 1e-12)).astype(np.float32)


def make_texture(rng: np.random.Generator, style: str, size: int = TEXTURE_SIZE) -> np.ndarray:
    """A tileable procedural texture ``[S,S,3]`` uint8.

    Styles: "marble" (noise between colours), "tiles" (grid with grout), "bricks",
    "checker", "wood" (warped stripes), "dots" (random discs).
    """
    cols = _palette(rng, 3)
    noise = _noise(rng, size, rng.uniform(1.0, 1.7))
    u, v = np.meshgrid(np.arange(size), np.arange(size))
    if style == "marble":
        t = np.clip((noise - 0.5) * rng.uniform(2, 4) + 0.5, 0, 1)[..., None]
        img = cols[0] * (1 - t) + cols[1] * t
    elif style in ("tiles", "bricks"):
        n = int(rng.choice([2, 4, 8]))
        cell = size // n
        row = v // cell
        shift = (row % 2) * (cell // 2) if style == "bricks" else 0
        col = ((u + shift) // cell) % n
        pick = rng.random((n, n))
        img = cols[0] * (1 - pick[row, col])[..., None] + cols[1] * pick[row, col][..., None]
        grout = (((u + shift) % cell) < 3) | ((v % cell) < 3)
        img[grout] = cols[2] * 0.6
    elif style == "checker":
        n = int(rng.choice([4, 8]))
        cell = size // n
        img = np.where((((u // cell) + (v // cell)) % 2)[..., None] == 1, cols[0], cols[1])
    elif style == "wood":
        k = int(rng.integers(3, 9))
        t = 0.5 + 0.5 * np.sin(2 * np.pi * (k * v / size + rng.uniform(1, 3) * noise))
        img = cols[0] * (1 - t[..., None]) + cols[1] * t[..., None]
    elif style == "dots":
        img = np.ones((size, size, 3), np.float32) * cols[0]
        for _ in range(int(rng.integers(20, 60))):
            c = cols[int(rng.integers(1, 3))] * rng.uniform(0.6, 1.0)
            x, y, r = rng.integers(0, size), rng.integers(0, size), int(rng.integers(4, 20))
            for dx in (-size, 0, size):  # draw wrapped copies so the texture tiles
                for dy in (-size, 0, size):
                    cv2.circle(img, (int(x + dx), int(y + dy)), r, c.tolist(), -1)
    else:
        raise ValueError(f"unknown texture style {style!r}")
    img = np.asarray(img, np.float32) * (0.75 + 0.5 * noise[..., None])  # grain everywhere
    return np.clip(img * 255, 0, 255).astype(np.uint8)


def random_texture(rng: np.random.Generator, styles: tuple[str, ...], p_data: float):
    """A pybullet_data file name (probability ``p_data``) or a procedural texture array."""
    if rng.random() < p_data:
        return str(rng.choice(DATA_TEXTURES))
    return make_texture(rng, str(rng.choice(styles)))
