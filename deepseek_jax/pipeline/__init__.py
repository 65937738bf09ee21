"""Pipeline parallelism over the ``stage`` axis: schedules as data (``schedule``, pure
Python) and one shard_map executor (``executor``, imported on use)."""
