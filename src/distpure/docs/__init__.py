"""Documentation generated from the code, so that it cannot drift from it."""
