"""slicer subpackage (see the layout of issue 26)."""
