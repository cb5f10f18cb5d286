"""``NoraLayer``: peft's tuner layer around an activation, one :class:`nora.NoraActivation` per adapter.

``base_layer`` is the model's own activation (SiLU, GELU); each adapter ``a`` holds a ``NoraActivation`` in
``nora_activation[a]`` (its frozen base rational, fitted to that activation, and its trainable coefficient update).

* forward with adapter ``a`` active: ``nora_activation[a](x)``, the very module ``nora.apply_nora`` puts in place;
  several active adapters: the first one's coefficients plus every other one's update;
* ``disable_adapter()``: the model as NoRA training started from it (the original activation in the residual form,
  the base rational in the paper's form), as ``nora.disable_adapter``;
* ``merge()``: ``base_layer`` becomes a frozen :class:`nora.GroupRational` with the updates folded into per-group
  coefficients, in the residual form with the base rational kept as its fit (``unmerge()`` puts the activation
  back), so peft's ``merge_and_unload()`` leaves a plain model whose activations are the merged rationals
  (``nora.save_merged`` / ``nora.from_pretrained`` save and reload it).
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import Tensor, nn

from nora.adapter import AdapterError, GroupRational, NoraConfig
from nora.adapter.discover import Layout
from nora.adapter.engine import build_activation, fit_tensors
from nora.rational.fit import RationalFit


class NoraLayer(nn.Module, BaseTunerLayer):
    adapter_layer_names = ("nora_activation",)
    other_param_names = ()

    def __init__(self, base_layer: nn.Module, original: str, **kwargs) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.original = original  # what the base rationals were fitted to (gelu, silu, ...)
        self.nora_activation = nn.ModuleDict({})
        self._unmerged = []  # while merged: the activation merge() replaced (a list: no submodule, no state)
        self._disable_adapters = False
        self.merged_adapters = []
        self._uncalibrated: set[str] = set()  # adapters of init="calibrated" whose base is still the range fit

    def update_layer(
        self,
        adapter_name: str,
        config: NoraConfig,
        fit: RationalFit,
        layout: Layout,
        device: torch.device | None = None,
        uncalibrated: bool = False,
    ) -> None:
        """Add adapter ``adapter_name``: the NoraActivation :func:`nora.adapter.engine.build_activation` makes of
        base rational ``fit`` and the channels ``layout`` describes, one coefficient row per group (every adapter
        has the same shapes, whether its base was fitted once, calibrated, or calibrated per group).
        ``uncalibrated``: its config says init="calibrated" and ``fit`` is the range fit it starts from until
        :func:`nora.calibrate` re-fits it; a forward in train mode before that raises."""
        act = build_activation(
            config, fit, self.original, self.original_activation(), layout, device, rows=config.groups
        )
        self.nora_activation[adapter_name] = act
        if uncalibrated:
            self._uncalibrated.add(adapter_name)
        else:
            self._uncalibrated.discard(adapter_name)
        self.set_adapter(self.active_adapters)

    def set_base(self, adapter_name: str, fit: RationalFit) -> None:
        """Re-base adapter ``adapter_name`` on ``fit`` (calibrated init); its update stays the zero update."""
        act = self.nora_activation[adapter_name]
        num, den = fit_tensors(fit, rows=act.groups)
        if act.residual and act.variant == "rational_ft" and act.numerator_mode == "shared":
            num = num.mean(0, keepdim=True).expand_as(num)  # the shared numerator it starts from (NoraActivation)
        with torch.no_grad():
            act.base_numerator.copy_(num)
            act.base_denominator.copy_(den)
            if act.variant == "rational_ft":
                act.nora_num.copy_(num[: act.nora_num.shape[0]])
                act.nora_den.copy_(den)
        act.fit_range = (fit.x_min, fit.x_max)
        self._uncalibrated.discard(adapter_name)

    # ------------------------------------------------------------------ the activation
    def original_activation(self) -> nn.Module:
        """The model's own activation (also while merged)."""
        return self._unmerged[0] if self._unmerged else self.base_layer

    def _active(self) -> list[str]:
        return [a for a in self.active_adapters if a in self.nora_activation]

    def coefficients(self, adapter_names: list[str]) -> tuple[Tensor, Tensor]:
        """The first adapter's effective coefficients plus the updates of the others."""
        first = self.nora_activation[adapter_names[0]]
        num, den = first.coefficients()
        for name in adapter_names[1:]:
            d_num, d_den = self.nora_activation[name].delta()
            num, den = num + d_num, den + d_den
        return num, den

    def _base_rational(self, x: Tensor) -> Tensor:
        names = self._active() or list(self.nora_activation)
        act = self.nora_activation[names[0]]
        return act.evaluate(x, act.base_numerator.expand(act.groups, -1), act.base_denominator)

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self._base_rational(x) if len(self.nora_activation) else self.base_layer(x)
        if self.merged:
            return self.base_layer(x)
        active = self._active()
        if not active:
            return self.base_layer(x)
        if self.training and self._uncalibrated.intersection(active):
            raise AdapterError(
                f"NoraPeftConfig(init='calibrated'): adapter {sorted(self._uncalibrated.intersection(active))[0]!r} "
                "was never calibrated, so training would start from the range fit; call "
                "nora.calibrate(peft_model, batches) after peft.get_peft_model (a few input batches), or use "
                "init='fit'"
            )
        if len(active) == 1:
            return self.nora_activation[active[0]](x)
        return self.nora_activation[active[0]].evaluate(x, *self.coefficients(active))

    # ------------------------------------------------------------------ merge
    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        adapter_names = [a for a in check_adapters_to_merge(self, adapter_names) if a in self.nora_activation]
        if not adapter_names:
            return
        with torch.no_grad():
            if self.merged:  # merging more adapters on top: add their updates
                num, den = self.base_layer.coefficients()
                for name in adapter_names:
                    d_num, d_den = self.nora_activation[name].delta()
                    num, den = num + d_num, den + d_den
            else:
                num, den = self.coefficients(adapter_names)
            if safe_merge and not (torch.isfinite(num).all() and torch.isfinite(den).all()):
                raise ValueError(f"NaNs detected in the merged rational of adapter(s) {adapter_names}")
            first = self.nora_activation[adapter_names[0]]
            # the residual form keeps the rational its update started from (the merged one's, merging on top)
            fit_num, fit_den = (
                (self.base_layer if self.merged else first).fit_coefficients() if first.residual else (None, None)
            )
            merged = GroupRational(
                num.detach().clone(),
                den.detach().clone(),
                first.form,
                first.backend,
                self.original,
                first.fit_range,
                channel_dim=first.channel_dim,
                width=first.width,
                residual=first.residual,
                fit_numerator=fit_num,
                fit_denominator=fit_den,
                original_module=self.original_activation(),
            ).to(first.base_numerator.device)
        if not self.merged:
            self._unmerged = [self.base_layer]
        self.base_layer = merged
        self.merged_adapters.extend(adapter_names)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        self.base_layer = self._unmerged.pop()
        self.merged_adapters = []

    def __repr__(self) -> str:
        return "nora." + super().__repr__()
