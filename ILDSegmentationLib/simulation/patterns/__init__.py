"""The five ILD patterns, one module each; :func:`draw` of each fills a region.

Every ``draw(case, box, f, lung_f, params, ...)`` takes the region's signed
pseudo-distance ``f`` (mm, > 0 inside) and the fine lung mask on the box's fine grid,
and returns fine maps ``(w, w * p, membership)``: the share of the tissue the pattern
replaces, that share times the attenuation (HU) replacing it, and the region's soft
membership; it records the values it drew in ``params``.
"""
