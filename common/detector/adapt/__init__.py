"""Client-side adaptation: semi-supervision, few-shot tuning, standardization.

Mean-teacher semi-supervision, few-shot fine-tuning and site-local intensity
standardization. Everything runs inside the hospital
client and sends nothing new over the network (see ``docs/adaptation.md``).

Public API::

    AdaptConfig                                  # config.py
    StrongAugment, WeakAugment, Affine           # augment.py
    HistogramStandardizer                        # standardize.py
    MeanTeacher, load_or_create_teacher, local_round, pseudo_labels,
    rampup_weight, UnlabeledImages, ConsistencyLoss   # teacher.py
    finetune_head, choose_head_only, few_labels, fewshot_frozen_keys  # fewshot.py
"""

from common.detector.adapt.augment import (
    Affine,
    StrongAugment,
    StrongParams,
    WeakAugment,
)
from common.detector.adapt.config import AdaptConfig
from common.detector.adapt.fewshot import (
    FewShotStats,
    choose_head_only,
    few_labels,
    fewshot_frozen_keys,
    finetune_head,
)
from common.detector.adapt.standardize import HistogramStandardizer
from common.detector.adapt.teacher import (
    ConsistencyLoss,
    MeanTeacher,
    RoundStats,
    UnlabeledImages,
    load_or_create_teacher,
    local_round,
    pseudo_labels,
    rampup_weight,
)

__all__ = [
    "AdaptConfig",
    "Affine",
    "ConsistencyLoss",
    "FewShotStats",
    "HistogramStandardizer",
    "MeanTeacher",
    "RoundStats",
    "StrongAugment",
    "StrongParams",
    "UnlabeledImages",
    "WeakAugment",
    "choose_head_only",
    "few_labels",
    "fewshot_frozen_keys",
    "finetune_head",
    "load_or_create_teacher",
    "local_round",
    "pseudo_labels",
    "rampup_weight",
]
