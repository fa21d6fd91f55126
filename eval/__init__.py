"""Evaluations of a memory against query sets: accuracy over k and voting rules, scaling laws."""
