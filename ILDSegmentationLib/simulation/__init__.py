"""Synthetic data: ILD patterns inserted into real CTs, and the demo's chest phantom.

- :mod:`.simulate`: the pattern simulator (``ildseg simulate``; docs/simulator.md).
- :mod:`.phantom`: the synthetic chest CT of ``ildseg demo``.
"""
