"""gvtbench nodes: the guest, hypervisor, mediator and gpu roles and their shared runtime."""
