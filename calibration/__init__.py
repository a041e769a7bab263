"""Calibration: scenario suites with a controlled danger level -> curves, z-score
baselines, alert thresholds and a danger calibrator, stored in the probe bank."""
from .neutral import NeutralSet, neutral_set
from .run import RISK_FORMULA, calibrate_readouts, calibrate_run, risk_from_scores, risk_head
from .suites import Family, Suite, SuiteError, builtin_suites, load_suite, parse_suite, resolve_suites

__all__ = ["calibrate_run", "calibrate_readouts", "risk_from_scores", "risk_head", "RISK_FORMULA", "Suite", "Family",
           "SuiteError", "load_suite", "parse_suite", "builtin_suites", "resolve_suites", "NeutralSet", "neutral_set"]
