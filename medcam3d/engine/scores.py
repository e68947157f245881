"""What is explained: a *score* maps the model's output to (B, N) numbers, one column per explainable
output; ``class_idx`` then picks K of the N columns.

The default, :class:`ClassLogits`, is the model's raw (B, N) class scores. The others let any model be
explained without a wrapper class: :class:`OutputKey` (one entry of a tuple/dict output),
:class:`RegionScore` (a segmentation network's logits of class c summed or averaged inside a mask or a
box) and :class:`Similarity` (cosine or dot product of an embedding with reference embeddings). Any
callable ``output -> (B, N) tensor`` works too; it must be differentiable in the output.

Completeness (what the signed HiResCAM map sums to, ``sum(raw) = <dS/dA, A>``) depends on the score:

- :class:`ClassLogits`, :class:`OutputKey`: ``S(A) - S(0)`` when the network after the target layer
  is linear in A (flatten/GAP + FC); a first-order approximation otherwise.
- :class:`RegionScore`: the score is linear in the logit map, so again ``S(A) - S(0)`` whenever the
  logits are linear in A (e.g. A = the input of the final 1x1 convolution); approximate otherwise.
- :class:`Similarity` ``"dot"``: linear in the embedding e, so ``S(A) - S(0)`` when e is linear in A.
- :class:`Similarity` ``"cosine"``: cos(e, r) is homogeneous of degree 0 in e, so by Euler's theorem
  ``<dS/de, e> = 0``. If ``e = W A + b`` after the target layer, the map sum is
  ``<dS/de, W A> = <dS/de, e - b> = -<dS/de, b>``: exactly 0 when the embedding has no bias after the
  target layer, and in general NOT the score. Its signed map shows where evidence pushes the
  embedding towards (positive) or away from (negative) the reference, and the two balance.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Literal, Union

import torch

from medcam3d.errors import InputError

#: A score: the model output (any structure) -> (B, N) tensor.
ScoreFn = Callable[[object], torch.Tensor]
ScoreSpec = Union[ScoreFn, str, None]


def _as_scores(value: object, batch: int, what: str) -> torch.Tensor:
    """Validate a (B, N) score tensor; (B,) is read as one column."""
    if not isinstance(value, torch.Tensor):
        raise InputError(
            f"{what} returned a {type(value).__name__}; the explainer needs a (B, N) tensor of scores. For a "
            "model returning a tuple or dict pass score=OutputKey(key); for a segmentation network "
            "score=RegionScore(mask); for an embedding score=Similarity(reference)."
        )
    if value.ndim == 1 and value.shape[0] == batch:
        value = value[:, None]
    if value.ndim != 2 or value.shape[0] != batch:
        raise InputError(
            f"{what} returned shape {tuple(value.shape)}; expected (B={batch}, N) scores. A segmentation "
            "output (B, C, *spatial) needs score=RegionScore(mask); an embedding (B, D) with no head "
            "needs score=Similarity(reference)."
        )
    return value


class ClassLogits:
    """The default: the model returns (B, N) raw class scores (logits); ``(B,)`` is one output."""

    name = "logits"

    def __call__(self, output: object) -> torch.Tensor:
        return output  # type: ignore[return-value]  # validated by scores_of

    def __repr__(self) -> str:
        return "ClassLogits()"


class OutputKey:
    """Explain one entry of a model that returns a tuple, list or dict.

    Args:
        key: index (tuple/list) or key (dict) of the entry; a sequence of keys walks nested outputs.
        then: score applied to that entry (default :class:`ClassLogits`, i.e. (B, N) logits).

    Raises (when called): InputError naming the available keys.
    """

    name = "output"

    def __init__(self, key: Hashable | Sequence[Hashable], then: ScoreFn | None = None) -> None:
        self.path = list(key) if isinstance(key, (list, tuple)) else [key]
        self.then = then if then is not None else ClassLogits()

    def __call__(self, output: object) -> torch.Tensor:
        value = output
        for key in self.path:
            try:
                value = value[key]  # type: ignore[index]
            except (KeyError, IndexError, TypeError):
                keys = list(value.keys()) if isinstance(value, dict) else (
                    list(range(len(value))) if isinstance(value, (list, tuple)) else "none"
                )
                raise InputError(
                    f"score=OutputKey({self.path!r}): the model output has no entry {key!r} "
                    f"(a {type(value).__name__}; available: {keys})."
                ) from None
        return self.then(value)

    def __repr__(self) -> str:
        return f"OutputKey({self.path!r})"


class RegionScore:
    """A segmentation network's evidence for "this region is class c": the sum or mean of each
    class's logits inside a region, giving (B, C) scores (``class_idx`` picks c).

    Args:
        mask: region on the model's output grid, (*spatial) or (B, *spatial), bool or 0/1; or
            None with ``box`` given.
        box: per spatial dim a ``(start, stop)`` voxel range (half-open) on the output grid.
        reduce: ``"mean"`` (default; insensitive to region size) or ``"sum"``.

    The output must be (B, C, *spatial) logits (before softmax/sigmoid: the score stays linear in
    them, see the module docstring for completeness). Raises InputError when the region is empty,
    has the wrong shape, or the output is not a spatial map.
    """

    name = "region"

    def __init__(
        self,
        mask: torch.Tensor | None = None,
        *,
        box: Sequence[tuple[int, int]] | None = None,
        reduce: Literal["mean", "sum"] = "mean",
    ) -> None:
        if (mask is None) == (box is None):
            raise InputError("RegionScore needs exactly one of mask= or box=.")
        if reduce not in ("mean", "sum"):
            raise InputError(f"RegionScore reduce must be 'mean' or 'sum', got {reduce!r}.")
        if mask is not None:
            mask = torch.as_tensor(mask)
            if mask.is_floating_point() and not bool(((mask == 0) | (mask == 1)).all()):
                raise InputError("RegionScore mask must be boolean or 0/1.")
            mask = mask.bool()
            if not bool(mask.any()):
                raise InputError("RegionScore mask is empty: no voxel would contribute to the score.")
        else:
            box = [tuple(int(v) for v in b) for b in box]  # type: ignore[union-attr]
            if any(len(b) != 2 or b[0] >= b[1] or b[0] < 0 for b in box):
                raise InputError(f"RegionScore box must be (start, stop) pairs with 0 <= start < stop, got {box}.")
        self.mask = mask
        self.box = box
        self.reduce = reduce

    def _region(self, spatial: tuple[int, ...], batch: int, device: torch.device) -> torch.Tensor:
        if self.box is not None:
            if len(self.box) != len(spatial) or any(b[1] > s for b, s in zip(self.box, spatial)):
                raise InputError(f"RegionScore box {self.box} does not fit the output grid {spatial}.")
            region = torch.zeros(spatial, dtype=torch.bool, device=device)
            region[tuple(slice(a, b) for a, b in self.box)] = True
            return region.expand(batch, *spatial)
        mask = self.mask.to(device)
        if mask.shape == spatial:
            return mask.expand(batch, *spatial)
        if mask.shape == (batch, *spatial):
            if not bool(mask.flatten(1).any(dim=1).all()):
                raise InputError("RegionScore mask is empty for at least one sample of the batch.")
            return mask
        raise InputError(
            f"RegionScore mask has shape {tuple(mask.shape)} but the output grid is {spatial} "
            f"(batch {batch}); give the mask on the model's output grid."
        )

    def __call__(self, output: object) -> torch.Tensor:
        if not isinstance(output, torch.Tensor) or output.ndim < 3:
            what = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
            raise InputError(f"RegionScore needs a (B, C, *spatial) segmentation output, got {what}.")
        batch, spatial = output.shape[0], tuple(output.shape[2:])
        region = self._region(spatial, batch, output.device).unsqueeze(1).to(output.dtype)  # (B,1,*s)
        total = (output * region).flatten(2).sum(dim=2)  # (B, C)
        if self.reduce == "sum":
            return total
        return total / region.flatten(2).sum(dim=2)

    def __repr__(self) -> str:
        where = f"box={self.box}" if self.box is not None else f"mask{tuple(self.mask.shape)}"
        return f"RegionScore({where}, reduce={self.reduce!r})"


class Similarity:
    """Similarity of the model's embedding to R reference embeddings: (B, R) scores.

    Args:
        reference: (D,) or (R, D) reference embedding(s) (e.g. the embedding of a typical case).
        kind: ``"cosine"`` (default) or ``"dot"``. See the module docstring for what the signed map
            sums to: for cosine it is ``-<dS/de, b>`` (0 for an embedding with no bias after the
            target layer), for dot it is ``S(A) - S(0)`` when the embedding is linear in A.

    The output must be (B, D) (or (B, D, ...), flattened to D). Raises InputError on a size mismatch.
    """

    name = "similarity"

    def __init__(self, reference: torch.Tensor, kind: Literal["cosine", "dot"] = "cosine") -> None:
        if kind not in ("cosine", "dot"):
            raise InputError(f"Similarity kind must be 'cosine' or 'dot', got {kind!r}.")
        ref = torch.as_tensor(reference).detach()
        if ref.ndim == 1:
            ref = ref[None]
        if ref.ndim != 2 or not ref.is_floating_point():
            raise InputError(f"Similarity reference must be a float (D,) or (R, D) tensor, got {tuple(ref.shape)} {ref.dtype}.")
        self.reference = ref
        self.kind = kind

    def __call__(self, output: object) -> torch.Tensor:
        if not isinstance(output, torch.Tensor) or output.ndim < 2:
            raise InputError("Similarity needs a (B, D) embedding output from the model.")
        emb = output.flatten(1)
        ref = self.reference.to(device=emb.device, dtype=emb.dtype)
        if emb.shape[1] != ref.shape[1]:
            raise InputError(
                f"Similarity reference has D={ref.shape[1]} but the model's embedding has D={emb.shape[1]}."
            )
        if self.kind == "dot":
            return emb @ ref.T
        return torch.nn.functional.normalize(emb, dim=1) @ torch.nn.functional.normalize(ref, dim=1).T

    def __repr__(self) -> str:
        return f"Similarity(R={self.reference.shape[0]}, kind={self.kind!r})"


def resolve_score(score: ScoreSpec) -> ScoreFn:
    """None or ``"logits"`` -> :class:`ClassLogits`; a callable is used as is.

    Built-ins that need data (a mask, a reference) are passed as objects, not names.
    """
    if score is None or score == "logits":
        return ClassLogits()
    if isinstance(score, str):
        raise InputError(
            f"score {score!r} is not a named score; use 'logits', or pass OutputKey(...), "
            "RegionScore(...), Similarity(...) or any callable output -> (B, N)."
        )
    if not callable(score):
        raise InputError(f"score must be callable (output -> (B, N) tensor), not {type(score).__name__}.")
    return score


def scores_of(score: ScoreFn, output: object, batch: int) -> torch.Tensor:
    """Apply ``score`` to the model output and validate the (B, N) result."""
    what = "the model" if isinstance(score, ClassLogits) else f"score {score!r}"
    return _as_scores(score(output), batch, what)
