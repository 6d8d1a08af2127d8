"""The mediator role: trap-and-emulate of MMIO, GGTT shadowing and workload scheduling."""
