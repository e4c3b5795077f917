"""Shared types every stage uses: recipe, run directory and manifest, pipeline, errors, console."""
