"""The ``ildseg`` command line: its parser and the commands built on the library.

- :mod:`.cli`: the parser and ``main`` (``ildseg``, ``python -m ILDSegmentationLib``).
- :mod:`.batch`: many CTs in one run; :mod:`.demo`: ``ildseg demo``;
  :mod:`.bench`: ``ildseg bench`` (speed and memory figures).
"""
