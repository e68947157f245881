"""Class activation maps for N-d CNNs: every method and class from one forward and one batched backward.

Each method is a small class whose only job is :meth:`BaseCAM.combine` (gradients and activation ->
map); the hooks, the forward and the batched backward live in :mod:`medcam3d.engine.onepass`, shared
by all of them, so several methods requested together cost one forward and one backward
(:class:`MultiCAM`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from medcam3d.engine.geometry import FeatureGeometry, geometry_for
from medcam3d.engine.guard import frozen_eval
from medcam3d.engine.result import CAMResult
from medcam3d.engine.scores import ScoreSpec
from medcam3d.engine.selection import ClassSpec
from medcam3d.engine.targets import Target, resolve_target, unwrap_compiled
from medcam3d.errors import InputError
from medcam3d.names import METHOD_NAMES, method_name

#: Label of the "layer" used by methods that explain at the model input.
INPUT_LABEL = "<input>"


class BaseCAM(ABC):
    """An explainer bound to a model and a target layer; subclasses define :meth:`combine`.

    Args:
        model: any nn.Module. Its output is turned into (B, N) scores by ``score`` (default: the
            output itself must be (B, N) raw class scores). A ``torch.compile``-d module is explained
            through its original module (``_orig_mod``), in eager mode: the hooks the engine needs
            would otherwise be traced by Dynamo (recompiling, and growing memory).
        target_layer: module name (from ``model.named_modules()``; append ``":input"`` to explain
            a module's input), a module, or None for the default (MONAI nets: a known layer;
            otherwise the last module emitting a (B, C, *spatial) map, found by one probe forward).
            Ignored by methods that explain at the input (:class:`GradientXInput`).
        max_classes_per_backward: cap on how many classes share one batched backward. None
            (default) does all K at once; a small number bounds the memory of the gradient batch
            (K x activation size) for very many classes at a large early layer.
        feature_geometry: where the target layer's cells sit in the input. None (default): measured
            once per model, layer and input shape by a probe (:mod:`medcam3d.engine.geometry`),
            which refuses (``FeatureGeometryError``, raised by ``CAMResult.maps``) when it cannot
            tell; a :class:`FeatureGeometry` declares it and skips the probe.

    Raises:
        InputError: ``model`` is not an nn.Module, or ``max_classes_per_backward`` < 1.
        TargetLayerError: ``target_layer`` names no module of the model.
    """

    #: Method name as accepted by :func:`make_cam`.
    method: ClassVar[str]
    #: Name for people (menus, titles).
    label: ClassVar[str]
    #: False for gradient-free methods (Eigen-CAM): the backward is skipped when none needs it.
    needs_gradient: ClassVar[bool] = True
    #: True when the "layer" is the model input (Gradient x Input).
    at_input: ClassVar[bool] = False

    def __init__(
        self,
        model: nn.Module,
        target_layer: str | nn.Module | None = None,
        *,
        max_classes_per_backward: int | None = None,
        feature_geometry: FeatureGeometry | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise InputError(f"model must be a torch.nn.Module, not {type(model).__name__}.")
        if max_classes_per_backward is not None and max_classes_per_backward < 1:
            raise InputError("max_classes_per_backward must be a positive integer or None.")
        if feature_geometry is not None and not isinstance(feature_geometry, FeatureGeometry):
            raise InputError(
                "feature_geometry must be a medcam3d.FeatureGeometry or None, not "
                f"{type(feature_geometry).__name__}."
            )
        self.feature_geometry = feature_geometry
        self.model = model
        self.module = unwrap_compiled(model)
        self.max_classes_per_backward = max_classes_per_backward
        # Resolve names and modules now so a typo fails at construction, not mid-cohort.
        self._fixed: Target | None = (
            resolve_target(self.module, target_layer)
            if target_layer is not None and not self.at_input
            else None
        )
        self._probed: dict[int, Target] = {}

    def target_for(
        self,
        x: torch.Tensor,
        forward_args: Sequence[Any] = (),
        forward_kwargs: Mapping[str, Any] | None = None,
    ) -> Target:
        """The hook point used for inputs like ``x`` (the default is resolved once per rank)."""
        if self._fixed is not None:
            return self._fixed
        rank = x.ndim
        if rank not in self._probed:
            with frozen_eval(self.module):
                self._probed[rank] = resolve_target(self.module, None, x, forward_args, forward_kwargs)
        return self._probed[rank]

    def geometry_for(
        self,
        x: torch.Tensor,
        target: Target | None,
        feature_shape: tuple[int, ...],
        forward_args: Sequence[Any] = (),
        forward_kwargs: Mapping[str, Any] | None = None,
    ) -> FeatureGeometry:
        """Where the cells of ``target`` sit in ``x``: declared, identity at the input, or measured
        (cached per model, layer and input shape; raises ``FeatureGeometryError``)."""
        if self.at_input or target is None:
            return FeatureGeometry.identity(len(feature_shape))
        if self.feature_geometry is not None:
            if self.feature_geometry.rank != len(feature_shape):
                raise InputError(
                    f"feature_geometry has {self.feature_geometry.rank} axes but {target.label!r} emits "
                    f"{len(feature_shape)} spatial dims."
                )
            return self.feature_geometry
        with torch.inference_mode(False):
            return geometry_for(self.module, target, x, feature_shape, forward_args, forward_kwargs)

    @abstractmethod
    def combine(self, grads: torch.Tensor | None, activation: torch.Tensor) -> torch.Tensor:
        """(n, B, C, *s) gradients (None when ``needs_gradient`` is False) and the (B, C, *s)
        activation -> (n, B, *s) signed float32 map, one per explained class."""

    def __call__(
        self,
        x: torch.Tensor,
        class_idx: ClassSpec = None,
        *,
        score: ScoreSpec = None,
        forward_args: Sequence[Any] = (),
        forward_kwargs: Mapping[str, Any] | None = None,
    ) -> CAMResult:
        """Explain the classes ``class_idx`` of every sample of ``x``.

        One forward pass of the model, one batched backward from the K selected scores to the
        target layer (none for gradient-free methods). The model is left exactly as found (train
        flags, ``requires_grad``, hooks), no parameter's ``.grad`` is touched.

        Args:
            x: (B, C, *spatial) floating-point tensor with 2 or 3 spatial dims, finite, on the
                model's device.
            class_idx: which of the N scores to explain, as (B, K) indices:

                - ``None``: the top-scoring output of each sample (K = 1);
                - an int ``k``: output k for every sample (K = 1);
                - a sequence of ints ``[k1, k2]``: those outputs for every sample (K = len);
                - ``"all"``: every output (K = N);
                - a (B, K) nested sequence or integer tensor: per-sample outputs (a 1-d tensor
                  is read like a sequence).
            score: what is explained: None/``"logits"`` (the (B, N) output), or
                :class:`~medcam3d.engine.scores.OutputKey`, :class:`~medcam3d.engine.scores.RegionScore`,
                :class:`~medcam3d.engine.scores.Similarity`, or any callable output -> (B, N).
            forward_args / forward_kwargs: extra inputs for ``model(x, *forward_args,
                **forward_kwargs)`` (e.g. clinical variables), batched like ``x``; not explained.

        Returns:
            :class:`CAMResult` with ``raw`` (B, K, *feature_spatial) signed float32 maps,
            ``maps`` (B, K, *spatial) ReLU + interpolated to x's size, ``logits`` (B, K),
            ``class_idx`` (B, K) int64 and ``outputs`` (B, N).

        Raises:
            InputError: ``x`` is not a finite float (B, C, *spatial) tensor on the model's device;
                the score is not (B, N); ``class_idx`` has the wrong type or shape.
            ClassIndexError: an index is outside 0..N-1.
            TargetLayerError: the target layer did not run, runs twice, is not a spatial map, or
                the scores do not depend on it.
            torch.cuda.OutOfMemoryError: re-raised as is (never turned into the slow loop).

        Example::

            >>> cam = HiResCAM(model, "layer4")
            >>> res = cam(torch.randn(2, 1, 64, 64, 64), "all")   # model with N = 3 outputs
            >>> res.raw.shape, res.maps.shape                        # layer4 is 2x2x2 here
            (torch.Size([2, 3, 2, 2, 2]), torch.Size([2, 3, 64, 64, 64]))
        """
        from medcam3d.engine.onepass import run_pass

        return run_pass([self], x, class_idx, score=score, forward_args=forward_args,
                        forward_kwargs=forward_kwargs)[0]


def _channel_weighted(weights: torch.Tensor, activation: torch.Tensor) -> torch.Tensor:
    """(n, B, C) channel weights and (B, C, *s) activation -> (n, B, *s) = sum_k w_k A_k."""
    spatial = activation.ndim - 2
    w = weights.reshape(*weights.shape, *([1] * spatial))
    return (w * activation.float().unsqueeze(0)).sum(dim=2)


def _spatial_dims(grads: torch.Tensor) -> tuple[int, ...]:
    return tuple(range(3, grads.ndim))


class HiResCAM(BaseCAM):
    """HiResCAM (Draelos & Carin, arXiv:2011.08891): ``M = sum_k dS/dA_k * A_k``, element-wise.

    No gradient averaging, so the map shows exactly which locations the score used; for a head that
    is linear in the activation, the signed map sums to ``S(A) - S(0)`` (the score minus the bias).
    """

    method = "hirescam"
    label = "HiResCAM"

    def combine(self, grads: torch.Tensor | None, activation: torch.Tensor) -> torch.Tensor:
        assert grads is not None
        return (grads.float() * activation.float().unsqueeze(0)).sum(dim=2)


class GradCAM(BaseCAM):
    """Grad-CAM (Selvaraju et al., ICCV 2017): ``w_k = mean_ij dS/dA_k,ij``, ``M = sum_k w_k A_k``."""

    method = "gradcam"
    label = "Grad-CAM"

    def combine(self, grads: torch.Tensor | None, activation: torch.Tensor) -> torch.Tensor:
        assert grads is not None
        return _channel_weighted(grads.float().mean(dim=_spatial_dims(grads)), activation)


class GradCAMPlusPlus(BaseCAM):
    """Grad-CAM++ (Chattopadhay et al., WACV 2018, arXiv:1710.11063), closed form of its eq. (19).

    With g = dS/dA (S the score) and the paper's smooth score Y = exp(S), S piecewise linear in A,
    the higher derivatives are d2Y/dA2 = exp(S) g^2 and d3Y/dA3 = exp(S) g^3, so exp(S) cancels in

        alpha_k,ij = g_k,ij^2 / (2 g_k,ij^2 + sum_ab A_k,ab * g_k,ij^3)     (0 where the denominator is 0)
        w_k = sum_ij alpha_k,ij * relu(g_k,ij),        M = sum_k w_k A_k.

    The weights use relu(dS/dA) rather than relu(dY/dA) = exp(S) relu(dS/dA): the paper's map divided
    by the positive per-class constant exp(S), so its shape is unchanged and a large logit cannot
    overflow. The map has no completeness property.
    """

    method = "gradcampp"
    label = "Grad-CAM++"

    def combine(self, grads: torch.Tensor | None, activation: torch.Tensor) -> torch.Tensor:
        assert grads is not None
        g = grads.float()
        a = activation.float().unsqueeze(0)
        spatial = _spatial_dims(g)
        g2 = g * g
        a_sum = a.sum(dim=spatial, keepdim=True)
        denom = 2 * g2 + a_sum * g2 * g
        alpha = torch.where(denom != 0, g2 / torch.where(denom != 0, denom, torch.ones_like(denom)), torch.zeros_like(g))
        weights = (alpha * torch.relu(g)).sum(dim=spatial)
        return _channel_weighted(weights, activation)


class XGradCAM(BaseCAM):
    """XGrad-CAM (Fu et al., BMVC 2020, "Axiom-based Grad-CAM", arXiv:2008.02312):

        w_k = sum_ij (A_k,ij / sum_ab A_k,ab) * dS/dA_k,ij      (0 for a channel with sum_ab A_k,ab = 0)
        M = sum_k w_k A_k.

    For a ReLU network whose score is linear and homogeneous in A, sum(M) = sum_k w_k sum A_k =
    sum_k sum_ij A g = S(A) - S(0): the conservation axiom the paper derives the weights from.
    """

    method = "xgradcam"
    label = "XGrad-CAM"

    def combine(self, grads: torch.Tensor | None, activation: torch.Tensor) -> torch.Tensor:
        assert grads is not None
        g = grads.float()
        a = activation.float().unsqueeze(0)
        spatial = _spatial_dims(g)
        a_sum = a.sum(dim=spatial, keepdim=True)
        safe = torch.where(a_sum != 0, a_sum, torch.ones_like(a_sum))
        weights = torch.where(a_sum != 0, a / safe, torch.zeros_like(a)) * g
        return _channel_weighted(weights.sum(dim=spatial), activation)


class LayerCAM(BaseCAM):
    """LayerCAM (Jiang et al., IEEE TIP 2021, "LayerCAM: Exploring Hierarchical Class Activation
    Maps for Localization"): ``M = sum_k relu(dS/dA_k) * A_k``, element-wise (the paper's final
    ReLU is applied by :attr:`CAMResult.maps`, like every method's)."""

    method = "layercam"
    label = "LayerCAM"

    def combine(self, grads: torch.Tensor | None, activation: torch.Tensor) -> torch.Tensor:
        assert grads is not None
        return (torch.relu(grads.float()) * activation.float().unsqueeze(0)).sum(dim=2)


class GradCAMElementWise(BaseCAM):
    """Element-wise Grad-CAM (Draelos & Carin's variant, arXiv:2011.08891): the HiResCAM product with
    a ReLU BEFORE the channel sum, ``M = sum_k relu(dS/dA_k * A_k)``. Non-negative by construction, so
    its signed ``raw`` map carries no completeness property."""

    method = "gradcam_elementwise"
    label = "Element-wise Grad-CAM"

    def combine(self, grads: torch.Tensor | None, activation: torch.Tensor) -> torch.Tensor:
        assert grads is not None
        return torch.relu(grads.float() * activation.float().unsqueeze(0)).sum(dim=2)


class EigenCAM(BaseCAM):
    """Eigen-CAM (Muhammad & Yeasin, IJCNN 2020, arXiv:2008.00299): no gradient. Per sample, the
    activation is read as a (positions x channels) matrix O; with O = U S V^T its singular value
    decomposition, the map is the projection on the first right-singular vector, ``M = O v1``.

    As in the paper the activations are not mean-centred. Sign convention: singular vectors are
    defined up to sign, so ``v1`` is flipped to make ``sum(M) >= 0`` (for a non-negative activation,
    e.g. after a ReLU, the Perron-Frobenius theorem makes v1 single-signed and this picks the
    non-negative one). The map is class-agnostic: every explained class gets the same map.
    """

    method = "eigencam"
    label = "Eigen-CAM"
    needs_gradient = False

    def combine(self, grads: torch.Tensor | None, activation: torch.Tensor) -> torch.Tensor:
        n = 1 if grads is None else grads.shape[0]
        a = activation.float()
        batch, channels, spatial = a.shape[0], a.shape[1], a.shape[2:]
        o = a.reshape(batch, channels, -1).transpose(1, 2)  # (B, positions, C)
        _, _, vh = torch.linalg.svd(o, full_matrices=False)
        v1 = vh[:, 0, :]  # (B, C)
        m = torch.einsum("bpc,bc->bp", o, v1)
        sign = torch.where(m.sum(dim=1, keepdim=True) < 0, -1.0, 1.0)
        m = (m * sign).reshape(batch, *spatial)
        return m.unsqueeze(0).expand(n, *m.shape).clone()


class GradientXInput(BaseCAM):
    """Gradient x Input (Shrikumar et al., arXiv:1605.01713): HiResCAM with the model input as the
    "layer", ``M = sum_c dS/dx_c * x_c`` at the input's own resolution (``target_layer`` is ignored).

    Completeness: ``sum(M) = <dS/dx, x>``, which equals ``S(x) - S(0)`` only for a model linear in x;
    for a bias-free ReLU network (positively homogeneous of degree 1) it equals S(x) (Euler).
    Needs a backward through the whole network (the memory of a training step, not of inference).
    """

    method = "gradxinput"
    label = "Gradient x Input"
    at_input = True

    def combine(self, grads: torch.Tensor | None, activation: torch.Tensor) -> torch.Tensor:
        assert grads is not None
        return (grads.float() * activation.float().unsqueeze(0)).sum(dim=2)


#: Every method, by canonical name -> class (the names' home is medcam3d.names.METHOD_NAMES).
METHODS: dict[str, type[BaseCAM]] = {
    cls.method: cls
    for cls in (HiResCAM, GradCAM, GradCAMPlusPlus, XGradCAM, LayerCAM, GradCAMElementWise, EigenCAM,
                GradientXInput)
}

if tuple(METHODS) != METHOD_NAMES:  # the names live in medcam3d.names (importable without torch)
    raise ImportError(f"medcam3d.engine.cam: METHODS {tuple(METHODS)} != medcam3d.names.METHOD_NAMES "
                      f"{METHOD_NAMES}; add a new method's name there too")


def make_cam(method: str, model: nn.Module, target_layer: str | nn.Module | None = None, **kwargs: Any) -> BaseCAM:
    """Build an explainer by method name (see :data:`METHODS`; case-insensitive)."""
    return METHODS[method_name(method)](model, target_layer, **kwargs)


class MultiCAM:
    """Several methods on one model and target layer, all from ONE forward and ONE batched backward.

    Args:
        model, target_layer, max_classes_per_backward, feature_geometry: as for :class:`BaseCAM`.
        methods: method names (see :data:`METHODS`); duplicates are refused.

    Calling it takes the same arguments as :meth:`BaseCAM.__call__` and returns
    ``{method: CAMResult}`` in the order given. Gradient x Input shares the forward and the backward
    too (the graph then reaches the input). Each map equals what the single method returns alone.
    """

    def __init__(
        self,
        model: nn.Module,
        methods: Sequence[str] = ("hirescam", "gradcam"),
        target_layer: str | nn.Module | None = None,
        *,
        max_classes_per_backward: int | None = None,
        feature_geometry: FeatureGeometry | None = None,
    ) -> None:
        if isinstance(methods, str):
            methods = [methods]
        names = [method_name(m) for m in methods]
        if not names:
            raise InputError("methods must name at least one method.")
        if len(set(names)) != len(names):
            raise InputError(f"methods lists a method twice: {list(methods)}.")
        self.cams: list[BaseCAM] = [
            make_cam(name, model, target_layer, max_classes_per_backward=max_classes_per_backward,
                     feature_geometry=feature_geometry)
            for name in names
        ]
        for cam in self.cams[1:]:
            cam._probed = self.cams[0]._probed  # the default layer is probed once for all methods
        self.methods = names

    def __call__(
        self,
        x: torch.Tensor,
        class_idx: ClassSpec = None,
        *,
        score: ScoreSpec = None,
        forward_args: Sequence[Any] = (),
        forward_kwargs: Mapping[str, Any] | None = None,
    ) -> dict[str, CAMResult]:
        from medcam3d.engine.onepass import run_pass

        results = run_pass(self.cams, x, class_idx, score=score, forward_args=forward_args,
                           forward_kwargs=forward_kwargs)
        return dict(zip(self.methods, results))
