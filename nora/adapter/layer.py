"""Activation modules: a frozen group-wise rational and its trainable NoRA variants.

Two forms of the output (``residual``):

* ``residual=True`` (nora's default): ``y = phi(x) + (R_coef(x) - R_fit(x))``, with ``phi`` the original activation
  and ``R_fit`` the frozen fit of it: exactly ``phi(x)`` until the coefficients move (step 0, a disabled adapter),
  whatever the range of ``x``; a trained update changes the activation by the change of the rational.
* ``residual=False`` (the paper's form): ``y = R_coef(x)``: the rational replaces the activation, and equals it only as
  far as the fit does (within its ``fit_range``).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor, nn

from nora.kernels import rational, residual_rational
from nora.rational.fit import ACTIVATIONS
from nora.rational.functional import KERNEL_ACTIVATIONS

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def original_function(original: str | None, module: nn.Module | None = None) -> Callable[[Tensor], Tensor] | None:
    """How the residual form computes the original activation ``phi`` outside the kernels: the module it replaced
    (exactly what the model computed) if given, else the named function of :data:`nora.rational.fit.ACTIVATIONS`;
    None if neither is known. (The activations of ``KERNEL_ACTIVATIONS`` are computed inside the kernels.)"""
    if module is not None:
        return module
    return ACTIVATIONS.get(original) if original else None


class GroupRational(nn.Module):
    """``y = P_g(x) / Q_g(x)`` with G groups of contiguous channels.

    The channels are on dimension ``channel_dim``: ``-1`` for channels-last inputs ``(N, L, C)`` (the
    default), ``1`` for conv-layout inputs ``(N, C, H, W)``; ``width`` (if known) is their count, checked on
    every call.

    The coefficients are float32 buffers (frozen, saved in the state dict) and stay float32 when the
    module is cast with ``.to(torch.bfloat16)``/``.half()``: the math always runs in float32 and only
    the output takes the input's dtype.

    ``base_numerator`` is ``(G, m+1)`` or ``(1, m+1)`` (one numerator shared by all groups, as in the
    released code); ``base_denominator`` is ``(G, n)``.

    ``residual=True``: ``y = phi(x) + (P/Q(x) - R_fit(x))`` (module docstring) with ``phi`` the activation named
    ``original`` (``original_module``, the module this replaced, where it is not one nora knows by name) and
    ``R_fit`` the rational of ``fit_numerator``/``fit_denominator`` (buffers; default: these coefficients, i.e.
    exactly ``phi``). A merged residual NoRA activation is one of these.
    """

    def __init__(
        self,
        numerator: Tensor,
        denominator: Tensor,
        form: str = "A",
        backend: str = "auto",
        original: str | None = None,
        fit_range: tuple[float, float] | None = None,
        channel_dim: int = -1,
        width: int | None = None,
        residual: bool = False,
        fit_numerator: Tensor | None = None,
        fit_denominator: Tensor | None = None,
        original_module: nn.Module | None = None,
    ):
        super().__init__()
        numerator = torch.as_tensor(numerator, dtype=torch.float32)
        denominator = torch.as_tensor(denominator, dtype=torch.float32)
        if numerator.dim() == 1:
            numerator = numerator[None]
        if denominator.dim() == 1:
            denominator = denominator[None]
        groups = max(numerator.shape[0], denominator.shape[0])
        if numerator.shape[0] not in (1, groups) or denominator.shape[0] not in (1, groups):
            raise ValueError(
                f"numerator {tuple(numerator.shape)} and denominator {tuple(denominator.shape)} must have 1 or G rows"
            )
        self.groups = groups
        self.form = form
        self.backend = backend
        self.original = original  # name of the activation this replaced (for plots and reports)
        # the inputs the base coefficients were fitted over (the fit range, or the calibrated inputs' hull)
        self.fit_range = tuple(float(v) for v in fit_range) if fit_range is not None else None
        if channel_dim not in (-1, 1):
            raise ValueError(f"channel_dim must be -1 (channels last) or 1 (conv layout), got {channel_dim}")
        self.channel_dim = channel_dim
        self.width = int(width) if width is not None else None
        self.register_buffer("base_numerator", numerator.clone())
        self.register_buffer("base_denominator", denominator.expand(groups, -1).clone())
        self.residual = bool(residual)
        # not a submodule: the original activation is computed, never trained, saved or found as a target again
        self.__dict__["original_module"] = original_module
        if self.residual:
            self._check_original()
            if fit_numerator is not None or fit_denominator is not None:
                if fit_numerator is None or fit_denominator is None:
                    raise ValueError("the residual form needs both fit_numerator and fit_denominator, or neither")
                fit_num = torch.as_tensor(fit_numerator, dtype=torch.float32).reshape(-1, numerator.shape[1])
                fit_den = torch.as_tensor(fit_denominator, dtype=torch.float32).reshape(-1, denominator.shape[1])
                self.register_buffer("fit_numerator", fit_num.expand(groups, -1).clone())
                self.register_buffer("fit_denominator", fit_den.expand(groups, -1).clone())

    def _check_original(self) -> None:
        if self.original not in KERNEL_ACTIVATIONS and original_function(self.original, self.original_module) is None:
            raise ValueError(
                f"the residual form computes the original activation, and {self.original!r} is not one "
                f"nora knows by name ({', '.join(sorted(set(KERNEL_ACTIVATIONS[1:]) | set(ACTIVATIONS)))})"
                ": pass the module it replaces as original_module, or use residual=False"
            )

    @property
    def degrees(self) -> tuple[int, int]:
        return self.base_numerator.shape[1] - 1, self.base_denominator.shape[1]

    def coefficients(self) -> tuple[Tensor, Tensor]:
        """The effective per-group coefficients ``(G, m+1)``, ``(G, n)`` used in forward."""
        return self.base_numerator.expand(self.groups, -1), self.base_denominator

    def fit_coefficients(self) -> tuple[Tensor, Tensor]:
        """The residual form's ``R_fit`` coefficients ``(G, m+1)``, ``(G, n)`` (the rational whose change is added to
        the original activation)."""
        if "fit_numerator" in self._buffers:
            return self.fit_numerator, self.fit_denominator
        return self.base_numerator.expand(self.groups, -1), self.base_denominator

    def forward(self, x: Tensor) -> Tensor:
        return self.evaluate(x, *self.coefficients())

    def evaluate(self, x: Tensor, num: Tensor, den: Tensor) -> Tensor:
        """This activation with the coefficients ``num`` (G, m+1), ``den`` (G, n): ``P/Q(x)``, or in the residual
        form ``phi(x) + (P/Q(x) - R_fit(x))``; channels and groups as this module cuts them (checked)."""
        dim = self.channel_dim if x.dim() > 1 else -1
        channels = x.shape[dim]
        if self.width is not None and channels != self.width:
            layout = "channels-last (N, ..., C)" if dim == -1 else "conv-layout (N, C, ...)"
            raise ValueError(
                f"{type(self).__name__}: expected {self.width} channels on dim {dim} of a {layout} "
                f"input, got shape {tuple(x.shape)}"
            )
        if channels % self.groups:
            raise ValueError(
                f"{type(self).__name__}: channel dimension {channels} (dim {dim}) is not divisible by "
                f"{self.groups} groups"
            )
        if self.width is None:
            self.width = channels  # first call: remember the width (saved with the adapter)
        if dim == 1:  # conv layout: group the channels, not the image width
            return self._channels_last(x.movedim(1, -1), num, den).movedim(-1, 1)
        return self._channels_last(x, num, den)

    def _channels_last(self, x: Tensor, num: Tensor, den: Tensor) -> Tensor:
        if not self.residual:
            return rational(x, num, den, self.form, self.backend)
        fit_num, fit_den = self.fit_coefficients()
        if self.original in KERNEL_ACTIVATIONS:  # phi computed inside the kernel, fused with the two rationals
            return residual_rational(x, num, den, fit_num, fit_den, self.form, self.original, self.backend)
        phi = original_function(self.original, self.original_module)
        return phi(x) + residual_rational(x, num, den, fit_num, fit_den, self.form, "none", self.backend)

    def _apply(self, fn, recurse=True):
        # keep the (tiny) coefficient tensors in float32 under model.to(bf16)/.half(): remember the
        # exact values, let the cast happen (it may also move devices), then restore them.
        own = list(self._buffers.items()) + list(self._parameters.items())
        exact = {name: t.detach().clone() for name, t in own if t is not None and t.dtype == torch.float32}
        super()._apply(fn, recurse)
        for name, t in list(self._buffers.items()) + list(self._parameters.items()):
            if name in exact and t is not None and t.dtype in _LOW_PRECISION:
                t.data = exact[name].to(t.device)
        return self

    def extra_repr(self) -> str:
        m, n = self.degrees
        layout = "" if self.channel_dim == -1 else f", channel_dim={self.channel_dim}"
        return (
            f"groups={self.groups}, degrees=({m}, {n}), form={self.form}, original={self.original}, "
            f"residual={self.residual}, width={self.width}{layout}"
        )


class NoraActivation(GroupRational):
    """A frozen base rational plus a trainable coefficient update.

    ``variant``:
      * ``"nora"``: ``a_g = a_base + (alpha/r) (B_N A_N)[g]``, ``b_g = b_base + (alpha/r) (B_D A_D)[g]``
        with ``A`` Kaiming-uniform (as LoRA's A) and ``B`` zero, so step 0 equals the base rational;
      * ``"zero_init_ft"``: ``a_g = a_base + dA[g]``, ``b_g = b_base + dB[g]`` with zero-initialised
        full per-group deltas;
      * ``"rational_ft"``: the per-group coefficients are the parameters (initialised at the base);
      * ``"frozen"``: no trainable parameters.

    ``numerator="shared"`` makes the numerator update one row shared by all groups.
    """

    def __init__(
        self,
        numerator: Tensor,
        denominator: Tensor,
        form: str = "A",
        backend: str = "auto",
        original: str | None = None,
        variant: str = "nora",
        r: int = 3,
        alpha: float = 6.0,
        numerator_mode: str = "group",
        groups: int | None = None,
        fit_range: tuple[float, float] | None = None,
        channel_dim: int = -1,
        width: int | None = None,
        residual: bool = False,
        original_module: nn.Module | None = None,
    ):
        numerator = torch.as_tensor(numerator, dtype=torch.float32)
        denominator = torch.as_tensor(denominator, dtype=torch.float32)
        if groups is not None:  # broadcast a single fitted row to all groups of the denominator
            if denominator.dim() == 1:
                denominator = denominator[None]
            if denominator.shape[0] == 1:
                denominator = denominator.expand(groups, -1)
        if (
            residual
            and variant == "rational_ft"
            and numerator_mode == "shared"
            and numerator.dim() == 2
            and numerator.shape[0] > 1
        ):
            # rational_ft trains one shared numerator, which starts at the mean of per-group fits: the residual form
            # subtracts the rational it starts from, so that step 0 stays exact
            numerator = numerator.mean(0, keepdim=True).expand_as(numerator)
        super().__init__(
            numerator,
            denominator,
            form,
            backend,
            original,
            fit_range,
            channel_dim,
            width,
            residual=residual,
            original_module=original_module,
        )
        self.variant = variant
        self.adapter_enabled = True  # False: compute the base rational (nora.disable_adapter, peft's disable_adapter)
        self.numerator_mode = numerator_mode
        self.r = r
        self.alpha = alpha
        m1, n = self.base_numerator.shape[1], self.base_denominator.shape[1]
        g, gn = self.groups, (1 if numerator_mode == "shared" else self.groups)
        dev = self.base_numerator.device
        if variant == "nora":
            self.scale = alpha / r
            self.nora_A_num = nn.Parameter(torch.empty(r, m1, device=dev))
            self.nora_B_num = nn.Parameter(torch.zeros(gn, r, device=dev))
            self.nora_A_den = nn.Parameter(torch.empty(r, n, device=dev))
            self.nora_B_den = nn.Parameter(torch.zeros(g, r, device=dev))
            # as LoRA's A: kaiming_uniform_(a=sqrt(5)) over the fan-in (the coefficient axis)
            nn.init.kaiming_uniform_(self.nora_A_num, a=math.sqrt(5))
            nn.init.kaiming_uniform_(self.nora_A_den, a=math.sqrt(5))
        elif variant == "zero_init_ft":
            self.nora_delta_num = nn.Parameter(torch.zeros(gn, m1, device=dev))
            self.nora_delta_den = nn.Parameter(torch.zeros(g, n, device=dev))
        elif variant == "rational_ft":
            base_num = (
                self.base_numerator.expand(gn, -1) if self.base_numerator.shape[0] == 1 else self.base_numerator[:gn]
            )
            if numerator_mode == "shared" and self.base_numerator.shape[0] != 1:
                base_num = self.base_numerator.mean(0, keepdim=True)
            self.nora_num = nn.Parameter(base_num.clone())
            self.nora_den = nn.Parameter(self.base_denominator.clone())
        elif variant != "frozen":
            raise ValueError(f"unknown variant {variant!r}; valid: nora, rational_ft, zero_init_ft, frozen")

    def coefficients(self) -> tuple[Tensor, Tensor]:
        g = self.groups
        if not self.adapter_enabled:
            return self.base_numerator.expand(g, -1), self.base_denominator
        if self.variant == "nora":
            num = self.base_numerator + self.scale * (self.nora_B_num @ self.nora_A_num)
            den = self.base_denominator + self.scale * (self.nora_B_den @ self.nora_A_den)
        elif self.variant == "zero_init_ft":
            num = self.base_numerator + self.nora_delta_num
            den = self.base_denominator + self.nora_delta_den
        elif self.variant == "rational_ft":
            num, den = self.nora_num, self.nora_den
        else:
            num, den = self.base_numerator, self.base_denominator
        return num.expand(g, -1), den

    def delta(self) -> tuple[Tensor, Tensor]:
        """Effective coefficients minus the base ones (the update the adapter has learnt)."""
        num, den = self.coefficients()
        return num - self.base_numerator.expand(self.groups, -1), den - self.base_denominator

    def fit_coefficients(self) -> tuple[Tensor, Tensor]:
        """The frozen base rational: what the residual form subtracts (so that step 0 is the original activation)."""
        return self.base_numerator.expand(self.groups, -1), self.base_denominator

    def merged(self) -> GroupRational:
        """A frozen :class:`GroupRational` with the update folded into per-group coefficients (in the residual form,
        with this base rational as its fit: the same function)."""
        with torch.no_grad():
            num, den = self.coefficients()
            fit_num, fit_den = self.fit_coefficients() if self.residual else (None, None)
            return GroupRational(
                num.detach().clone(),
                den.detach().clone(),
                self.form,
                self.backend,
                self.original,
                self.fit_range,
                self.channel_dim,
                self.width,
                residual=self.residual,
                fit_numerator=fit_num,
                fit_denominator=fit_den,
                original_module=self.original_module,
            ).to(self.base_numerator.device)

    def extra_repr(self) -> str:
        s = super().extra_repr() + f", variant={self.variant}"
        if self.variant == "nora":
            s += f", r={self.r}, alpha={self.alpha}"
        return s + f", numerator={self.numerator_mode}"
