"""Evaluation: alignment, depth / reconstruction / pose metrics, baselines (numpy, scipy, cv2;
no torch or Lightning needed)."""

from distill3r.evaluation.alignment import (align_to_reference, fit_sim3, local_to_global,
                                            median_depth_scale, top_confident)
from distill3r.evaluation.baselines import (BASELINES, fit_layout_prior, layout_baseline,
                                            plane_baseline)
from distill3r.evaluation.metrics import (cloud_metrics, depth_metrics, grid_normals,
                                          point_map_metrics, subsample_indices)
from distill3r.evaluation.poses import (estimate_focal, intrinsics, pnp_poses, pose_metrics,
                                        procrustes_poses, relative_pose_errors)
from distill3r.evaluation.protocol import (aggregate_metrics, evaluate_sample, make_reference,
                                           reference_from_gt, reference_from_teacher)

__all__ = [
    "BASELINES", "aggregate_metrics", "align_to_reference", "cloud_metrics", "depth_metrics",
    "estimate_focal", "evaluate_sample", "fit_layout_prior", "fit_sim3", "grid_normals",
    "intrinsics", "layout_baseline", "local_to_global", "make_reference", "median_depth_scale",
    "plane_baseline", "pnp_poses", "point_map_metrics", "pose_metrics", "procrustes_poses",
    "reference_from_gt", "reference_from_teacher", "relative_pose_errors", "subsample_indices",
    "top_confident",
]
