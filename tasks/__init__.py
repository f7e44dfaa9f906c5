"""Stages of a run: plain functions that do the work, and thin Prefect tasks over them."""
