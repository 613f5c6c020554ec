"""medfilip: fine-grained language-image pretraining for chest X-rays (MedFILIP) as a DVC pipeline."""

__version__ = "0.1.0"
