"""Timing that holds on a shared machine, below the stages: interleaved calls, worker processes, variant tuning,
kernel timing. It imports no stage and no command."""
