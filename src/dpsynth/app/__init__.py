"""The application layer: the CLI, stages, workflow, demo, sweep, sample I/O, explore."""
