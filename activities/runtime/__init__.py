"""What an activity knows of the worker it runs in: the ids of the run that called it, the
worker's metrics, and the worker's bounds on a caller's load knobs."""
