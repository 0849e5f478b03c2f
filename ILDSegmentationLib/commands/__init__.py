"""The ``ildseg`` commands that drive the library: running batches on a Ray cluster
(distributed.py) and splitting a batch into shards for job arrays (shards.py)."""
