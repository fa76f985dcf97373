"""Background services every worker runs, one module each (River's model): the rescuer of expired
leases, and the pruner of old finished tasks. Each takes an advisory lock so that only one worker
in the cluster does the work at a time; the others skip their turn."""
