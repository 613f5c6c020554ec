"""Evaluation of a trained MedFILIP model: metrics, zero-shot, retrieval, linear probe."""
