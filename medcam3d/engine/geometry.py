"""Where each feature cell sits in the input: a measured feature-index -> input-index affine.

Why: interpolating a (B, C, *feature) map with ``align_corners=False`` puts feature cell i at input
index (i + 0.5) * s - 0.5, the "anchor" convention of common CAM tools. A real strided convolution or
pooling does not centre its outputs there: a kernel-3, stride-2, padding-1 convolution centres output
i on input 2i, an average pool of kernel 2 and stride 2 on 2i + 0.5, and the differences add up
through the stages (the centre of a cell after n layers is o_n + s_n * i with s_n = s_{n-1} * t_n and
o_n = o_{n-1} + s_{n-1} * ((k_n - 1) / 2 - p_n) for kernel k, stride t, padding p; Araujo et al.,
"Computing receptive fields of convolutional neural networks", Distill 2019). A model whose
``forward`` permutes or flips the input before its convolutions has feature axes that follow other
input axes. Neither can be read off shapes, so the geometry is measured.

How (:func:`measure_geometry`): a probe copy of the network makes every cell a symmetric,
shift-equivariant blob detector, and each cell's receptive-field centre is read from the phase of
its response to one period of a cosine and a sine along each input axis (the circular mean):

- weights of every convolution / linear layer uniform and positive (1 / fan-in), biases 0,
  normalisation layers the identity, max-pools replaced by average pools of the same
  kernel/stride/padding (a max-pool's response to ties is asymmetric);
- circular padding in convolutions and pools, so on a torus every cell sees the same
  (wrapped, symmetric) neighbourhood, with no border clipping even when the receptive field is
  larger than the input;
- the network is run in float64 and only up to the target layer (the head never runs); the response
  of cell i to x = c + eps * cos(2 pi v_a / N_a) and to the sine gives the first Fourier coefficient
  of its receptive field along axis a, whose phase is -2 pi centre / N_a exactly for a symmetric
  field (also for the half-voxel centres of even kernels).

Every cell is measured (the probe is 2 * rank + 3 forwards to the target layer without autograd),
then checked: each feature axis must follow exactly one input axis (stride possibly negative:
flipped), every cell's centre must equal offset + stride * index (a linear, axis-aligned map), and
the network must respond linearly (additivity checked with one extra forward, which exposes
functional max-pools and other ops the probe cannot make symmetric). Anything else raises
:class:`~medcam3d.errors.FeatureGeometryError`, which says what was found and how to declare the
geometry (``feature_geometry=`` on the explainers and ``explain_volume``). Results are cached per
model object, target layer and input shape (the geometry depends on the architecture, not on weights).
"""

from __future__ import annotations

import copy
import math
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from medcam3d.engine.targets import Target
from medcam3d.errors import FeatureGeometryError, InputError

#: Centres (input voxels) may deviate this much from offset + stride * index (float64 round-off and
#: the linearisation of smooth non-linearities are far below it; a real misfit is >= 0.25 voxel).
CENTRE_TOL = 0.02
#: A cell's first Fourier coefficient below this fraction of its total response has no usable phase.
MIN_RELATIVE_AMPLITUDE = 1e-6
#: Additivity check: |response(sum of patterns) - sum of responses| / |responses| must stay below this.
LINEARITY_TOL = 1e-2
_EPS = 1e-4
_LEVELS = (1.0, 1e3)  # constant input levels tried (a model may subtract a constant before a ReLU)


