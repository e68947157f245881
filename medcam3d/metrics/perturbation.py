"""Deletion / insertion curves (Petsiuk et al., RISE 2018) for maps of any rank, batched in torch.

Deletion: replace the most important voxels first (by the map) with a baseline and watch the class
probability fall; a faithful map makes it fall fast (low AUC). Insertion: start from the baseline and
put the most important voxels back first; a faithful map makes it rise fast (high AUC).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medcam3d.errors import ClassIndexError, InputError
from medcam3d.metrics._validate import ArrayLike, as_map, as_number, to_numpy

Baseline = Literal["blur", "mean"] | float | ArrayLike
Apply = Literal["sigmoid", "softmax"] | None


@dataclass(frozen=True)
class PerturbationCurve:
    """A deletion or insertion curve: ``scores[i]`` after perturbing ``fractions[i]`` of the voxels."""

    auc: float
    fractions: np.ndarray  # (steps + 1,), from 0 to 1
    scores: np.ndarray  # (steps + 1,)
    mode: str  # "deletion" or "insertion"


def gaussian_blur(x: torch.Tensor, sigma: float | Sequence[float]) -> torch.Tensor:
    """Separable Gaussian blur of ``x`` (C, *spatial) over its spatial axes; sigma in voxels per axis.

    Kernels are truncated at 3 sigma and edges are replicated, so the image mean is kept at borders.
    """
    nsp = x.ndim - 1
    sig = [float(sigma)] * nsp if np.isscalar(sigma) else [float(s) for s in sigma]  # type: ignore[union-attr]
    if len(sig) != nsp or not all(math.isfinite(s) and s >= 0 for s in sig):
        raise InputError(f"blur_sigma must be one number or {nsp} numbers >= 0 (voxels), got {sigma!r}")
    for ax, s in enumerate(sig):
        if s == 0:
            continue
        r = int(math.ceil(3 * s))
        t = torch.arange(-r, r + 1, dtype=x.dtype, device=x.device)
        k = torch.exp(-0.5 * (t / s) ** 2)
        k = (k / k.sum()).view(1, 1, -1)
        y = x.movedim(ax + 1, -1)
        shp = y.shape
        y = F.conv1d(F.pad(y.reshape(-1, 1, shp[-1]), (r, r), mode="replicate"), k)
        x = y.reshape(shp).movedim(-1, ax + 1)
    return x


def _prepare(image: ArrayLike, saliency: ArrayLike) -> tuple[torch.Tensor, np.ndarray]:
    """image → float32 tensor (C, *spatial); saliency → float64 numpy (*spatial)."""
    s = as_map(saliency)
    if isinstance(image, np.ndarray):
        img = torch.from_numpy(np.ascontiguousarray(image))
    elif isinstance(image, torch.Tensor):
        img = image.detach()
    else:
        raise InputError(f"image must be a numpy array or torch tensor, got {type(image).__name__}")
    if not (img.dtype.is_floating_point or img.dtype in (torch.uint8, torch.int8, torch.int16,
                                                         torch.int32, torch.int64)):
        raise InputError(f"image must be real numeric, got dtype {img.dtype}")
    img = img.float()
    k = s.ndim
    if tuple(img.shape[-k:]) != s.shape or img.ndim - k > 2 or (img.ndim - k == 2 and img.shape[0] != 1):
        raise InputError(f"image shape {tuple(img.shape)} does not fit saliency shape {s.shape}: expected "
                         f"{s.shape}, (C, *{s.shape}) or (1, C, *{s.shape})")
    if img.ndim == k:
        img = img.unsqueeze(0)
    elif img.ndim == k + 2:
        img = img[0]
    if not torch.isfinite(img).all():
        raise InputError("image contains NaN or infinite values")
    return img, s


def _baseline(baseline: Baseline, img: torch.Tensor, blur_sigma: float | Sequence[float]) -> torch.Tensor:
    if isinstance(baseline, str):
        if baseline == "blur":
            return gaussian_blur(img, blur_sigma)
        if baseline == "mean":
            return img.mean(dim=tuple(range(1, img.ndim)), keepdim=True).expand_as(img)
        raise InputError(f"baseline must be 'blur', 'mean', a number or an array, got {baseline!r}")
    if isinstance(baseline, (int, float, np.integer, np.floating)) and not isinstance(baseline, bool):
        v = as_number(baseline, "baseline")
        return torch.full_like(img, v)
    arr = torch.from_numpy(np.array(to_numpy(baseline, "baseline"), dtype=np.float32)).to(img.device)
    try:
        return torch.broadcast_to(arr, img.shape)
    except RuntimeError:
        raise InputError(f"baseline array of shape {tuple(arr.shape)} cannot be broadcast to the image "
                         f"shape {tuple(img.shape)} (C, *spatial)") from None


def _score(out: object, class_idx: int, apply: Apply) -> torch.Tensor:
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        raise InputError("model_fn must return a (B, K) tensor of logits or probabilities, got "
                         f"{type(out).__name__}{'' if not isinstance(out, torch.Tensor) else tuple(out.shape)}")
    if not 0 <= class_idx < out.shape[1]:
        raise ClassIndexError(f"class_idx {class_idx} is outside the model's {out.shape[1]} outputs")
    out = out.float()
    if apply == "sigmoid":
        return torch.sigmoid(out[:, class_idx])
    if apply == "softmax":
        return torch.softmax(out, dim=1)[:, class_idx]
    return out[:, class_idx]


def _curve(mode: str, model_fn: Callable[[torch.Tensor], torch.Tensor], image: ArrayLike,
           saliency: ArrayLike, class_idx: int, steps: int, baseline: Baseline, apply: Apply,
           batch_size: int, blur_sigma: float | Sequence[float], device: str | torch.device | None
           ) -> PerturbationCurve:
    if not callable(model_fn):
        raise InputError(f"model_fn must be callable (B, C, *spatial) -> (B, K), got {type(model_fn).__name__}")
    if apply not in ("sigmoid", "softmax", None):
        raise InputError(f"apply must be 'sigmoid', 'softmax' or None, got {apply!r}")
    if isinstance(class_idx, bool) or not isinstance(class_idx, (int, np.integer)):
        raise InputError(f"class_idx must be an integer, got {class_idx!r}")
    img, s = _prepare(image, saliency)
    n = s.size
    for name, v in (("steps", steps), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise InputError(f"{name} must be a positive integer, got {v!r}")
    if steps > n:
        raise InputError(f"steps ({steps}) cannot exceed the number of voxels ({n})")
    if device is None:
        param = next(model_fn.parameters(), None) if isinstance(model_fn, nn.Module) else None
        device = param.device if param is not None else img.device
    img = img.to(device)
    base = _baseline(baseline, img, blur_sigma).to(device)

    # rank voxels: most important first; ties keep C order (stable sort), so the curve is reproducible
    order = np.argsort(-s.ravel(), kind="stable")
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n)
    rank_t = torch.from_numpy(rank).to(device).view(1, 1, *s.shape)
    counts = np.rint(np.linspace(0, n, steps + 1)).astype(np.int64)
    first, second = (base, img) if mode == "deletion" else (img, base)

    was_training = model_fn.training if isinstance(model_fn, nn.Module) else None
    scores = []
    try:
        if isinstance(model_fn, nn.Module):
            model_fn.eval()
        with torch.no_grad():
            for start in range(0, steps + 1, batch_size):
                k = torch.as_tensor(counts[start:start + batch_size], device=device)
                hit = rank_t < k.view(-1, *([1] * (s.ndim + 1)))  # (b, 1, *spatial)
                batch = torch.where(hit, first.unsqueeze(0), second.unsqueeze(0))
                scores.append(_score(model_fn(batch), int(class_idx), apply).cpu())
    finally:
        if isinstance(model_fn, nn.Module) and was_training is not None:
            model_fn.train(was_training)
    sc = torch.cat(scores).double().numpy()
    fr = counts / n
    auc = float(np.sum(np.diff(fr) * (sc[1:] + sc[:-1]) / 2.0))
    return PerturbationCurve(auc=auc, fractions=fr, scores=sc, mode=mode)


def deletion_auc(model_fn: Callable[[torch.Tensor], torch.Tensor], image: ArrayLike, saliency: ArrayLike,
                 class_idx: int, steps: int = 20, baseline: Baseline = "blur", apply: Apply = "sigmoid",
                 batch_size: int = 8, blur_sigma: float | Sequence[float] = 5.0,
                 device: str | torch.device | None = None) -> PerturbationCurve:
    """Deletion curve and its AUC (lower = the map found what the model needs).

    Definition: rank voxels by saliency, descending (ties: lower flat C-order index first). For
    i = 0..steps, k_i = round(i * N / steps) and image_i = image with its k_i top-ranked voxels (all
    channels) replaced by the baseline; score_i = class probability of model_fn(image_i) after
    ``apply`` ("sigmoid" for multi-label logits, "softmax" for multi-class logits, None if model_fn
    already returns probabilities). AUC = trapezoid rule of score over fraction k_i / N in [0, 1].

    image: (*spatial), (C, *spatial) or (1, C, *spatial), matching ``saliency``'s (*spatial).
    baseline: "blur" (Gaussian-blurred image, ``blur_sigma`` voxels), "mean" (per-channel image
    mean), a number (e.g. -1000 for HU air) or an array broadcastable to (C, *spatial).
    Perturbed images are scored ``batch_size`` at a time under no_grad; an nn.Module is put in eval()
    for the call and restored after. Runs on ``device`` (default: the model's, else the image's).
    """
    return _curve("deletion", model_fn, image, saliency, class_idx, steps, baseline, apply, batch_size,
                  blur_sigma, device)


def insertion_auc(model_fn: Callable[[torch.Tensor], torch.Tensor], image: ArrayLike, saliency: ArrayLike,
                  class_idx: int, steps: int = 20, baseline: Baseline = "blur", apply: Apply = "sigmoid",
                  batch_size: int = 8, blur_sigma: float | Sequence[float] = 5.0,
                  device: str | torch.device | None = None) -> PerturbationCurve:
    """Insertion curve and its AUC (higher = the map found what the model needs).

    Same definition as :func:`deletion_auc`, mirrored: image_i = the baseline with the k_i top-ranked
    voxels copied back from the image, so score_0 is the baseline's score and score_steps the image's.
    """
    return _curve("insertion", model_fn, image, saliency, class_idx, steps, baseline, apply, batch_size,
                  blur_sigma, device)
