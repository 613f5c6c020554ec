"""Measurements of the pipeline (extraction quality, throughput): outside the stage packages, so editing them re-runs no stage."""
