"""crate-lit: train, fine-tune, pre-train and inspect CRATE white-box transformers."""

from . import models  # noqa: F401  (registers the CRATE classifiers in timm)

__version__ = "0.1.0"
