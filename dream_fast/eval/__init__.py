"""Evaluation suite: linear probe, zero-shot, retrieval, alignment, FID/IS, shapes attribute oracle.

Public names are re-exported here; see each module for details.
"""

from dream_fast.eval.features import (
    EvalImages,
    encode_all,
    extract,
    image_embeddings,
    images_to_tokens,
    probe_features,
    text_embeddings,
)
from dream_fast.eval.fid import (
    MissingDependencyError,
    feature_stats,
    fid_with_torch_fidelity,
    frechet_distance,
    inception_score,
    load_stats,
    save_stats,
)
from dream_fast.eval.oracle import (
    ATTRIBUTES,
    oracle_accuracy,
    oracle_features,
    oracle_report,
    read_image,
    shapes_eval_prompts,
    shapes_fd,
    wilson_interval,
)
from dream_fast.eval.probe import LARS, linear_probe, train_linear_head
from dream_fast.eval.retrieval import (
    alignment_from_embeddings,
    alignment_on,
    alignment_score,
    retrieval,
    retrieval_metrics,
)
from dream_fast.eval.zeroshot import (
    DEFAULT_TEMPLATES,
    class_text_embeddings,
    prompts_from_templates,
    shapes_class_prompts,
    zero_shot_classify,
    zero_shot_from_embeddings,
)

__all__ = [
    "ATTRIBUTES",
    "DEFAULT_TEMPLATES",
    "LARS",
    "EvalImages",
    "MissingDependencyError",
    "alignment_from_embeddings",
    "alignment_on",
    "alignment_score",
    "class_text_embeddings",
    "encode_all",
    "extract",
    "feature_stats",
    "fid_with_torch_fidelity",
    "frechet_distance",
    "image_embeddings",
    "images_to_tokens",
    "inception_score",
    "linear_probe",
    "load_stats",
    "oracle_accuracy",
    "oracle_features",
    "oracle_report",
    "probe_features",
    "prompts_from_templates",
    "read_image",
    "retrieval",
    "retrieval_metrics",
    "save_stats",
    "shapes_class_prompts",
    "shapes_eval_prompts",
    "shapes_fd",
    "text_embeddings",
    "train_linear_head",
    "wilson_interval",
    "zero_shot_classify",
    "zero_shot_from_embeddings",
]
