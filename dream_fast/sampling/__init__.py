"""Generation: static sync-free MAR-style sampler, Semantically Aligned Decoding, CUDA graphs,
the DreamPipeline (prompts -> PIL images) and inpainting (docs/design.md §1.9, §4 principle 4)."""

from dream_fast.sampling.sampler import (
    DreamSampler,
    Plan,
    SampleNoise,
    SampleResult,
    StepSpec,
    candidate_seed,
    draw_noise,
    make_plan,
)
from dream_fast.sampling.schedule import cfg_schedule, masking_schedule

__all__ = [
    "DreamPipeline",
    "DreamSampler",
    "GenerationResult",
    "Plan",
    "SampleNoise",
    "SampleResult",
    "StepSpec",
    "candidate_seed",
    "cfg_schedule",
    "draw_noise",
    "make_plan",
    "masking_schedule",
]


def __getattr__(name: str):
    # the pipeline pulls in PIL/tokenizers; import it only when asked for
    if name in ("DreamPipeline", "GenerationResult"):
        from dream_fast.sampling import pipeline

        return getattr(pipeline, name)
    raise AttributeError(name)
