"""Headline metrics: the dozen numbers DVC compares, taken from the detailed reports."""

from distill3r.reports import HEADLINE, headline_metrics


def test_headline_picks_and_rounds_and_tolerates_missing_values():
    eval_report = {"student": {"depth_abs_rel": 0.123456789, "chamfer": 0.2, "nc": True,
                               "pnp_rra_15": None},
                   "layout_prior": {"depth_abs_rel": 0.18}, "seconds_per_sample": 0.05}
    train_report = {"final_val": {"loss": 0.25}, "seconds": 600.0, "parameters_m": 5.1}
    out = headline_metrics(eval_report, train_report)
    assert list(out) == list(HEADLINE) and 8 <= len(out) <= 14
    assert out["abs_rel"] == 0.123457 and out["chamfer"] == 0.2
    assert out["nc"] is None and out["rra15"] is None  # booleans and nulls are not numbers
    assert out["prior_abs_rel"] == 0.18 and out["val_loss"] == 0.25 and out["train_s"] == 600
    assert headline_metrics(eval_report, None)["val_loss"] is None
    assert max(len(k) for k in out) <= 14  # column names of `dvc exp show`
