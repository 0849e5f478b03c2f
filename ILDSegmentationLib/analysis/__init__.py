"""What a segmented CT says: volumes, regions, input checks, pictures, the report.

- :mod:`.pipeline`: the whole ``ildseg segment`` job on files.
- :mod:`.regions`: volumes per lung, zone, subpleural band and core; distribution.
- :mod:`.suitability`: is this scan suitable for the model (input checks).
- :mod:`.report`: class volumes and the report's text and panel rows.
- :mod:`.overlay`, :mod:`.visual_report`: PNG montage and one-page visual report.
"""
