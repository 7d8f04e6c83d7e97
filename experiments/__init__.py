"""The experiments: scripts run as `python experiments/NAME.py` and the modules they share."""
