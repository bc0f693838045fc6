"""Spatial ops keeping (N, C): pooling, upsampling, reflection/replication padding, grid sampling.  The
channel dims pass through, the spatial dims are resampled (pinned).  No MACs by convention."""
from __future__ import annotations

from .. import spaces as C
from ._common import rule


# ---------------------------------------------------------------- spatial ops keeping (N, C)
SPATIAL = {"max_pool2d_with_indices", "max_pool1d_with_indices", "max_pool3d_with_indices", "max_pool2d", "max_pool1d",
           "max_pool3d", "avg_pool2d", "avg_pool1d", "avg_pool3d", "adaptive_avg_pool2d", "_adaptive_avg_pool2d",
           "adaptive_avg_pool1d", "adaptive_avg_pool3d", "_adaptive_avg_pool3d", "adaptive_max_pool2d",
           "adaptive_max_pool1d", "adaptive_max_pool3d", "upsample_nearest2d", "upsample_nearest1d",
           "upsample_nearest3d", "upsample_bilinear2d", "upsample_bicubic2d", "upsample_linear1d",
           "upsample_trilinear3d", "_upsample_nearest_exact2d", "_upsample_bilinear2d_aa", "_upsample_nearest_exact1d",
           "_upsample_nearest_exact3d", "_upsample_bicubic2d_aa", "reflection_pad2d", "reflection_pad1d",
           "replication_pad2d", "replication_pad1d", "reflection_pad3d", "replication_pad3d",
           "fractional_max_pool2d", "grid_sampler_2d", "grid_sampler"}


@rule(*SPATIAL, cost_free=True)
def _spatial(A, op):
    x = op.args[0]
    xs = A.shape(x)
    for out in op.outs():
        osh = A.shape(out)
        if len(osh) != len(xs):
            continue
        lead = 2 if len(xs) >= 3 else 1
        for d in range(len(osh)):
            if d < lead and osh[d] == xs[d]:
                A.copy_dim(x, d, out, d)
            else:
                A.set(out, d, C.fresh_nonchannel(osh[d], f"{A.where(op)}: spatial dim"))
                # the input's spatial positions are resampled/pooled together: removing one (e.g. a row of a
                # position-embedding table that is interpolated to the image grid) changes every output
                C.pin(A.lay(x, d), f"{A.where(op)}: spatial dim resampled by {op.packet}")
    if op.packet.startswith("grid_sampler"):
        A.pin_node(op.args[1], f"{A.where(op)}: sampling grid")



# ---------------------------------------------------------------- torchvision's RoI pooling and NMS
# ``torchvision::roi_align`` / ``roi_pool`` (what ``MultiScaleRoIAlign`` calls) pool every channel of the feature map
# on its own: output (K, C, ph, pw) takes C from the input (N, C, H, W); K (one row per box) and the pooled grid are
# new, non-channel dims.  Registered by name, so torchvision is never imported here.
@rule("torchvision::roi_align", "torchvision::roi_pool", cost_free=True)
def _roi_pool(A, op):
    x, rois = op.args[0], op.args[1]
    xs = A.shape(x)
    for d in range(2, len(xs)):
        C.pin(A.lay(x, d), f"{A.where(op)}: spatial dim pooled by {op.packet}")
    C.pin(A.lay(x, 0), f"{A.where(op)}: batch dim indexed by the boxes of {op.packet}")
    A.pin_node(rois, f"{A.where(op)}: boxes of {op.packet} (coordinates, no channels)")
    for out in op.outs():
        osh = A.shape(out)
        for d in range(len(osh)):
            if d == 1:
                A.copy_dim(x, 1, out, 1)
            else:
                A.set(out, d, C.fresh_nonchannel(osh[d], f"{A.where(op)}: {'box' if d == 0 else 'pooled'} dim"))


@rule("torchvision::nms", cost_free=True)
def _nms(A, op):
    # non-maximum suppression selects boxes: its inputs are coordinates and scores (no channels to follow, and
    # their sizes must stay), its output a list of indices
    for t in op.args[:2]:
        A.pin_node(t, f"{A.where(op)}: boxes/scores selected by nms (no channels)")
    for out in op.outs():
        A.set(out, 0, C.fresh_nonchannel(A.shape(out)[0], f"{A.where(op)}: indices kept by nms"))
