"""The inference engine: network, model files, cropping, and the decision rule."""