@dataclass(frozen=True)
class FeatureGeometry:
    """Feature cell index -> input voxel index, one input axis per feature axis.

    Feature cell ``i`` (a tuple over the feature map's spatial axes) has its receptive-field centre at
    input index ``v[input_axis[d]] = offset[d] + stride[d] * i[d]`` for every feature axis ``d``.

    Attributes:
        input_axis: for each feature spatial axis d, the input spatial axis (0-based, after the batch
            and channel dims) it follows; a permutation of range(rank).
        stride: input voxels per feature cell along that axis; negative when the axis is flipped.
        offset: input index (voxels, may be fractional or negative) of the centre of cell 0.
        source: "measured" (probe), "declared" (given by the user) or "identity".
    """

    input_axis: tuple[int, ...]
    stride: tuple[float, ...]
    offset: tuple[float, ...]
    source: str = "declared"

    def __post_init__(self) -> None:
        rank = len(self.input_axis)
        if not (len(self.stride) == len(self.offset) == rank) or rank == 0:
            raise InputError(
                "feature_geometry needs one input_axis, stride and offset per feature axis; got "
                f"{len(self.input_axis)}, {len(self.stride)} and {len(self.offset)}."
            )
        if sorted(self.input_axis) != list(range(rank)):
            raise InputError(
                f"feature_geometry.input_axis must be a permutation of 0..{rank - 1}, got {self.input_axis}."
            )
        if any(not math.isfinite(s) or s == 0 for s in self.stride) or not all(
            math.isfinite(o) for o in self.offset
        ):
            raise InputError(f"feature_geometry strides must be finite and non-zero, offsets finite; got {self}.")

    @classmethod
    def identity(cls, rank: int) -> "FeatureGeometry":
        """Feature cell i is input voxel i (a target layer that keeps the input's grid)."""
        return cls(tuple(range(rank)), (1.0,) * rank, (0.0,) * rank, "identity")

    @classmethod
    def anchor(cls, feature_shape: Sequence[int], input_shape: Sequence[int]) -> "FeatureGeometry":
        """The ``interpolate(align_corners=False)`` convention: cell i at (i + 0.5) * N / n - 0.5.

        This is NOT what a strided 3x3 convolution computes; it is offered to compare with other
        CAM tools and for models whose geometry you know to be exactly that (kernel = stride).
        """
        strides = tuple(float(n) / float(f) for f, n in zip(feature_shape, input_shape))
        return cls(tuple(range(len(strides))), strides, tuple(0.5 * s - 0.5 for s in strides), "declared")

    @property
    def rank(self) -> int:
        return len(self.input_axis)

    @property
    def affine(self) -> torch.Tensor:
        """(rank + 1, rank + 1) float64: homogeneous feature index (column) -> input index (row)."""
        a = torch.zeros(self.rank + 1, self.rank + 1, dtype=torch.float64)
        for d, (ax, s, o) in enumerate(zip(self.input_axis, self.stride, self.offset)):
            a[ax, d] = s
            a[ax, self.rank] = o
        a[self.rank, self.rank] = 1.0
        return a

    def is_identity(self) -> bool:
        return self.input_axis == tuple(range(self.rank)) and all(s == 1 for s in self.stride) and all(
            o == 0 for o in self.offset
        )

    def describe(self) -> str:
        """One line per feature axis, e.g. ``feature axis 0 -> input axis 2: v = 0 + 1 * i``."""
        return "; ".join(
            f"feature axis {d} -> input axis {a}: v = {o:g} + {s:g} * i"
            for d, (a, s, o) in enumerate(zip(self.input_axis, self.stride, self.offset))
        )


# ----------------------------------------------------------------------------- placing maps
def place_maps(raw: torch.Tensor, geometry: FeatureGeometry, input_size: Sequence[int]) -> torch.Tensor:
    """ReLU(raw) sampled at every input voxel's feature coordinate: (B, K, *f) -> (B, K, *input_size).

    Voxel v of input axis a reads the feature map at u = (v - offset) / stride along the feature axis
    that follows a, with linear interpolation between cell centres and the edge cell's value beyond
    the first/last centre (like ``interpolate``'s edge behaviour). Separable: one gather and one
    weighted sum per axis. Runs on raw's device in float32, outside any autocast region.
    """
    rank = raw.ndim - 2
    if geometry.rank != rank or len(input_size) != rank:
        raise InputError(
            f"feature_geometry has {geometry.rank} axes but the map has {rank} spatial dims "
            f"(input size {tuple(input_size)})."
        )
    with torch.autocast(device_type=raw.device.type, enabled=False):
        out = torch.relu(raw.float())
        # feature axes in input-axis order, so spatial dim a of ``out`` follows input axis a
        order = [geometry.input_axis.index(a) for a in range(rank)]
        out = out.permute(0, 1, *(2 + d for d in order))
        for a, d in enumerate(order):
            n_in, n_f = int(input_size[a]), out.shape[2 + a]
            dim = 2 + a
            if n_f == 1:
                out = out.expand(*out.shape[:dim], n_in, *out.shape[dim + 1 :])
                continue
            v = torch.arange(n_in, device=out.device, dtype=torch.float64)
            u = ((v - geometry.offset[d]) / geometry.stride[d]).clamp(0, n_f - 1)
            lo = u.floor().clamp(max=n_f - 2)
            w = (u - lo).to(torch.float32)
            lo = lo.long()
            shape = [1] * out.ndim
            shape[dim] = n_in
            w = w.reshape(shape)
            out = out.index_select(dim, lo) * (1 - w) + out.index_select(dim, lo + 1) * w
        return out.contiguous()


