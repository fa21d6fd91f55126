"""Submitting jobs to clusters and serving a memory."""
