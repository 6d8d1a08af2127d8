"""The hypervisor trap layer: guest RAM, p2m, BAR0 trap forwarding and hypervisor calls."""
