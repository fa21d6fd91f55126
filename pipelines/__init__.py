"""Batch jobs: embedding and pseudo-labelling image collections on Ray, sharded index builds on Beam."""
