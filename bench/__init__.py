"""gvtbench benchmarks and command line."""
