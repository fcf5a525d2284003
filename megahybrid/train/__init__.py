"""The training entry point (`run.py`), the step loop (`loop.py`), checkpoints, metrics and the one
place that knows about devices and torch.distributed (`dist.py`)."""
