"""prunekit for detection and segmentation models: ultralytics YOLO and torchvision detectors, pruned as they are.

Nothing here imports ultralytics or torchvision at import time; both are optional (ultralytics is AGPL and only
ever a test/extra dependency).
"""
from . import ultralytics  # noqa: F401  (registers ultralytics YOLO's conventions by name; imports no ultralytics)
from . import torchvision  # noqa: F401,E402  (default head-output forwards of torchvision detectors, by class name)
