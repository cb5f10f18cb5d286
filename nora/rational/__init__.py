"""Rational-function math, fitting and calibration."""

from nora.rational.functional import FORMS, rational_backward, rational_forward, rational_reference

__all__ = ["FORMS", "rational_backward", "rational_forward", "rational_reference"]
