"""HiResCAM and Grad-CAM for N-d CNNs: every class from one forward and one batched backward.

How the cost stays at that of inference: a forward hook replaces the target layer's output by a
detached leaf tensor that requires grad, and every parameter is kept out of the graph for the call.
Autograd therefore records only the head (target layer -> logits). The gradients of all K
requested scores come from one call to ``torch.autograd.grad`` with a batch of K one-hot
``grad_outputs`` (``is_grads_batched=True``, i.e. vmap over vector-Jacobian products); if an
operation in the head has no batching rule we fall back to K VJPs over the same, retained graph.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from medcam3d.engine.capture import replace_target
from medcam3d.engine.guard import frozen_eval
from medcam3d.engine.result import CAMResult
from medcam3d.engine.selection import ClassSpec, check_input, check_output, select_classes
from medcam3d.engine.targets import Target, resolve_target
from medcam3d.errors import InputError, TargetLayerError


class BaseCAM:
    """Shared machinery; subclasses say how gradients and activations combine into a map."""

    method: str = ""

    def __init__(
        self,
        model: nn.Module,
        target_layer: str | nn.Module | None = None,
        *,
        max_classes_per_backward: int | None = None,
    ) -> None:
        """
        Args:
            model: any nn.Module returning (B, N) raw class scores.
            target_layer: module name (from ``model.named_modules()``; append ``":input"`` to
                explain a module's input), a module, or None for the default (MONAI nets: a known
                layer; otherwise the last module emitting a (B, C, *spatial) map).
            max_classes_per_backward: cap on how many classes share one batched backward. None
                (default) does all K at once; a small number bounds the memory of the gradient
                batch (K x activation size) for very many classes at a large early layer.
        """
        if not isinstance(model, nn.Module):
            raise InputError(f"model must be a torch.nn.Module, not {type(model).__name__}.")
        if max_classes_per_backward is not None and max_classes_per_backward < 1:
            raise InputError("max_classes_per_backward must be a positive integer or None.")
        self.model = model
        self.max_classes_per_backward = max_classes_per_backward
        self._requested = target_layer
        # Resolve names and modules now so a typo fails at construction, not mid-cohort.
        self._fixed: Target | None = (
            resolve_target(model, target_layer) if target_layer is not None else None
        )
        self._probed: dict[int, Target] = {}

    # ----------------------------------------------------------------------------- targets
    def target_for(self, x: torch.Tensor) -> Target:
        """The hook point used for inputs like ``x`` (the default is resolved once per rank)."""
        if self._fixed is not None:
            return self._fixed
        rank = x.ndim
        if rank not in self._probed:
            with frozen_eval(self.model):
                self._probed[rank] = resolve_target(self.model, None, x)
        return self._probed[rank]

    # ----------------------------------------------------------------------------- combine
    def combine(self, grads: torch.Tensor, activation: torch.Tensor) -> torch.Tensor:
        """(n, B, C, *s) gradients and (B, C, *s) activation -> (n, B, *s) signed float32 map."""
        raise NotImplementedError

    # ----------------------------------------------------------------------------- call
    def __call__(self, x: torch.Tensor, class_idx: ClassSpec = None) -> CAMResult:
        """Explain ``class_idx`` of every sample of ``x`` (see :class:`CAMResult`)."""
        x = check_input(x, self.model)
        target = self.target_for(x)
        spatial_rank = x.ndim - 2
        leaves: list[torch.Tensor] = []

        def to_leaf(activation: torch.Tensor) -> torch.Tensor:
            leaf = activation.detach().requires_grad_(True)
            leaves.append(leaf)
            # A clone, not the leaf itself: an in-place op after the layer (ReLU(inplace=True))
            # would be illegal on a leaf that requires grad.
            return leaf.clone()

        with frozen_eval(self.model), torch.inference_mode(False), torch.enable_grad():
            with replace_target(target, spatial_rank, to_leaf):
                out = self.model(x)
            if not leaves:
                raise TargetLayerError(
                    f"target layer {target.label!r} did not run during the forward pass; choose a "
                    "module that the model's forward() actually calls."
                )
            scores = check_output(out, x.shape[0])
            idx = select_classes(class_idx, scores)
            selected = scores.gather(1, idx)
            raw, batched = self._maps_from_graph(selected, leaves[0], target)
        return CAMResult(
            raw=raw,
            logits=selected.detach().float(),
            class_idx=idx,
            outputs=scores.detach().float(),
            method=self.method,
            target_layer=target.label,
            input_size=tuple(x.shape[2:]),
            batched_backward=batched,
        )

    def _maps_from_graph(
        self, selected: torch.Tensor, leaf: torch.Tensor, target: Target
    ) -> tuple[torch.Tensor, bool]:
        batch, k_total = selected.shape
        if not selected.requires_grad:
            raise TargetLayerError(
                f"the model's outputs do not depend on target layer {target.label!r}; choose a layer "
                "on the path from the input to the class scores."
            )
        chunk = self.max_classes_per_backward or k_total
        activation = leaf.detach()
        pieces: list[torch.Tensor] = []
        batched = True
        for start in range(0, k_total, chunk):
            ks = list(range(start, min(start + chunk, k_total)))
            grads, ok = _vjp(selected, leaf, ks)
            batched = batched and ok
            pieces.append(self.combine(grads, activation))
            del grads
        raw = torch.cat(pieces, dim=0)  # (K, B, *s)
        return raw.transpose(0, 1).contiguous(), batched


def _vjp(selected: torch.Tensor, leaf: torch.Tensor, ks: list[int]) -> tuple[torch.Tensor, bool]:
    """d selected[:, k] / d leaf for each k in ``ks`` -> ((n, B, C, *s), used_batched_path).

    Samples of a batch do not interact in eval mode, so one one-hot row per class serves all B
    samples at once. The graph is retained (it is only the head, and it is freed when the call
    returns) so a failed batched attempt can fall back to the loop on the same graph.
    """
    n = len(ks)
    grad_outputs = torch.zeros((n, *selected.shape), dtype=selected.dtype, device=selected.device)
    grad_outputs[torch.arange(n), :, torch.tensor(ks)] = 1
    if n > 1:
        try:
            with warnings.catch_warnings():
                # vmap warns when it has to loop internally; the result is still correct.
                warnings.filterwarnings("ignore", message=".*batching rule.*")
                (grads,) = torch.autograd.grad(
                    selected, leaf, grad_outputs, retain_graph=True, is_grads_batched=True
                )
            return grads, True
        except RuntimeError:
            pass  # an op in the head has no vmap support: one VJP per class, same graph
    grads = torch.stack(
        [
            torch.autograd.grad(selected, leaf, g, retain_graph=True)[0]
            for g in grad_outputs
        ]
    )
    return grads, n == 1


class HiResCAM(BaseCAM):
    """HiResCAM (Draelos & Carin): sum over channels of gradient * activation, element-wise.

    No gradient averaging, so the map shows exactly which locations the score used; for a head that
    is linear in the activation, the signed map sums to the score minus the bias.
    """

    method = "hirescam"

    def combine(self, grads: torch.Tensor, activation: torch.Tensor) -> torch.Tensor:
        return (grads.float() * activation.float().unsqueeze(0)).sum(dim=2)


class GradCAM(BaseCAM):
    """Grad-CAM (Selvaraju et al.): channel weights = spatial mean of the gradient, times activation."""

    method = "gradcam"

    def combine(self, grads: torch.Tensor, activation: torch.Tensor) -> torch.Tensor:
        spatial = tuple(range(3, grads.ndim))
        weights = grads.float().mean(dim=spatial)  # (n, B, C)
        weights = weights.reshape(*weights.shape, *([1] * len(spatial)))
        return (weights * activation.float().unsqueeze(0)).sum(dim=2)


METHODS: dict[str, type[BaseCAM]] = {"hirescam": HiResCAM, "gradcam": GradCAM}


def make_cam(method: str, model: nn.Module, target_layer: str | nn.Module | None = None, **kwargs) -> BaseCAM:
    """Build an explainer by method name ("hirescam" or "gradcam", case-insensitive)."""
    key = method.lower().replace("-", "").replace("_", "")
    if key not in METHODS:
        raise InputError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}.")
    return METHODS[key](model, target_layer, **kwargs)
