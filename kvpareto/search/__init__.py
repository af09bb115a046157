"""Search: the space schema, the Optuna study, storage and trial cache, frontier and outputs."""