# ----------------------------------------------------------------------------- the probe copy
class _Stop(Exception):
    def __init__(self, value: torch.Tensor) -> None:
        super().__init__("probe reached the target layer")
        self.value = value


_NORMS: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
)
_POOLS: tuple[type[nn.Module], ...] = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
)
_ADAPTIVE_MAX = {nn.AdaptiveMaxPool1d: F.adaptive_avg_pool1d, nn.AdaptiveMaxPool2d: F.adaptive_avg_pool2d,
                 nn.AdaptiveMaxPool3d: F.adaptive_avg_pool3d}
_AVG = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


def _tuple(value: object, n: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (int(value),) * n  # type: ignore[arg-type]


def _circular_avg_pool(module: nn.Module, n: int):
    kernel, stride = _tuple(module.kernel_size, n), _tuple(module.stride or module.kernel_size, n)
    padding = _tuple(module.padding, n)
    pads = [p for p in reversed(padding) for _ in (0, 1)]
    ceil_mode = bool(module.ceil_mode)

    def forward(x: torch.Tensor) -> torch.Tensor:
        if any(pads):
            x = F.pad(x, pads, mode="circular")
        return _AVG[n](x, kernel, stride, 0, ceil_mode)

    return forward


def _uniform_conv(module: nn.Module, dtype: torch.dtype):
    """Forward of ``module`` with uniform weights 1 / fan-in, zero bias and circular padding.

    With uniform weights every output channel of a group is the same number: the window average of
    the mean of the group's input channels. Computing that once per group and repeating it over the
    group's output channels gives exactly the full convolution at a fraction of the cost.
    """
    n = module.weight.ndim - 2
    groups, out_ch = int(module.groups), int(module.out_channels)
    kernel = tuple(int(k) for k in module.kernel_size)
    stride, dilation = tuple(module.stride), tuple(module.dilation)
    pads = list(module._reversed_padding_repeated_twice)
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[n]
    # the uniform kernel is separable: one 1-D box filter per axis (same result, far fewer operations)
    passes = []
    for a in range(n):
        shape = [1] * n
        shape[a] = kernel[a]
        one = [1] * n
        st, dil = list(one), list(one)
        st[a], dil[a] = stride[a], dilation[a]
        w = torch.full((groups, 1, *shape), 1.0 / kernel[a], dtype=dtype, device=module.weight.device)
        passes.append((w, tuple(st), tuple(dil)))

    def forward(x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        y = x.reshape(b, groups, c // groups, *x.shape[2:]).mean(dim=2)
        if any(pads):
            y = F.pad(y, pads, mode="circular")
        for a, (w, st, dil) in enumerate(passes):
            if kernel[a] == 1 and stride[a] == 1:
                continue  # the identity
            if dilation[a] == 1:  # a box filter is an average pool (much faster than a convolution)
                y = _AVG[n](y, w.shape[2:], st, 0)
            else:
                y = conv(y, w, None, st, 0, dil, groups)
        return y.repeat_interleave(out_ch // groups, dim=1)

    return forward


def _uniform_conv_transpose(module: nn.Module, dtype: torch.dtype):
    """Forward of a transposed convolution with uniform weights, zero bias and circular wrap.

    Computed per group like :func:`_uniform_conv`: the full (unpadded) transposed convolution of the
    group mean with a box kernel, whose rows beyond the output are added back modulo the output size
    (the periodic counterpart of cropping ``padding`` at both ends).
    """
    n = module.weight.ndim - 2
    groups, out_ch = int(module.groups), int(module.out_channels)
    kernel = tuple(int(k) for k in module.kernel_size)
    stride, dilation, padding = tuple(module.stride), tuple(module.dilation), tuple(module.padding)
    weight = torch.full((groups, 1, *kernel), 1.0 / math.prod(kernel), dtype=dtype, device=module.weight.device)
    tconv = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[n]
    if isinstance(module.padding, str):
        raise FeatureGeometryError("a transposed convolution with string padding is not supported by the probe.")

    def forward(x: torch.Tensor, output_size: Any = None) -> torch.Tensor:
        b, c = x.shape[:2]
        mean = x.reshape(b, groups, c // groups, *x.shape[2:]).mean(dim=2)
        size = module._output_padding(x, output_size, stride, padding, kernel, n, dilation)
        out_shape = [
            (x.shape[2 + a] - 1) * stride[a] - 2 * padding[a] + dilation[a] * (kernel[a] - 1) + size[a] + 1
            for a in range(n)
        ]
        y = tconv(mean, weight, None, stride, 0, 0, groups, dilation)
        for a in range(n):
            index = (torch.arange(y.shape[2 + a], device=y.device) - padding[a]) % out_shape[a]
            shape = list(y.shape)
            shape[2 + a] = out_shape[a]
            y = torch.zeros(shape, dtype=y.dtype, device=y.device).index_add_(2 + a, index, y)
        return y.repeat_interleave(out_ch // groups, dim=1)

    return forward


def _uniform(value: float, like: torch.Tensor, dtype: torch.dtype) -> nn.Parameter:
    return nn.Parameter(torch.full((), value, dtype=dtype, device=like.device).expand(like.shape), requires_grad=False)


def _probe_copy(model: nn.Module, dtype: torch.dtype) -> tuple[nn.Module, set[int]]:
    """A copy of ``model`` made into a symmetric, positive, circular blob detector (see module doc).

    Parameters are not copied: conv/linear weights become expanded uniform scalars (no memory),
    other parameters float64 copies. Returns the copy and the ids of the parameters it set uniformly.
    """
    memo: dict[int, object] = {}
    handled: set[int] = set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) in memo:
                continue
            if isinstance(module, nn.modules.conv._ConvNd) and name == "weight":
                fan = p.shape[1] * math.prod(p.shape[2:])
                memo[id(p)] = _uniform(1.0 / fan, p, dtype)
            elif isinstance(module, nn.Linear) and name == "weight":
                memo[id(p)] = _uniform(1.0 / p.shape[1], p, dtype)
            elif isinstance(module, (nn.modules.conv._ConvNd, nn.Linear) + _NORMS) and name == "bias":
                memo[id(p)] = _uniform(0.0, p, dtype)
            elif isinstance(module, _NORMS):
                memo[id(p)] = _uniform(1.0, p, dtype)  # unused: the norm becomes the identity
            else:
                memo[id(p)] = nn.Parameter(p.detach().to(dtype), requires_grad=False)
                continue
            handled.add(id(memo[id(p)]))
    probe = copy.deepcopy(model, memo)
    probe.eval()
    for module in probe.modules():
        module._forward_hooks.clear()
        module._forward_pre_hooks.clear()
        module._backward_hooks.clear()
        for key, buf in list(module._buffers.items()):
            if buf is not None and buf.is_floating_point():
                module._buffers[key] = buf.to(dtype)
        if isinstance(module, _NORMS):
            module.forward = lambda x, *a, **k: x  # type: ignore[method-assign]
        elif isinstance(module, nn.modules.conv._ConvTransposeNd):
            module.forward = _uniform_conv_transpose(module, dtype)  # type: ignore[method-assign]
        elif isinstance(module, nn.modules.conv._ConvNd):
            module.forward = _uniform_conv(module, dtype)  # type: ignore[method-assign]
        elif isinstance(module, _POOLS):
            n = int(type(module).__name__[-2])
            if isinstance(module, (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)):
                if any(d != 1 for d in _tuple(module.dilation, n)) or module.return_indices:
                    continue  # left as is; the linearity check refuses it if it runs before the target
            module.forward = _circular_avg_pool(module, n)  # type: ignore[method-assign]
        elif type(module) in _ADAPTIVE_MAX:
            fn, size = _ADAPTIVE_MAX[type(module)], module.output_size
            module.forward = lambda x, fn=fn, size=size: fn(x, size)  # type: ignore[method-assign]
    return probe, handled


def _cast(value: Any, dtype: torch.dtype) -> Any:
    """Floating tensors (also inside tuples, lists, dicts) in the probe's dtype."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, (tuple, list)):
        return type(value)(_cast(v, dtype) for v in value)
    if isinstance(value, dict):
        return {k: _cast(v, dtype) for k, v in value.items()}
    return value


def _run_to_target(probe: nn.Module, target: Target, x: torch.Tensor) -> torch.Tensor:
    """Channel-summed target activation (B, *feature) of ``probe`` on ``x``; the head never runs."""
    module = probe if target.name == "<model>" else dict(probe.named_modules())[target.name]

    def stop(value: object) -> None:
        if isinstance(value, torch.Tensor):
            raise _Stop(value)

    if target.where == "output":
        handle = module.register_forward_hook(lambda _m, _i, out: stop(out))
    else:
        handle = module.register_forward_pre_hook(lambda _m, args: stop(args[0] if args else None))
    args, kwargs = probe.__dict__.get("_medcam3d_extra", ((), {}))
    try:
        probe(x, *args, **kwargs)
    except _Stop as s:
        return s.value.sum(dim=1)
    finally:
        handle.remove()
    raise FeatureGeometryError(f"target layer {target.label!r} did not run in the geometry probe.")


def _unhandled_weights(probe: nn.Module, target: Target, x: torch.Tensor, handled: set[int]) -> list[str]:
    """Names of >= 2-D parameters the probe could not make uniform, in modules that run before the target."""
    ran: list[str] = []
    names = {id(m): n for n, m in probe.named_modules()}
    handles = [m.register_forward_pre_hook(lambda m, _a: ran.append(names[id(m)])) for m in probe.modules()]
    try:
        _run_to_target(probe, target, x)
    finally:
        for h in handles:
            h.remove()
    modules = dict(probe.named_modules())
    bad = []
    for name in dict.fromkeys(ran):
        for pname, p in modules[name].named_parameters(recurse=False):
            if p.ndim >= 2 and id(p) not in handled:
                bad.append(f"{name}.{pname}" if name else pname)
    return bad


def _howto(rank: int) -> str:
    example = ", ".join(["0"] * rank)
    return (
        "Declare the geometry instead: feature_geometry=medcam3d.FeatureGeometry(input_axis=(...), "
        f"stride=(...), offset=({example})) on HiResCAM/GradCAM or explain_volume, where feature axis d "
        "follows input axis input_axis[d] and cell i is centred on input index offset[d] + stride[d] * i."
    )


# ----------------------------------------------------------------------------- measuring
def _centres(
    probe: nn.Module, target: Target, base: torch.Tensor, level: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Centres (rank, *feature) in input voxels (mod N), relative amplitudes, DC response, non-linearity."""
    spatial = base.shape[2:]
    rank = len(spatial)
    x0 = base * level
    f0 = _run_to_target(probe, target, x0)[0]
    dc = (_run_to_target(probe, target, x0 + _EPS * base)[0] - f0) / _EPS
    centres, amps, cos_sum = [], [], torch.zeros_like(f0)
    check = x0.clone()
    for a, n in enumerate(spatial):
        shape = [1] * (rank + 2)
        shape[2 + a] = n
        theta = 2 * math.pi * torch.arange(n, dtype=base.dtype, device=base.device).reshape(shape) / n
        fc = (_run_to_target(probe, target, x0 + _EPS * torch.cos(theta) * base)[0] - f0) / _EPS
        fs = (_run_to_target(probe, target, x0 + _EPS * torch.sin(theta) * base)[0] - f0) / _EPS
        centres.append(torch.remainder(torch.atan2(fs, fc) * n / (2 * math.pi), n))
        amps.append(torch.hypot(fc, fs) / dc.abs().clamp_min(1e-300))
        cos_sum = cos_sum + fc
        check = check - _EPS * torch.cos(theta) * base
    # additivity + odd symmetry: f(x0 - eps * sum_a cos_a) must be f0 - eps * sum_a fc_a
    got = (f0 - _run_to_target(probe, target, check)[0]) / _EPS
    # relative to the cosine responses, but never below a floor far above float64 round-off
    scale = max(float(cos_sum.abs().max()), 1e-6 * float(dc.abs().max()), 1e-300)
    nonlinear = float((got - cos_sum).abs().max()) / scale
    return torch.stack(centres), torch.stack(amps), dc, nonlinear


def _wrap(d: torch.Tensor, n: int) -> torch.Tensor:
    """Signed difference on a circle of n voxels, in (-n/2, n/2]."""
    return d - n * torch.round(d / n)


class _FitError(FeatureGeometryError):
    """Centres not offset + stride * index at this probe size (may be the probe's torus seam)."""


def _fit(centres: torch.Tensor, phased: tuple[bool, ...], spatial: tuple[int, ...], label: str) -> FeatureGeometry:
    rank = len(spatial)
    feat = tuple(centres.shape[1:])
    zero = (slice(None),) + (0,) * rank
    c0 = centres[zero]
    axis_of: dict[int, int] = {}
    stride: dict[int, float] = {}
    for d in range(rank):
        if feat[d] < 2:
            continue
        step = [0] * rank
        step[d] = 1
        delta = torch.stack([_wrap(centres[(a, *step)] - c0[a], spatial[a]) for a in range(rank)])
        moving = [a for a in range(rank) if phased[a] and abs(float(delta[a])) > 0.25]
        if not moving and not all(phased):
            raise _FitError(
                f"cannot measure where the cells of {label!r} sit along feature axis {d}: the receptive "
                f"fields cover input axes {[a for a in range(rank) if not phased[a]]} evenly on this input "
                f"size, so their centres have no phase. {_howto(rank)}"
            )
        if len(moving) != 1:
            moves = ", ".join(f"input axis {a} by {float(delta[a]):+.2f}" for a in range(rank))
            raise _FitError(
                f"the feature map of {label!r} is not axis-aligned with the input: one step along feature "
                f"axis {d} moves the receptive-field centre along {moves}. The map cannot be placed by "
                f"axis without guessing. {_howto(rank)}"
            )
        a = moving[0]
        if a in axis_of.values():
            other = next(k for k, v in axis_of.items() if v == a)
            raise _FitError(
                f"feature axes {other} and {d} of {label!r} both follow input axis {a}; the map cannot be "
                f"placed by axis. {_howto(rank)}"
            )
        axis_of[d], stride[d] = a, float(delta[a])
    free = [a for a in range(rank) if a not in axis_of.values()]
    for d in range(rank):
        if d not in axis_of:  # a single cell: it covers the whole axis, any stride/offset places it
            a = free.pop(0)
            axis_of[d], stride[d] = a, float(spatial[a])
    offset = []
    for d in range(rank):
        a, n = axis_of[d], spatial[axis_of[d]]
        if feat[d] < 2:
            offset.append((n - 1) / 2)
            continue
        # Centres are known modulo n. Take the representative that centres the feature grid on the
        # input; with exactly two cells half a period apart the direction is ambiguous on the probe's
        # torus too, and the same rule (grid centred on the input) decides it.
        signs = [stride[d], -stride[d]] if abs(abs(stride[d]) - n / 2) < CENTRE_TOL else [stride[d]]
        best = None
        for s in signs:
            half = s * (feat[d] - 1) / 2
            guess = (n - 1) / 2 - half
            o = guess + float(_wrap(c0[a] - guess, n))
            score = abs(o + half - (n - 1) / 2)
            if best is None or score < best[0] - 1e-9:
                best = (score, s, o)
        stride[d] = best[1]
        offset.append(best[2])
    geom = FeatureGeometry(tuple(axis_of[d] for d in range(rank)), tuple(stride[d] for d in range(rank)),
                           tuple(offset), "measured")
    # every cell: its centre along every input axis must be what the affine says
    grids = torch.meshgrid(*[torch.arange(f, dtype=centres.dtype, device=centres.device) for f in feat],
                           indexing="ij")
    worst, where = 0.0, ""
    for a in range(rank):
        if a in [geom.input_axis[d] for d in range(rank) if feat[d] >= 2]:
            d = geom.input_axis.index(a)
            predicted = geom.offset[d] + geom.stride[d] * grids[d]
        elif phased[a]:
            predicted = c0[a].expand(feat)
        else:
            continue
        err = _wrap(centres[a] - predicted, spatial[a]).abs()
        if float(err.max()) > worst:
            worst = float(err.max())
            cell = tuple(int(i) for i in torch.unravel_index(err.argmax(), feat))
            where = f"cell {cell}, input axis {a}"
    if worst > CENTRE_TOL:
        raise _FitError(
            f"the receptive-field centres of {label!r} are not offset + stride * index: at {where} the "
            f"measured centre is {worst:.2f} voxels from the fit ({geom.describe()}). This happens when a "
            "layer's input size is not divisible by its stride on the probe's periodic input, or when "
            f"the model resamples inside forward(). {_howto(rank)}"
        )
    return geom


def _measure_at(
    probe: nn.Module, target: Target, channels: int, spatial: tuple[int, ...], dtype: torch.dtype,
    device: torch.device,
) -> tuple[FeatureGeometry | None, tuple[int, ...], str]:
    """Measure on one probe input size: (geometry or None, probe feature shape, why None)."""
    rank, label = len(spatial), target.label
    base = torch.ones((1, channels, *spatial), dtype=dtype, device=device)
    for level in _LEVELS:
        centres, amps, dc, nonlinear = _centres(probe, target, base, level)
        if bool((dc > 0).all()):
            break
    else:
        raise FeatureGeometryError(
            f"cannot measure where the cells of {label!r} sit: some cells do not respond to a "
            f"constant positive input in the probe (dead or negative response). {_howto(rank)}"
        )
    if nonlinear > LINEARITY_TOL:
        raise FeatureGeometryError(
            f"the layers before {label!r} do not respond linearly in the geometry probe (relative "
            f"deviation {nonlinear:.2g}); a functional max-pool or another op the probe cannot make "
            f"symmetric runs before it. {_howto(rank)}"
        )
    # an input axis whose first Fourier coefficient vanishes (a receptive field that covers it evenly)
    # has no phase; that is harmless only if no feature axis of more than one cell follows it
    phased = tuple(bool(amps[a].min() > MIN_RELATIVE_AMPLITUDE) for a in range(rank))
    feat = tuple(int(f) for f in centres.shape[1:])
    try:
        return _fit(centres, phased, spatial, label), feat, ""
    except _FitError as e:
        return None, feat, str(e)


def _same(a: FeatureGeometry, b: FeatureGeometry) -> bool:
    return a.input_axis == b.input_axis and all(
        abs(x - y) <= CENTRE_TOL for x, y in zip(a.stride + a.offset, b.stride + b.offset)
    )


def measure_geometry(
    model: nn.Module,
    target: Target,
    x: torch.Tensor,
    feature_shape: Sequence[int] | None = None,
    forward_args: Sequence[Any] = (),
    forward_kwargs: Mapping[str, Any] | None = None,
) -> FeatureGeometry:
    """Measure the feature->input geometry of ``target`` for inputs shaped like ``x`` (see module doc).

    The probe runs at x's own size first. When a layer's input size there is not divisible by its
    stride, the probe's periodic input has a seam and the fit fails; when a receptive field covers the
    whole (small) input evenly, it has no phase. The probe then runs at two larger sizes (x's size, or
    twice it if that changes nothing, rounded up to a multiple of a power of two L >= the
    input/feature ratio, and that plus L), and the geometry is accepted only if both agree (the geometry does not depend on the input
    size) and places x's feature map inside x (cell centres within one stride of the input's extent).

    Args:
        model: the network (left untouched: the probe runs on a copy whose weights are replaced).
        target: the resolved target layer.
        x: (B, C, *spatial) input; only its shape, device and channel count are used.
        feature_shape: the spatial shape the real target layer emits for ``x`` (checked when given).
        forward_args / forward_kwargs: extra model inputs, passed on (floating tensors in float64).

    Returns:
        the measured :class:`FeatureGeometry`.

    Raises:
        FeatureGeometryError: the layer's cells are not axis-aligned, not linear in the index, do not
            respond linearly in the probe, or depend on weights the probe cannot make uniform.
    """
    spatial = tuple(int(s) for s in x.shape[2:])
    rank, channels = len(spatial), int(x.shape[1])
    dtype = torch.float32 if x.device.type == "mps" else torch.float64
    label = target.label
    try:
        probe, handled = _probe_copy(model, dtype)
    except Exception as e:  # deepcopy of an exotic module
        raise FeatureGeometryError(
            f"could not copy {type(model).__name__} to measure where the cells of {label!r} sit "
            f"({type(e).__name__}: {e}). {_howto(rank)}"
        ) from e
    probe.__dict__["_medcam3d_extra"] = (_cast(tuple(forward_args), dtype), _cast(dict(forward_kwargs or {}), dtype))
    with torch.no_grad(), torch.autocast(device_type=x.device.type, enabled=False):
        base = torch.ones((1, channels, *spatial), dtype=dtype, device=x.device)
        try:
            bad = _unhandled_weights(probe, target, base, handled)
            if bad:
                raise FeatureGeometryError(
                    f"{type(model).__name__} uses weights the geometry probe cannot make symmetric "
                    f"before {label!r} ({', '.join(bad[:5])}; only convolution and linear weights "
                    f"are). {_howto(rank)}"
                )
            geom, feat, why = _measure_at(probe, target, channels, spatial, dtype, x.device)
            if feature_shape is not None and feat != tuple(feature_shape):
                raise FeatureGeometryError(
                    f"the geometry probe's copy of {label!r} emits a {feat} map, the model a "
                    f"{tuple(feature_shape)} one (a pooling layer with ceil_mode or an op the probe "
                    f"replaces changes the size). {_howto(rank)}"
                )
            if geom is not None:
                return geom
            ratio = max(n / f for n, f in zip(sorted(spatial), sorted(feat)))
            # a power of two >= the stride, and >= 32 so encoder-decoders keep matching skip sizes
            step = max(2 ** math.ceil(math.log2(max(ratio, 1.0))), 32)
            larger = tuple(-(-n // step) * step for n in spatial)
            if larger == spatial:  # divisible already: the field wraps around the whole probe input
                larger = tuple(-(-2 * n // step) * step for n in spatial)
            sizes = [larger, tuple(n + step for n in larger)]
            found = [_measure_at(probe, target, channels, size, dtype, x.device)[0] for size in sizes]
        except FeatureGeometryError:
            raise
        except Exception as e:
            raise FeatureGeometryError(
                f"the geometry probe of {label!r} failed ({type(e).__name__}: {e}); the probe runs the "
                f"model with circular padding and average pools. {_howto(rank)}"
            ) from e
    if found[0] is None or found[1] is None or not _same(found[0], found[1]):
        detail = " / ".join("no fit" if g is None else g.describe() for g in found)
        raise FeatureGeometryError(
            f"{why} On larger probe inputs {sizes[0]} and {sizes[1]} the geometry was: {detail}; it "
            f"depends on the input size, so it cannot be carried over to {spatial}."
        )
    geom = found[0]
    for d in range(rank):
        a, n = geom.input_axis[d], spatial[geom.input_axis[d]]
        ends = (geom.offset[d], geom.offset[d] + geom.stride[d] * (feat[d] - 1))
        if feat[d] >= 2 and not (-abs(geom.stride[d]) <= min(ends) and max(ends) <= n - 1 + abs(geom.stride[d])):
            raise FeatureGeometryError(
                f"{why} On larger probe inputs the geometry is {geom.describe()}, but it would put the "
                f"{feat[d]} cells of feature axis {d} at input indices {ends[0]:g}..{ends[1]:g}, outside "
                f"input axis {a} (0..{n - 1})."
            )
    return geom


# ----------------------------------------------------------------------------- cache
_CACHE: "weakref.WeakKeyDictionary[nn.Module, dict[tuple, FeatureGeometry | FeatureGeometryError]]" = (
    weakref.WeakKeyDictionary()
)


def geometry_for(
    model: nn.Module,
    target: Target,
    x: torch.Tensor,
    feature_shape: Sequence[int] | None = None,
    forward_args: Sequence[Any] = (),
    forward_kwargs: Mapping[str, Any] | None = None,
) -> FeatureGeometry:
    """:func:`measure_geometry`, cached per model object, target layer, input channels/shape and device.

    A failed measurement is cached too (the same error is raised again without re-probing). The
    extra forward inputs are not part of the key: the geometry of a layer does not depend on them.
    """
    key = (target.name, target.where, tuple(x.shape[1:]), str(x.device),
           None if feature_shape is None else tuple(feature_shape))
    per_model = _CACHE.setdefault(model, {})
    if key not in per_model:
        try:
            per_model[key] = measure_geometry(model, target, x, feature_shape, forward_args, forward_kwargs)
        except FeatureGeometryError as e:
            per_model[key] = e
    found = per_model[key]
    if isinstance(found, FeatureGeometryError):
        raise FeatureGeometryError(str(found))
    return found
