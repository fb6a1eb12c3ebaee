"""dream_fast: train and run DREAM fast (encoder + text-to-image generator in one model)."""

__version__ = "0.1.0"
