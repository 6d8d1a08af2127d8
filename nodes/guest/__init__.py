"""The guest: a model of the GVT-g aware i915 driver, and the load it generates."""
