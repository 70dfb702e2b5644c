"""One name per thing: record keys, metric names, class names, manifest columns.

Both sides import these constants; nobody retypes the strings.
"""

from __future__ import annotations

# --- lesion classes -------------------------------------------------------
MASS = "mass"
CALCIFICATION = "calcification"
IGNORE = "ignore"
NONE_FINDING = "none"
#: Detector classes in label order: label ``i`` of a detection is ``CLASSES[i]``.
CLASSES: tuple[str, ...] = (MASS, CALCIFICATION)
CLASS_TO_LABEL: dict[str, int] = {name: i for i, name in enumerate(CLASSES)}

# --- views, laterality, intent -------------------------------------------
LEFT = "L"
RIGHT = "R"
VIEW_CC = "CC"
VIEW_MLO = "MLO"
FOR_PRESENTATION = "FOR PRESENTATION"
FOR_PROCESSING = "FOR PROCESSING"

# --- spacing provenance ---------------------------------------------------
SPACING_PIXEL = "PixelSpacing"
SPACING_IMAGER = "ImagerPixelSpacing"
SPACING_IMAGER_MAG = "ImagerPixelSpacing/EstimatedRadiographicMagnificationFactor"
SPACING_CONFIG = "site-config"
SPACING_TABLE = "dataset-table"

#: Registry name of the lesion detector's trainer (``client.trainer``): the
#: only trainer whose arrays form a detector or that trains under DP-SGD.
DETECTOR_TRAINER = "detector"

# --- site contract files --------------------------------------------------
ANNOTATIONS_CSV = "annotations.csv"
SPLIT_CSV = "split.csv"
MANIFEST_CSV = "manifest.csv"
INGEST_REPORT_JSON = "ingest_report.json"
RESOLVED_CONFIG_YAML = "resolved_config.yaml"

#: Columns of ``annotations.csv`` (boxes in stored pixels, origin top-left).
ANNOTATION_COLUMNS: tuple[str, ...] = (
    "image",
    "finding",
    "xmin",
    "ymin",
    "xmax",
    "ymax",
)

#: Columns of ``manifest.csv``; one row per ingested image.
MANIFEST_COLUMNS: tuple[str, ...] = (
    "key",
    "source",
    "sop_instance_uid",
    "patient_id",
    "manufacturer",
    "model",
    "view",
    "laterality",
    "laterality_source",
    "spacing_mm",
    "spacing_source",
    "presentation_intent",
    "photometric",
    "rows",
    "cols",
    "labeled",
)

# --- Flower record keys (message contents) --------------------------------
ARRAYS_KEY = "arrays"
METRICS_KEY = "metrics"
CONFIG_KEY = "config"
#: Server -> site only: the initial model's personal norm layers, which a site
#: that has no personal copy yet starts from (two-phase protocol under FedBN).
PERSONAL_DEFAULTS_KEY = "personal-defaults"
NUM_EXAMPLES = "num-examples"
SERVER_ROUND = "server-round"
PROXIMAL_MU = "proximal-mu"
LOCAL_EPOCHS = "local-epochs"

# --- metric names ----------------------------------------------------------
TRAIN_LOSS = "train-loss"
SKIPPED_STEPS = "skipped-steps"
#: Site-local wall time of one train/evaluate call, kept in the site state's
#: history only (never a reply metric: not in the federation whitelist).
LOCAL_SECONDS = "local-seconds"
CPM_MASS = "cpm-mass"
CPM_CALCIFICATION = "cpm-calcification"
CPM_MEAN = "cpm-mean"
#: Epsilon a site has spent under patient-level DP-SGD (``common.detector.dp``) after
#: the round, at the delta of its accountant; sent only when DP is on.
DP_EPSILON = "dp-epsilon"
#: FP rates per image at which FROC sensitivity is reported.
FROC_FP_RATES: tuple[float, ...] = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0)
#: FP rates per image whose sensitivities are averaged into the CPM.
CPM_FP_RATES: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0)
