"""Integration: the one place that rewires models, injection, checkpoints, PEFT interop and acceleration, distributed checkpoints, VeRA banks."""
