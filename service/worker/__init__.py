"""The worker side: the front-end link (link.py), shared-memory frame slots (shm.py), the worker process
(process.py) and its batch scheduler (scheduler.py)."""
