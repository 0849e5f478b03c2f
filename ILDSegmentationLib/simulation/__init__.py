"""Synthetic data: ILD patterns inserted into real CTs, and the demo's chest phantom.

- :mod:`.simulate`: :func:`~.simulate.simulate_case`, the simulator's entry
  (``ildseg simulate``; docs/simulator.md explains every choice).
- :mod:`.config`: the labels and every parameter (:class:`~.config.SimulationConfig`);
  :mod:`.results`: what comes back (:class:`~.results.SimulatedCase`).
- :mod:`.case`: one simulation's state and where regions go (placement, outlines,
  mixing into the CT); :mod:`.insertion`: the insertion core every pattern shares;
  :mod:`.patterns`: one module per pattern; :mod:`.grids`: fine sub-voxel grids and
  the shapes drawn on them, and the phantom's voxel grid.
- :mod:`.phantom`: the synthetic chest CT of ``ildseg demo``.
"""
