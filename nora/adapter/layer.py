"""Activation modules: a frozen group-wise rational and its trainable NoRA variants."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from nora.kernels import rational

_LOW_PRECISION = (torch.float16, torch.bfloat16)


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
    """

    def __init__(self, numerator: Tensor, denominator: Tensor, form: str = "A", backend: str = "auto",
                 original: str | None = None, fit_range: tuple[float, float] | None = None,
                 channel_dim: int = -1, width: int | None = None):
        super().__init__()
        numerator = torch.as_tensor(numerator, dtype=torch.float32)
        denominator = torch.as_tensor(denominator, dtype=torch.float32)
        if numerator.dim() == 1:
            numerator = numerator[None]
        if denominator.dim() == 1:
            denominator = denominator[None]
        groups = max(numerator.shape[0], denominator.shape[0])
        if numerator.shape[0] not in (1, groups) or denominator.shape[0] not in (1, groups):
            raise ValueError(f"numerator {tuple(numerator.shape)} and denominator {tuple(denominator.shape)} "
                             "must have 1 or G rows")
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

    @property
    def degrees(self) -> tuple[int, int]:
        return self.base_numerator.shape[1] - 1, self.base_denominator.shape[1]

    def coefficients(self) -> tuple[Tensor, Tensor]:
        """The effective per-group coefficients ``(G, m+1)``, ``(G, n)`` used in forward."""
        return self.base_numerator.expand(self.groups, -1), self.base_denominator

    def forward(self, x: Tensor) -> Tensor:
        dim = self.channel_dim if x.dim() > 1 else -1
        channels = x.shape[dim]
        if self.width is not None and channels != self.width:
            layout = "channels-last (N, ..., C)" if dim == -1 else "conv-layout (N, C, ...)"
            raise ValueError(f"{type(self).__name__}: expected {self.width} channels on dim {dim} of a {layout} "
                             f"input, got shape {tuple(x.shape)}")
        if channels % self.groups:
            raise ValueError(f"{type(self).__name__}: channel dimension {channels} (dim {dim}) is not divisible by "
                             f"{self.groups} groups")
        if self.width is None:
            self.width = channels  # first call: remember the width (saved with the adapter)
        num, den = self.coefficients()
        if dim == 1:  # conv layout: group the channels, not the image width
            return rational(x.movedim(1, -1), num, den, self.form, self.backend).movedim(-1, 1)
        return rational(x, num, den, self.form, self.backend)

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
        return (f"groups={self.groups}, degrees=({m}, {n}), form={self.form}, original={self.original}, "
                f"width={self.width}{layout}")


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

    def __init__(self, numerator: Tensor, denominator: Tensor, form: str = "A", backend: str = "auto",
                 original: str | None = None, variant: str = "nora", r: int = 3, alpha: float = 6.0,
                 numerator_mode: str = "group", groups: int | None = None,
                 fit_range: tuple[float, float] | None = None, channel_dim: int = -1, width: int | None = None):
        numerator = torch.as_tensor(numerator, dtype=torch.float32)
        denominator = torch.as_tensor(denominator, dtype=torch.float32)
        if groups is not None:  # broadcast a single fitted row to all groups of the denominator
            if denominator.dim() == 1:
                denominator = denominator[None]
            if denominator.shape[0] == 1:
                denominator = denominator.expand(groups, -1)
        super().__init__(numerator, denominator, form, backend, original, fit_range, channel_dim, width)
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
            base_num = self.base_numerator.expand(gn, -1) if self.base_numerator.shape[0] == 1 \
                else self.base_numerator[:gn]
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

    def merged(self) -> GroupRational:
        """A frozen :class:`GroupRational` with the update folded into per-group coefficients."""
        with torch.no_grad():
            num, den = self.coefficients()
            return GroupRational(num.detach().clone(), den.detach().clone(), self.form, self.backend,
                                 self.original, self.fit_range, self.channel_dim,
                                 self.width).to(self.base_numerator.device)

    def extra_repr(self) -> str:
        s = super().extra_repr() + f", variant={self.variant}"
        if self.variant == "nora":
            s += f", r={self.r}, alpha={self.alpha}"
        return s + f", numerator={self.numerator_mode}"
