"""Resize (and the older Upsample) as PyTorch kernels.

``F.interpolate`` is used where its sampling is exactly ONNX's (linear and cubic with
``half_pixel`` / ``align_corners``, nearest at integer factors 1 and 2). Everything else runs a
separable gather-and-weight plan computed once from the spec's coordinate transformation, nearest
rounding, cubic coefficients, ``exclude_outside``, antialiasing and ``tf_crop_and_resize``
extrapolation: per resized axis an index matrix ``[out, taps]`` and a weight matrix ``[out, taps]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mtc.lower.registry import BuildNode, Kernel, as_ints, operands


def _str(v: Any, default: str) -> str:
    if v is None:
        return default
    return v.decode() if isinstance(v, bytes) else str(v)


@dataclass(frozen=True)
class _Attrs:
    mode: str
    ctm: str
    nearest_mode: str
    cubic_a: float
    exclude_outside: bool
    extrapolation: float
    antialias: bool
    axes: tuple[int, ...] | None
    policy: str


# --- coefficients (the ONNX spec's kernels) -----------------------------------------------------------


def _linear(ratio: float, scale: float, antialias: bool) -> np.ndarray:
    if not antialias:
        return np.array([1 - ratio, ratio])
    s = min(scale, 1.0)
    start = int(np.floor(-1 / s) + 1)
    taps = 2 - 2 * start
    c = np.clip(1 - np.abs((np.arange(start, start + taps) - ratio) * s), 0, 1)
    return c / c.sum()


def _cubic(ratio: float, scale: float, antialias: bool, a: float) -> np.ndarray:
    def w(x: float) -> float:
        x = abs(x)
        if x <= 1:
            return (a + 2) * x**3 - (a + 3) * x**2 + 1
        if x < 2:
            return a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a
        return 0.0

    if not antialias:
        return np.array([w(ratio + 1), w(ratio), w(1 - ratio), w(2 - ratio)])
    s = min(scale, 1.0)
    start = int(np.floor(-2 / s) + 1)
    c = np.array([w(s * (i - ratio)) for i in range(start, 2 - start)])
    return c / c.sum()


def _source_coords(a: _Attrs, out: int, in_size: int, scale: float, roi: tuple[float, float] | None
                   ) -> tuple[np.ndarray, np.ndarray | None]:
    """Source coordinate of every output index along one axis, and the extrapolated positions."""
    y = np.arange(out, dtype=np.float64)
    width = scale * in_size
    ctm = a.ctm
    if ctm == "align_corners":
        x = np.zeros(out) if width == 1 else y * (in_size - 1) / (width - 1)
    elif ctm == "asymmetric":
        x = y / scale
    elif ctm == "pytorch_half_pixel":
        x = np.full(out, -0.5) if width == 1 else (y + 0.5) / scale - 0.5
    elif ctm == "half_pixel":
        x = (y + 0.5) / scale - 0.5
    elif ctm == "half_pixel_symmetric":
        offset = in_size / 2 * (1 - out / width)
        x = offset + (y + 0.5) / scale - 0.5
    elif ctm == "tf_crop_and_resize":
        lo, hi = roi if roi is not None else (0.0, 1.0)
        if width == 1:
            x = np.full(out, (hi - lo) * (in_size - 1) / 2)
        else:
            x = y * (hi - lo) * (in_size - 1) / (width - 1)
        x = x + lo * (in_size - 1)
        return x, (x < 0) | (x > in_size - 1)
    else:
        raise ValueError(f"coordinate_transformation_mode '{ctm}' is not supported")
    return x, None


def _axis_plan(a: _Attrs, in_size: int, out: int, scale: float, roi: tuple[float, float] | None
               ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """``(index [out, taps], weights [out, taps] or None for nearest, extrapolated mask or None)``."""
    x, extra = _source_coords(a, out, in_size, scale, roi)
    fl = np.floor(x)
    ratio = np.where(x == fl, 1.0, x - fl)
    if a.mode == "nearest":
        nm = a.nearest_mode
        if nm == "round_prefer_floor":
            up = ratio > 0.5
        elif nm == "round_prefer_ceil":
            up = ratio >= 0.5
        elif nm == "floor":
            up = np.zeros_like(ratio, dtype=bool)
        elif nm == "ceil":
            up = np.ones_like(ratio, dtype=bool)
        else:
            raise ValueError(f"nearest_mode '{nm}' is not supported")
        # An integral coordinate selects itself whatever the rounding mode.
        idx = np.clip(np.where(x == fl, fl, fl + up), 0, in_size - 1).astype(np.int64)
        return idx[:, None], None, extra
    if a.mode == "linear":
        coeffs = np.stack([_linear(r, scale, a.antialias) for r in ratio])
    else:
        coeffs = np.stack([_cubic(r, scale, a.antialias, a.cubic_a) for r in ratio])
    taps = coeffs.shape[1]
    # The `taps` neighbours nearest to x (ties to the smaller index), as the spec's reference picks them.
    pad = math.ceil(taps / 2)
    xp = x + pad
    p = np.floor(xp)
    frac = xp - p
    if taps % 2 == 0:
        off = np.where(frac == 0, -(taps // 2), -(taps // 2) + 1)
    else:
        base_off = -((taps - 1) // 2)
        off = np.where(frac <= 0.5, base_off, base_off + 1)
    nb = (p + off)[:, None].astype(np.int64) + np.arange(taps)[None, :] - pad
    if a.exclude_outside:
        coeffs = np.where((nb < 0) | (nb >= in_size), 0.0, coeffs)
        s = coeffs.sum(1, keepdims=True)
        coeffs = coeffs / np.where(s == 0, 1.0, s)
    return np.clip(nb, 0, in_size - 1), coeffs, extra


# --- sizes --------------------------------------------------------------------------------------------


def _out_sizes(a: _Attrs, shape: Sequence[int], scales: list[float] | None, sizes: list[int] | None
               ) -> tuple[list[int], list[float]]:
    r = len(shape)
    axes = [ax + r if ax < 0 else ax for ax in a.axes] if a.axes is not None else list(range(r))
    if sizes is not None:
        full = list(shape)
        for i, ax in enumerate(axes):
            full[ax] = sizes[i]
        sc = [full[i] / shape[i] if shape[i] else 1.0 for i in range(r)]
        if a.policy != "stretch":
            pick = min if a.policy == "not_larger" else max
            s = pick(sc[ax] for ax in axes)
            sc = [s if i in axes else 1.0 for i in range(r)]
            full = [int(s * shape[i] + 0.5) if i in axes else shape[i] for i in range(r)]
        return full, sc
    assert scales is not None
    sc = [1.0] * r
    for i, ax in enumerate(axes):
        sc[ax] = float(scales[i])
    return [int(math.floor(shape[i] * sc[i])) for i in range(r)], sc


def _roi_pairs(a: _Attrs, roi: np.ndarray | None, r: int) -> list[tuple[float, float]] | None:
    if roi is None or roi.size == 0 or a.ctm != "tf_crop_and_resize":
        return None
    vals = [float(v) for v in roi.reshape(-1)]
    axes = [ax + r if ax < 0 else ax for ax in a.axes] if a.axes is not None else list(range(r))
    pairs = [(0.0, 1.0)] * r
    k = len(axes)
    for i, ax in enumerate(axes):
        pairs[ax] = (vals[i], vals[k + i])
    return pairs


# --- kernels ------------------------------------------------------------------------------------------


def _fast(a: _Attrs, shape: Sequence[int], outs: list[int], scales: list[float], by_sizes: bool
          ) -> Kernel | None:
    """``F.interpolate`` where it samples exactly as ONNX does."""
    r = len(shape)
    if r not in (3, 4, 5) or outs[:2] != list(shape[:2]) or a.antialias or a.ctm == "tf_crop_and_resize":
        return None
    if a.policy != "stretch" and by_sizes:
        return None
    spatial_out = tuple(outs[2:])
    if a.mode == "nearest":
        # torch computes nearest indices with a float32 scale: exact only for factors 1 and 2.
        if not (a.ctm == "asymmetric" and a.nearest_mode == "floor"):
            return None
        if any(o not in (i, 2 * i) for o, i in zip(outs[2:], shape[2:], strict=True)):
            return None
        return lambda x: F.interpolate(x, size=spatial_out, mode="nearest")
    if a.mode == "linear":
        mode = {3: "linear", 4: "bilinear", 5: "trilinear"}[r]
    elif a.mode == "cubic" and r == 4 and a.cubic_a == -0.75 and not a.exclude_outside:
        mode = "bicubic"
    else:
        return None
    if a.ctm == "align_corners":
        # ONNX maps with the real-valued output width (scale * in), torch with the integer size.
        if not by_sizes and any(o != s * i for o, s, i in zip(outs[2:], scales[2:], shape[2:], strict=True)):
            return None
        align = True
    elif a.ctm == "half_pixel" or (a.ctm == "pytorch_half_pixel" and all(o > 1 for o in outs[2:])):
        align = False
    else:
        return None
    if by_sizes or align:
        return lambda x: F.interpolate(x, size=spatial_out, mode=mode, align_corners=align)
    sf = tuple(scales[2:])
    return lambda x: F.interpolate(x, scale_factor=sf, mode=mode, align_corners=False, recompute_scale_factor=False)


def _plans(a: _Attrs, shape: Sequence[int], outs: list[int], scales: list[float],
           roi: list[tuple[float, float]] | None) -> list[tuple[int, np.ndarray, np.ndarray | None, np.ndarray | None]]:
    plans = []
    for ax, (n, o) in enumerate(zip(shape, outs, strict=True)):
        pair = roi[ax] if roi is not None else None
        if o == n and math.isclose(scales[ax], 1.0) and (pair is None or pair == (0.0, 1.0)):
            continue
        idx, w, extra = _axis_plan(a, n, o, scales[ax], pair)
        plans.append((ax, idx, w, extra))
    return plans


def _apply_axis(x: torch.Tensor, ax: int, idx: torch.Tensor, w: torch.Tensor | None, extra: torch.Tensor | None,
                extrapolation: float) -> torch.Tensor:
    out, taps = idx.shape
    g = x.index_select(ax, idx.reshape(-1))
    if w is None:
        y = g
    else:
        g = g.reshape(tuple(x.shape[:ax]) + (out, taps) + tuple(x.shape[ax + 1:]))
        wv = w.reshape((out, taps) + (1,) * (x.dim() - ax - 1)).to(x.dtype if x.is_floating_point() else torch.float32)
        y = (g * wv).sum(ax + 1)
    if extra is not None:
        m = extra.reshape((out,) + (1,) * (x.dim() - ax - 1))
        y = torch.where(m, torch.tensor(extrapolation, dtype=y.dtype, device=y.device), y)
    return y


def _run_plans(x: torch.Tensor, plans: Sequence[tuple[int, torch.Tensor, torch.Tensor | None, torch.Tensor | None]],
               extrapolation: float) -> torch.Tensor:
    y = x
    for ax, idx, w, extra in plans:
        y = _apply_axis(y, ax, idx, w, extra, extrapolation)
    if not x.is_floating_point():
        y = torch.round(y).to(x.dtype) if y.is_floating_point() else y
    return y


def resize_attrs(attr: Callable[[str, Any], Any], *, old: bool = False) -> _Attrs:
    """A Resize node's attributes with the spec's defaults; ``attr(name, default)`` reads one.

    ``old``: Resize-10 / Upsample semantics (asymmetric coordinates, floor rounding).
    """
    mode = _str(attr("mode", None), "nearest")
    axes = as_ints(attr("axes", None))
    return _Attrs(
        mode="linear" if mode == "bilinear" else mode,
        ctm="asymmetric" if old else _str(attr("coordinate_transformation_mode", None), "half_pixel"),
        nearest_mode="floor" if old else _str(attr("nearest_mode", None), "round_prefer_floor"),
        cubic_a=float(attr("cubic_coeff_a", -0.75)),
        exclude_outside=bool(attr("exclude_outside", 0)),
        extrapolation=float(attr("extrapolation_value", 0.0)),
        antialias=bool(attr("antialias", 0)),
        axes=tuple(axes) if axes else None,
        policy=_str(attr("keep_aspect_ratio_policy", None), "stretch"),
    )


def output_sizes(a: _Attrs, shape: Sequence[int], scales: Sequence[float] | None, sizes: Sequence[int] | None
                 ) -> tuple[list[int], list[float]]:
    """Every axis's output size and scale (the spec's rules, ``keep_aspect_ratio_policy`` included)."""
    return _out_sizes(a, shape, None if scales is None else list(scales), None if sizes is None else list(sizes))


def axis_matrix(a: _Attrs, in_size: int, out: int, scale: float) -> np.ndarray:
    """The ``[out, in_size]`` matrix that resizes one axis (``y = M @ x``): the plan the lowering
    runs, as a dense map. Not for ``tf_crop_and_resize`` (its extrapolated positions are no linear map)."""
    idx, w, _ = _axis_plan(a, in_size, out, scale, None)
    m = np.zeros((out, in_size))
    np.add.at(m, (np.repeat(np.arange(out), idx.shape[1]), idx.reshape(-1)),
              1.0 if w is None else w.reshape(-1))
    return m


def build_resize(node: BuildNode, *, upsample: bool = False) -> Kernel:
    """Builder for Resize (opset 10+) and Upsample (opset 7-9)."""
    old = upsample or node.opset < 11
    a = resize_attrs(node.attr, old=old)
    if a.mode not in ("nearest", "linear", "cubic"):
        raise node.error(f"Resize mode '{a.mode}' is not supported")
    if a.mode == "nearest" and a.antialias:
        raise node.error("antialias is not defined for nearest Resize")

    if upsample and node.opset < 9:
        return _make_kernel(node, a, None, node.attr("scales"), None, runtime=False)
    idxs = [1] if old else [1, 2, 3]

    def make(*vals: Any, runtime: bool = False) -> Kernel:
        if old:
            return _make_kernel(node, a, None, vals[0], None, runtime=runtime)
        return _make_kernel(node, a, vals[0], vals[1], vals[2], runtime=runtime)

    return operands(node, idxs, make)


def _make_kernel(node: BuildNode, a: _Attrs, roi_v: Any, scales_v: Any, sizes_v: Any, *, runtime: bool) -> Kernel:
    roi = None if roi_v is None else np.asarray(roi_v, dtype=np.float64)
    scales = None
    sizes = None
    if scales_v is not None and np.asarray(scales_v).size:
        scales = [float(v) for v in np.asarray(scales_v).reshape(-1)]
    if sizes_v is not None and np.asarray(sizes_v).size:
        sizes = as_ints(sizes_v)
    if scales is None and sizes is None:
        raise node.error("Resize needs scales or sizes")

    def plan_for(shape: Sequence[int]) -> tuple[Kernel | None, list[Any]]:
        outs, sc = _out_sizes(a, shape, scales, sizes)
        fast = _fast(a, shape, outs, sc, sizes is not None)
        if fast is not None:
            return fast, []
        return None, _plans(a, shape, outs, sc, _roi_pairs(a, roi, len(shape)))

    static = node.static_shape(0)
    if static is not None and not runtime:
        fast, plans = plan_for(static)
        if fast is not None:
            return fast
        # Index and weight tables become (non-persistent) buffers so they follow the module's device.
        layout: list[tuple[int, bool, bool]] = []
        for k, (ax, idx, w, extra) in enumerate(plans):
            node.add_parameter(f"resize_idx{k}", torch.from_numpy(idx.copy()), buffer=True, persistent=False)
            if w is not None:
                node.add_parameter(f"resize_w{k}", torch.from_numpy(w.astype(np.float64)), buffer=True, persistent=False)
            if extra is not None:
                node.add_parameter(f"resize_mask{k}", torch.from_numpy(extra.copy()), buffer=True, persistent=False)
            layout.append((ax, w is not None, extra is not None))
        extrapolation = a.extrapolation

        def resize_static(x: torch.Tensor, *tables: torch.Tensor) -> torch.Tensor:
            it = iter(tables)
            plan = [(ax, next(it), next(it) if has_w else None, next(it) if has_m else None)
                    for ax, has_w, has_m in layout]
            return _run_plans(x, plan, extrapolation)

        return resize_static

    cache: dict[tuple[Any, ...], Callable[[torch.Tensor], torch.Tensor]] = {}

    def resize_dynamic(x: torch.Tensor) -> torch.Tensor:
        key = (tuple(x.shape), x.device)
        fn = cache.get(key)
        if fn is None:
            fast, plans = plan_for(tuple(x.shape))
            if fast is not None:
                fn = fast
            else:
                tplans = [
                    (ax, torch.from_numpy(idx).to(x.device), None if w is None else torch.from_numpy(w).to(x.device),
                     None if m is None else torch.from_numpy(m).to(x.device))
                    for ax, idx, w, m in plans
                ]
                fn = lambda t, _p=tplans: _run_plans(t, _p, a.extrapolation)  # noqa: E731
            cache[key] = fn
        return fn(x)

    return resize_dynamic
